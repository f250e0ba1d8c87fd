"""Fused linear cross-entropy: an LM head (hidden @ weight.T + bias) and its (smoothed) cross-entropy
in one op that never holds the full N x V logits.

Loss semantics are those of ``torch.ops.smoothce.cross_entropy`` (see kernels/cross_entropy.py), applied
to ``x = softcap((hidden @ weight.T + bias) * logit_scale)``. For each non-ignored row i with target
y_i, class weights w (ones when None), lse_i = logsumexp_j x_ij:

    q_ij   = a * w[y_i] * [j == y_i] + b * w_j
    loss_i = sum_j q_ij * (lse_i - x_ij) + c + z * lse_i^2

Rows are processed in chunks (see :func:`chunk_rows`). Per chunk the forward computes the chunk's
logits into one reused buffer, the per-row loss and, in the same buffer, d(loss)/d(logits); two
matmuls turn that into the chunk's rows of grad_hidden and its contribution to grad_weight
(accumulated in fp32). The per-chunk cross-entropy is the Triton kernel of kernels/cross_entropy.py
on CUDA (chunk logits in the input dtype, math in fp32) and cache-sized blocks of in-place torch
ops on CPU (chunk logits in fp32). For
'sum' / 'mean' the loss is a scalar, so backward only scales the stored gradients by grad_output. For
'none' every row has its own grad_output, which cannot be folded into a precomputed grad_weight:
forward then computes the loss only and backward recomputes the chunks with the per-row grad_output
(one extra head matmul per chunk, still no full logits).

Layout, low to high: chunk rule -> per-chunk math -> chunk loops -> ``smoothce::`` custom ops (with
fakes) -> autograd -> the public functional.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from smoothce.kernels.inputs import (
    FLOAT_DTYPES,
    Labels,
    acc_dtype,
    check_dtype,
    check_labels,
    check_labels_on_cpu,
    check_loss_dtype,
    check_per_class,
    check_same_device,
    check_tensors,
    kernel_choice,
)
from smoothce.kernels.form import LossForm

__all__ = ["chunk_rows", "fused_linear_cross_entropy"]



# ------------------------------------------------------------------------------------------------
# chunk rule
# ------------------------------------------------------------------------------------------------
def chunk_rows(n: int, v: int, d: int) -> int:
    """Rows per chunk for an (n, d) x (d, v) head.

    The op must hold a (v, d) fp32 gradient accumulator for the weight anyway. A chunk of ``d`` rows
    has fp32 logits of exactly that size (d * v * 4 bytes), so chunking at most doubles the op's own
    unavoidable state, whatever n is. Two more reasons for ``d``: across the loop the accumulator is
    read and written once per chunk, n / d times, i.e. n * v * 8 bytes -- the same traffic as one
    pass over the full logits; and every matmul is at least d x d x v, large enough to stay
    compute-bound. A small head gets at least _MIN_CHUNK_LOGITS logits per chunk (4 MiB in fp32),
    affordable anywhere, so it is not cut into many tiny chunks whose fixed per-chunk cost would
    dominate. Rounded up to a multiple of 8 (vector-friendly row blocks) and capped at n.
    """
    if n <= 0:
        return 1
    rows = max(8, d, -(-_MIN_CHUNK_LOGITS // max(v, 1)))
    return min(n, -(-rows // 8) * 8)


_MIN_CHUNK_LOGITS = 1 << 20


# ------------------------------------------------------------------------------------------------
# per-chunk cross-entropy: torch (CPU) and the Triton kernel of kernels/cross_entropy.py (CUDA)
# ------------------------------------------------------------------------------------------------

# The torch path runs its elementwise passes over blocks of about this many logits (16 MiB in fp32,
# half a typical L3), so a block stays in cache across its passes (amax, softmax, amax without a
# softcap; log_softmax, sum, exp, gradient with one). Blocks much smaller than this lose more to
# per-op thread synchronisation than they gain in cache hits on a busy 2-core machine.
_CE_BLOCK_ELEMENTS = 1 << 22


def _block_ce(
    x: Tensor,  # (R, V) logits in the acc dtype; overwritten with the gradient when gce is given
    y: Tensor,  # (R, 1) int64 labels, ignored / bad ones replaced by 0
    wy: Tensor,  # (R,) w[y_i]
    row_mask: Tensor,  # (R,) 1, 0 for ignored rows, nan for labels out of range
    class_weight: Optional[Tensor],  # (V,) acc dtype or None
    w_sum: float | Tensor,  # sum_j w_j
    a: float, b: float, c: float, z: float, softcap: float,
    gce: Optional[Tensor],  # (R,) d(result)/d(ce_i) incl. logit_scale, 0 on ignored rows; None: no gradient
    gz: Optional[Tensor],  # (R,) d(result)/d(z_i) incl. logit_scale
) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy part ce_i (incl. c) and z part z_i of a block of rows.

    With logp = log_softmax(x), lse = x_y - logp_y and Q_i = sum_j q_ij = a w[y] + b sum_j w_j:
        ce_i = -a w[y] logp_iy - b sum_j w_j logp_ij + c            (PyTorch's own formula)
    Gradient, with p = softmax(x) = exp(logp):
        d ce_i / d x_ij = Q_i p_ij - q_ij,        d z_i / d x_ij = 2 z lse_i p_ij
    so  g_ij = (gce_i Q_i + 2 z lse_i gz_i) p_ij - gce_i b w_j - gce_i a w[y] [j == y],
    times dx/du = 1 - (x / cap)^2 under a softcap x = cap tanh(u / cap).
    The block is rewritten in place: x -> logp -> p -> g, one elementwise pass each.
    """
    out = x
    t = None
    if softcap:
        # Keep t = tanh(u / cap) for the softcap derivative; log_softmax works on a copy.
        t = x.div_(softcap).tanh_()
        x = torch.mul(t, softcap)
    x_y = x.gather(1, y).squeeze(1) if z else None
    torch.log_softmax(x, dim=1, out=x)  # in place: the row kernel reads a row before writing it
    lp_y = x.gather(1, y).squeeze(1)
    slp = x.sum(dim=1) if class_weight is None else torch.mv(x, class_weight)
    ce = (c - a * wy * lp_y - b * slp) * row_mask
    if z:
        lse = x_y - lp_y
        z_rows = z * lse * lse * row_mask
    else:
        z_rows = torch.zeros_like(ce)
    if gce is None:
        return ce, z_rows

    p_coef = gce * (a * wy + b * w_sum)
    if z:
        p_coef = p_coef + (2.0 * z) * lse * gz
    p_coef = p_coef.unsqueeze(1)
    x.exp_()
    if b and class_weight is None:
        torch.addcmul((gce * -b).unsqueeze(1), x, p_coef, out=x)  # coef p - gce b in one pass
    else:
        x.mul_(p_coef)
        if b:
            x.addr_(gce * b, class_weight, alpha=-1.0)
    if a:
        x.scatter_add_(1, y, (-a * gce * wy).unsqueeze(1))
    if t is not None:
        t.square_()
        torch.addcmul(x, x, t, value=-1.0, out=out)  # g * (1 - t^2), back into the logits buffer
    return ce, z_rows


def _block_softmax(
    x: Tensor,  # (R, V) logits in the acc dtype; overwritten with softmax(x)
    y: Tensor,  # (R, 1) int64 labels, ignored / bad ones replaced by 0
    wy: Tensor,  # (R,) w[y_i]
    row_mask: Tensor,  # (R,) 1, 0 for ignored rows, nan for labels out of range
    class_weight: Optional[Tensor],  # (V,) acc dtype or None
    w_sum: float | Tensor,  # sum_j w_j
    sx: Optional[Tensor],  # (R,) sum_j w_j x_ij, needed when b != 0
    a: float, b: float, c: float, z: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """ce_i, z_i and lse_i of a block of rows without a softcap; the block becomes p = softmax(x).

    Two vectorised reads (row max before and after) and one in-place softmax. lse comes from the
    largest probability, p_max = exp(m - lse) = 1 / sum_j exp(x_j - m) in [1 / V, 1], so
    lse = m - log p_max never meets an underflow. Then logp_y = x_y - lse and
    ce_i = -a w[y] logp_iy - b (sum_j w_j x_ij - lse_i sum_j w_j) + c,
    with sum_j w_j x_ij = sx_i given by the caller (from the hidden state, no pass over x).
    """
    m = x.amax(dim=1)  # max() with indices is not vectorised: two amax passes are cheaper
    x_y = x.gather(1, y).squeeze(1)
    torch.softmax(x, dim=1, out=x)  # in place: the row kernel reads a row before writing it
    lse = m - x.amax(dim=1).log()
    ce = c - a * wy * (x_y - lse)
    if b:
        ce = ce - b * (sx - lse * w_sum)
    ce = ce * row_mask
    z_rows = z * lse * lse * row_mask if z else torch.zeros_like(ce)
    return ce, z_rows, lse


def _chunk_softmax_torch(logits, start, tg, ce_rows, z_rows, lse_rows, sx, a, b, c, z):
    """_block_softmax over cache-sized blocks of the chunk whose first row is ``start``; sx (C,) as
    there, for the chunk's rows."""
    rows, v = logits.shape
    step = max(1, _CE_BLOCK_ELEMENTS // max(v, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        i0, i1 = start + r0, start + r1
        ce_rows[i0:i1], z_rows[i0:i1], lse_rows[i0:i1] = _block_softmax(
            logits[r0:r1], tg.y[i0:i1, None], tg.wy[i0:i1], tg.row_mask[i0:i1], tg.class_weight, tg.w_sum,
            None if sx is None else sx[r0:r1], a, b, c, z)


def _chunk_ce_torch(logits, start, tg, ce_rows, z_rows, a, b, c, z, softcap, gce, gz):
    """_block_ce over cache-sized blocks of the chunk whose first row is ``start``; writes the
    per-row results into ce_rows / z_rows."""
    rows, v = logits.shape
    step = max(1, _CE_BLOCK_ELEMENTS // max(v, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        i0, i1 = start + r0, start + r1
        ce, zr = _block_ce(
            logits[r0:r1], tg.y[i0:i1, None], tg.wy[i0:i1], tg.row_mask[i0:i1], tg.class_weight, tg.w_sum,
            a, b, c, z, softcap, None if gce is None else gce[i0:i1], None if gz is None else gz[i0:i1])
        ce_rows[i0:i1] = ce
        z_rows[i0:i1] = zr


def _use_triton(hidden: Tensor) -> bool:
    return kernel_choice(hidden) == "triton"


# ------------------------------------------------------------------------------------------------
# chunk loops
# ------------------------------------------------------------------------------------------------
def _chunk_loop(hidden, weight, bias, tg, ignore_index, a, b, c, z, softcap, logit_scale, scales, row_grad,
                rows):
    """Per-row ce_i / z_i over all chunks. With ``scales`` ((2,) tensor: d(result)/d(ce_i) and
    d(result)/d(z_i) for counted rows, times ``row_grad`` (N,) if given) also the gradients of the
    result with respect to hidden, weight and bias."""
    n, d = hidden.shape
    v = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    triton_path = _use_triton(hidden)
    # Chunk logits: fp32 (fp64 for fp64 input) for the torch path; the Triton kernel reads half
    # precision logits and does its math in fp32, so there the matmuls stay in the input dtype.
    work = hidden.dtype if triton_path else acc
    w_work = weight.to(work)  # no copy unless a half-precision weight meets the torch path
    b_work = None if bias is None else bias.to(work)
    ce_rows = torch.empty(n, dtype=acc, device=dev)
    z_rows = torch.zeros(n, dtype=acc, device=dev)
    grads = scales is not None
    grad_h = grad_w = grad_b = None
    if grads:
        grad_h = torch.empty(n, d, dtype=hidden.dtype, device=dev)
        # Weight (and bias) gradients accumulate over chunks in fp32 even for half-precision weights.
        grad_w = torch.zeros(v, d, dtype=acc, device=dev)
        grad_b = torch.zeros(v, dtype=acc, device=dev) if bias is not None else None
        scales = scales * logit_scale  # chain through logits = logit_scale * (hidden @ weight.T + bias)
        if not triton_path:
            gce = torch.where(tg.valid, scales[0] * tg.row_mask, 0.0)
            gz = torch.where(tg.valid, scales[1] * tg.row_mask, 0.0)
            if row_grad is not None:
                gce, gz = gce * row_grad, gz * row_grad

    softmax_path = not triton_path and not softcap
    lse_rows = torch.empty(n, dtype=acc, device=dev) if softmax_path else None
    u = wb = None
    if softmax_path and b:
        # u = sum_j w_j W_j (and w . bias): the uniform (b) part of loss and gradient goes through them.
        u = w_work.sum(dim=0) if tg.class_weight is None else torch.mv(w_work.t(), tg.class_weight)
        if b_work is not None:
            wb = b_work.sum() if tg.class_weight is None else torch.dot(b_work, tg.class_weight)
    if grads and softmax_path:
        coef_rows = torch.empty(n, dtype=acc, device=dev)
        # p W in the accumulation dtype, scaled and corrected once after the loop
        gh_acc = grad_h if grad_h.dtype == acc else torch.empty(n, d, dtype=acc, device=dev)

    rows = rows if rows > 0 else chunk_rows(n, v, d)
    buf = torch.empty(min(rows, n), v, dtype=work, device=dev)  # reused by every chunk
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h = hidden[start:end].to(work)
        logits = buf[: end - start]
        # (C, D) x (D, V) -> (C, V), logit_scale folded into the matmul
        if b_work is None:
            torch.mm(h, w_work.t(), out=logits)
            if logit_scale != 1.0:
                logits.mul_(logit_scale)
        else:
            torch.addmm(b_work, h, w_work.t(), beta=logit_scale, alpha=logit_scale, out=logits)
        if triton_path:
            from smoothce.kernels.cross_entropy_triton import launch_cross_entropy

            x3 = logits.view(end - start, v, 1)
            launch_cross_entropy(x3, tg.target[start:end].view(-1, 1), tg.class_weight,
                                 scales if grads else torch.ones(2, dtype=acc, device=dev),
                                 ce_rows[start:end], z_rows[start:end], x3 if grads else None,
                                 ignore_index=ignore_index, a=a, b=b, c=c, z_loss=z, softcap=softcap or None)
            if grads and row_grad is not None:
                logits.mul_(row_grad[start:end, None].to(work))
        elif softcap:
            _chunk_ce_torch(logits, start, tg, ce_rows, z_rows, a, b, c, z, softcap,
                            gce if grads else None, gz if grads else None)
        else:
            sx = None
            if b:
                # sum_j w_j x_ij = logit_scale (h_i . sum_j w_j W_j + sum_j w_j bias_j): (C, D) work
                # instead of a pass over the (C, V) logits.
                sx = torch.mv(h, u)
                if wb is not None:
                    sx += wb
                if logit_scale != 1.0:
                    sx *= logit_scale
            _chunk_softmax_torch(logits, start, tg, ce_rows, z_rows, lse_rows, sx, a, b, c, z)
            if grads:
                # Only the coef_i p_ij part per chunk (see _softmax_grads_finish).
                coef = gce[start:end] * (a * tg.wy[start:end] + b * tg.w_sum)
                if z:
                    coef = coef + (2.0 * z) * lse_rows[start:end] * gz[start:end]
                coef_rows[start:end] = coef
                torch.mm(logits, w_work, out=gh_acc[start:end])
                grad_w.addmm_(logits.t(), h * coef.unsqueeze(1))
                if grad_b is not None:
                    grad_b.addmv_(logits.t(), coef)
            continue
        if grads:
            # logits now holds d(result)/d(hidden @ weight.T + bias) for the chunk.
            if work == hidden.dtype:
                torch.mm(logits, w_work, out=grad_h[start:end])
            else:
                grad_h[start:end].copy_(torch.mm(logits, w_work))
            if work == acc:
                grad_w.addmm_(logits.t(), h)
            else:
                grad_w += torch.mm(logits.t(), h)
            if grad_b is not None:
                grad_b += logits.sum(dim=0, dtype=acc)
    if grads and softmax_path:
        _softmax_grads_finish(hidden, gh_acc, grad_w, grad_b, tg, a, b, gce, coef_rows, w_work, u)
        if gh_acc is not grad_h:
            grad_h.copy_(gh_acc)
    return ce_rows, z_rows, grad_h, grad_w, grad_b


def _softmax_grads_finish(hidden, grad_h, grad_w, grad_b, tg, a, b, gce, coef_rows, w_work, u):
    """The parts of the softmax path's gradients that are not p, applied once for all rows.

    g_ij = coef_i p_ij - k_i w_j - s_i [j == y_i] with coef_i = gce_i Q_i + 2 z lse_i gz_i,
    k_i = gce_i b, s_i = gce_i a w[y_i]. Only the coef p part needs the chunk (the chunk loop adds
    p^T (coef h) to grad_W, p^T coef to grad_b, and leaves p W in grad_h); the rest factors through
    vectors, so the only pass over a chunk is its softmax:
        grad_h_i  = coef_i (p W)_i - k_i sum_j w_j W_j - s_i W[y_i]
        grad_W   -= w (x) sum_i k_i h_i,  and s_i h_i at row y_i
        grad_b   -= w sum_i k_i,          and s_i at y_i
    """
    acc = grad_w.dtype
    h = hidden.to(acc)
    grad_h.mul_(coef_rows.unsqueeze(1))
    if b:
        w_vec = tg.class_weight if tg.class_weight is not None else torch.ones_like(grad_w[:, 0])
        grad_h.addr_(gce, u, alpha=-b)
        grad_w.addr_(w_vec, torch.mv(h.t(), gce), alpha=-b)
        if grad_b is not None:
            grad_b.sub_(w_vec * (b * gce.sum()))
    if a:
        s_y = a * gce * tg.wy
        grad_h.addcmul_(s_y.unsqueeze(1), w_work[tg.y], value=-1.0)
        grad_w.index_add_(0, tg.y, h * s_y.unsqueeze(1), alpha=-1.0)
        if grad_b is not None:
            grad_b.index_add_(0, tg.y, s_y, alpha=-1.0)


def _forward(hidden, weight, bias, target, class_weight, ignore_index, reduction, a, b, c, z, softcap,
             logit_scale, compute_grad, rows, loss_dtype):
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    if hidden.device.type == "cpu":
        check_labels_on_cpu(target, v, ignore_index)
    tg = Labels(target, class_weight, ignore_index, v, acc)
    # 'none' cannot use forward-time gradients (see module docstring): its backward recomputes.
    # 'mean' divisors come from the labels alone, before the chunk loop.
    scales = tg.scales(reduction) if compute_grad and reduction != "none" else None
    ce_rows, z_rows, grad_h, grad_w, grad_b = _chunk_loop(
        hidden, weight, bias, tg, ignore_index, a, b, c, z, softcap, logit_scale, scales, None, rows)
    loss, z_term = tg.reduce(ce_rows, z_rows, reduction, z)
    loss, z_term = loss.to(loss_dtype), z_term.to(loss_dtype)
    if scales is None:
        return loss, z_term, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    gb = weight.new_empty(0) if grad_b is None else grad_b.to(bias.dtype)
    return loss, z_term, grad_h, grad_w.to(weight.dtype), gb


def _backward_rows(grad_loss, hidden, weight, bias, target, class_weight, ignore_index, a, b, z, softcap,
                   logit_scale, rows):
    v = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    tg = Labels(target, class_weight, ignore_index, v, acc)
    _, _, grad_h, grad_w, grad_b = _chunk_loop(
        hidden, weight, bias, tg, ignore_index, a, b, 0.0, z, softcap, logit_scale, tg.scales("sum"),
        grad_loss.to(acc), rows)
    gb = weight.new_empty(0) if grad_b is None else grad_b.to(bias.dtype)
    return grad_h, grad_w.to(weight.dtype), gb


# ------------------------------------------------------------------------------------------------
# smoothce:: custom ops
# ------------------------------------------------------------------------------------------------
def _form_and_coefficients(ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap,
                           logit_scale, uniform_rows, classes):
    """The op's LossForm (validated) and its (a, b, c) for ``classes`` classes."""
    form = LossForm(ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale)
    if uniform_rows is not None:
        raise ValueError("smoothce: fused_linear_cross_entropy does not take uniform_rows yet; "
                         "use fused_cross_entropy on the logits")
    return form, form.coefficients(classes)


@torch.library.custom_op("smoothce::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: Tensor,  # (N, D)
    weight: Tensor,  # (V, D)
    bias: Optional[Tensor],  # (V,)
    target: Tensor,  # (N,) int
    class_weight: Optional[Tensor],  # (V,)
    ignore_index: Optional[int],
    reduction: str,
    label_smoothing: float,
    smoothing: str,
    scale: float,
    kl: bool,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    uniform_rows: Optional[Tensor],  # (N,) bool
    loss_dtype: Optional[torch.dtype],
    compute_grad: bool,
    chunk_size: int,  # rows per chunk; 0 = chunk_rows(N, V, D)
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, z_term, grad_hidden, grad_weight, grad_bias) of the loss LossForm describes; gradients for
    grad_output = 1, empty when compute_grad is False or reduction is 'none' (its backward recomputes),
    grad_bias empty without bias."""
    form, (a, b, c) = _form_and_coefficients(ignore_index, reduction, label_smoothing, smoothing, scale, kl,
                                             z_loss, softcap, logit_scale, uniform_rows, weight.shape[0])
    return _forward(hidden, weight, bias, target, class_weight, ignore_index, reduction, a, b, c,
                    form.z_loss, form.softcap or 0.0, form.logit_scale, compute_grad, chunk_size,
                    loss_dtype or hidden.dtype)


@linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, smoothing, scale, kl,
      z_loss, softcap, logit_scale, uniform_rows, loss_dtype, compute_grad, chunk_size):
    n = hidden.shape[0]
    dtype = loss_dtype or hidden.dtype
    loss = hidden.new_empty((n,) if reduction == "none" else (), dtype=dtype)
    z_term = hidden.new_empty((n,) if reduction == "none" else (), dtype=dtype)
    if not compute_grad or reduction == "none":
        return loss, z_term, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    gb = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return loss, z_term, torch.empty_like(hidden), torch.empty_like(weight), gb


@torch.library.custom_op("smoothce::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_loss: Tensor,  # (N,) per-row grad_output of reduction 'none'
    hidden: Tensor,  # (N, D)
    weight: Tensor,  # (V, D)
    bias: Optional[Tensor],  # (V,)
    target: Tensor,  # (N,)
    class_weight: Optional[Tensor],  # (V,)
    ignore_index: Optional[int],
    label_smoothing: float,
    smoothing: str,
    scale: float,
    kl: bool,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    uniform_rows: Optional[Tensor],  # (N,) bool
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) of sum_i grad_loss_i * loss_i, recomputing chunk by chunk."""
    form, (a, b, _) = _form_and_coefficients(ignore_index, "none", label_smoothing, smoothing, scale, kl, z_loss,
                                             softcap, logit_scale, uniform_rows, weight.shape[0])
    return _backward_rows(grad_loss, hidden, weight, bias, target, class_weight, ignore_index, a, b, form.z_loss,
                          form.softcap or 0.0, form.logit_scale, chunk_size)


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, smoothing, scale, kl,
      z_loss, softcap, logit_scale, uniform_rows, chunk_size):
    gb = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, smoothing, scale, kl,
     z_loss, softcap, logit_scale, uniform_rows, loss_dtype, compute_grad, chunk_size) = inputs
    ctx.has_bias = bias is not None
    ctx.reduction = reduction
    ctx.compute_grad = compute_grad
    ctx.mark_non_differentiable(*output[1:])  # z_term is for logging; the gradients are results
    # Otherwise autograd hands backward zero "gradients" for those outputs: a (V, D) and an (N, D)
    # buffer allocated only to be ignored.
    ctx.set_materialize_grads(False)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, uniform_rows)
        ctx.params = (ignore_index, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale)
        ctx.chunk_size = chunk_size
    else:
        ctx.save_for_backward(*output[2:])


def _backward(ctx, grad_loss, grad_z_term, *_unused):
    if grad_loss is None:  # only the non-differentiable outputs were used
        return (None,) * _OP_ARGS
    if ctx.reduction == "none":
        hidden, weight, bias, target, class_weight, uniform_rows = ctx.saved_tensors
        grad_h, grad_w, grad_b = torch.ops.smoothce.linear_cross_entropy_backward(
            grad_loss, hidden, weight, bias, target, class_weight, *ctx.params, uniform_rows, ctx.chunk_size)
    else:
        if not ctx.compute_grad:
            raise RuntimeError(
                "smoothce::linear_cross_entropy was called with compute_grad=False; "
                "call it with compute_grad=True to differentiate it")
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype)
        grad_w = grad_w * grad_loss.to(grad_w.dtype)
        grad_b = grad_b * grad_loss.to(grad_b.dtype)
    return (grad_h, grad_w, grad_b if ctx.has_bias else None) + (None,) * (_OP_ARGS - 3)


_OP_ARGS = 18  # inputs of smoothce::linear_cross_entropy


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# public functional
# ------------------------------------------------------------------------------------------------
def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor] = None,
    *,
    ignore_index: Optional[int] = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    smoothing: str = "all",
    scale: float = 1.0,
    kl: bool = False,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    uniform_rows: Optional[Tensor] = None,
    loss_dtype: Optional[torch.dtype] = None,
    chunk_size: Optional[int] = None,
    return_z_loss: bool = False,
):
    """The loss LossForm(ignore_index, reduction, label_smoothing, ...) describes, of the logits
    ``softcap(logit_scale * (hidden @ weight.T + bias))``, without materialising them.

    hidden (..., D), weight (V, D), bias (V,) or None, target (...) class indices, class_weight (V,)
    or None. The loss is that of ``fused_cross_entropy`` in kernels/cross_entropy.py with the same
    keywords. ``reduction='none'`` returns a loss with target's shape. ``loss_dtype``: the returned
    loss's dtype (default: hidden's). ``chunk_size`` overrides the rows per chunk (default
    :func:`chunk_rows`). With ``return_z_loss`` returns ``(loss, z_term)``, z_term being the
    (non-differentiable) z-loss part.
    """
    form = LossForm(ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale)
    check_tensors(hidden=hidden, weight=weight, target=target)
    check_dtype("hidden", hidden, FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
    if hidden.dim() < 1:
        raise ValueError("smoothce: hidden must have shape (..., D), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"smoothce: weight must have shape (V, D), got {tuple(weight.shape)}")
    v, d = weight.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"smoothce: hidden's last dim must equal weight's D = {d}: hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    check_labels(target, hidden.shape[:-1], f"hidden shape {tuple(hidden.shape)} without its last dim")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"smoothce: weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (v,):
            raise ValueError(f"smoothce: bias must have shape ({v},), got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"smoothce: bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    if class_weight is not None:
        check_per_class("class_weight", class_weight, v)
    check_same_device("hidden", hidden=hidden, weight=weight, target=target, bias=bias, class_weight=class_weight)
    if uniform_rows is not None:
        raise ValueError("smoothce: fused_linear_cross_entropy does not take uniform_rows yet; "
                         "use fused_cross_entropy on the logits")
    check_loss_dtype(loss_dtype)
    if chunk_size is None:
        chunk_size = 0
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"smoothce: chunk_size={chunk_size!r} must be a positive int or None")

    compute_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, weight, bias) if t is not None)
    loss, z_term, *_ = torch.ops.smoothce.linear_cross_entropy(
        hidden.reshape(-1, d), weight, bias, target.reshape(-1), class_weight, *form.as_args(), None, loss_dtype,
        compute_grad, chunk_size)
    if reduction == "none":
        loss = loss.view(target.shape)
        z_term = z_term.view(target.shape)
    return (loss, z_term.detach()) if return_z_loss else loss
