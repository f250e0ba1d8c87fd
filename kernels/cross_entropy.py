"""Fused (label-smoothed) cross-entropy: one pass computes the loss AND d(loss)/d(logits).

Every way people write cross-entropy reduces to a cross-entropy against a target distribution
built from the labels. For a row i with label y_i, class weights w (all ones without weight) and
x = logits (after the optional softcap x -> cap * tanh(x / cap)):

    q_ij   = a * w[y_i] * [j == y_i] + b * w_j                     (target distribution)
    loss_i = sum_j q_ij * (lse_i - x_ij) + c + z * lse_i^2
           = Q_i * lse_i - a * w[y_i] * x_iy - b * sum_j w_j x_ij + c + z * lse_i^2,
    Q_i    = a * w[y_i] + b * sum_j w_j.

F.cross_entropy(label_smoothing=eps) is a = 1 - eps, b = eps / C; "eps / (C - 1) on the other
classes" is a = 1 - eps - eps / (C - 1), b = eps / (C - 1); a KL divergence against a smoothed
distribution p adds c = sum_j p_j log p_j. Since d lse_i / d x_ij = softmax_ij = p_ij,

    d loss_i / d x_ij = (Q_i + 2 z lse_i) * p_ij - a * w[y_i] * [j == y_i] - b * w_j,

times 1 - (x_ij / cap)^2 under a softcap. Rows whose label is ignore_index contribute 0.
'mean' divides the cross-entropy part by sum of w[y_i] over non-ignored rows (PyTorch's rule,
which keeps smoothing and weights consistent) and the z part by the count of non-ignored rows.
Those divisors depend only on the labels, so they are computed before the logits are read and
the kernel writes the finished gradient in the same launch: backward only scales it by
grad_output. Nothing here synchronises with the device.

Layout: low to high. Triton kernel -> its launcher -> the torch implementation (CPU) ->
the torch.ops.smoothce.cross_entropy custom op, its fake and autograd -> public functionals.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from smoothce.kernels.checks import check_labels_on_cpu
from smoothce.kernels.form import LossForm

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# --------------------------------------------------------------------------------------------
# Triton kernel: one program per row
# --------------------------------------------------------------------------------------------


@triton.jit
def _softcap(x, cap):
    # cap * tanh(x / cap) through exp, which every Triton backend (and the interpreter) has;
    # saturates to +-cap without overflow trouble: exp(+inf) gives 1 - 0, exp(-inf) gives 1 - 2.
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))


@triton.jit
def _cross_entropy_kernel(
    # pointers
    x_ptr,  # (N, C, S) logits, any strides
    y_ptr,  # (N, S) labels
    u_ptr,  # (N, S) bool: rows whose smoothing (b) term counts; read only when HAS_UNIFORM_ROWS
    w_ptr,  # (C,) class weights; read only when HAS_WEIGHT
    scale_ptr,  # (2,) gradient scales in ACC: [cross-entropy part, z part]
    loss_ptr,  # (N * S,) per-row cross-entropy part, in ACC
    z_ptr,  # (N * S,) per-row z part, in ACC; written only when HAS_ZLOSS
    g_ptr,  # (N, C, S) gradient, any strides; written only when COMPUTE_GRAD
    # shapes
    C,
    S,
    # strides
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_ys,
    stride_un,
    stride_us,
    stride_gn,
    stride_gc,
    stride_gs,
    # constants
    ignore_index,
    a,
    b,
    c,
    zc,
    cap,
    logit_scale,
    HAS_IGNORE: tl.constexpr,
    HAS_UNIFORM_ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 row offsets: N * C passes 2^31 at LLM sizes (8192 x 262144).
    row = tl.program_id(0).to(tl.int64)
    n = row // S
    s = row % S
    x_row = x_ptr + n * stride_xn + s * stride_xs
    y = tl.load(y_ptr + n * stride_yn + s * stride_ys).to(tl.int64)
    in_range = (y >= 0) & (y < C)
    # Out-of-range labels are never dereferenced: they read column 0 and poison the row with nan.
    y_safe = tl.where(in_range, y, 0)
    # label_on multiplies the label (a) term, c and z: 1, 0 on ignored rows, nan for a bad label
    # (as loud as we can be without a sync). uniform_on multiplies the smoothing (b) term.
    label_on = tl.where(in_range, 1.0, float("nan")).to(ACC)
    if HAS_IGNORE:
        label_on = tl.where(y == ignore_index, 0.0, label_on)
    if HAS_UNIFORM_ROWS:
        uniform_on = tl.load(u_ptr + n * stride_un + s * stride_us).to(ACC)
    else:
        uniform_on = label_on

    # Pass 1: online max / sum-exp, and the weighted sums the smoothing term needs.
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((), ACC)
    sum_wx = tl.zeros((), ACC)
    sum_w = tl.zeros((), ACC)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=mask, other=0.0).to(ACC) * logit_scale
        if HAS_SOFTCAP:
            x = _softcap(x, cap)
        if HAS_SMOOTHING:  # masked lanes hold x = 0 and w = 0 here
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
            else:
                w = mask.to(ACC)
            sum_wx += tl.sum(w * x, 0)
            sum_w += tl.sum(w, 0)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)

    x_y = tl.load(x_row + y_safe * stride_xc).to(ACC) * logit_scale
    if HAS_SOFTCAP:
        x_y = _softcap(x_y, cap)
    if HAS_WEIGHT:
        w_y = tl.load(w_ptr + y_safe).to(ACC)
    else:
        w_y = 1.0
    ce = label_on * (a * w_y * (lse - x_y) + c)
    if HAS_SMOOTHING:
        ce += uniform_on * b * (sum_w * lse - sum_wx)
    tl.store(loss_ptr + row, ce)
    if HAS_ZLOSS:
        tl.store(z_ptr + row, zc * lse * lse * label_on)

    if COMPUTE_GRAD:
        # Rows that do not count get an exact 0 gradient even when 'mean' found no row (1 / 0
        # scale), as in PyTorch, whose loss is nan there but whose gradient is 0. logit_scale
        # chains the gradient back through x -> logit_scale * x.
        ce_scale = tl.load(scale_ptr)
        s_label = tl.where(label_on == 0.0, 0.0, ce_scale * label_on) * logit_scale
        if HAS_UNIFORM_ROWS:
            s_uniform = tl.where(uniform_on == 0.0, 0.0, ce_scale * uniform_on) * logit_scale
        else:
            s_uniform = s_label
        coef_y = s_label * a * w_y
        coef_w = s_uniform * b
        coef_p = coef_y
        if HAS_SMOOTHING:
            coef_p += coef_w * sum_w
        if HAS_ZLOSS:
            z_scale = tl.load(scale_ptr + 1)
            coef_p += tl.where(label_on == 0.0, 0.0, z_scale * label_on) * logit_scale * 2.0 * zc * lse
        g_row = g_ptr + n * stride_gn + s * stride_gs
        # Pass 2: re-read the row (mostly from L2) and write the finished gradient.
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < C
            x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=mask, other=0.0).to(ACC) * logit_scale
            if HAS_SOFTCAP:
                x = _softcap(x, cap)
            g = coef_p * tl.exp(x - lse) - tl.where(cols == y, coef_y, 0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
                    g -= coef_w * w
                else:
                    g -= coef_w
            if HAS_SOFTCAP:
                g *= 1.0 - (x / cap) * (x / cap)
            tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(g_ptr.dtype.element_ty), mask=mask)


def launch_cross_entropy(x3, y2, weight, scales, ce_rows, z_rows, grad3, *, ignore_index, a, b, c, z_loss,
                         softcap, logit_scale=1.0, uniform_rows=None):
    """Runs the Triton kernel over the (N, C, S) view; fills ce_rows, z_rows and grad3 (if given).

    (a, b, c) are LossForm.coefficients(C); softcap is None or > 0; uniform_rows (N, S) bool or None.
    """
    N, C, S = x3.shape
    if N * S == 0:
        return
    block = min(triton.next_power_of_2(C), 4096 if x3.element_size() >= 4 else 8192)
    g = grad3 if grad3 is not None else x3  # never written when COMPUTE_GRAD is off
    u = uniform_rows if uniform_rows is not None else y2
    _cross_entropy_kernel[(N * S,)](
        x3, y2, u, weight if weight is not None else x3, scales, ce_rows, z_rows, g,
        C, S,
        x3.stride(0), x3.stride(1), x3.stride(2), y2.stride(0), y2.stride(1), u.stride(0), u.stride(1),
        g.stride(0), g.stride(1), g.stride(2),
        ignore_index if ignore_index is not None else 0, a, b, c, z_loss, softcap or 1.0, logit_scale,
        HAS_IGNORE=ignore_index is not None,
        HAS_UNIFORM_ROWS=uniform_rows is not None,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=b != 0.0,
        HAS_ZLOSS=z_loss != 0.0,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=grad3 is not None,
        ACC=tl.float64 if x3.dtype == torch.float64 else tl.float32,
        BLOCK=block,
        num_warps=16 if block >= 8192 else 8,
    )


# --------------------------------------------------------------------------------------------
# torch implementation (CPU, and SMOOTHCE_KERNEL=torch anywhere)
# --------------------------------------------------------------------------------------------

# Rows are processed in chunks of about this many elements: a chunk's fp32 working copy stays in
# cache while the dozen elementwise passes run over it, and no N x C temporary ever exists.
_TORCH_CHUNK_ELEMENTS = 1 << 19


def torch_cross_entropy(x3, y2, weight, scales, ce_rows, z_rows, grad3, *, ignore_index, a, b, c, z_loss,
                        softcap, logit_scale=1.0, uniform_rows=None):
    """Same contract as launch_cross_entropy, in torch ops, chunk by chunk over the batch dim."""
    N, C, S = x3.shape
    acc = torch.float64 if x3.dtype == torch.float64 else torch.float32
    dev = x3.device
    rows_per_chunk = max(1, _TORCH_CHUNK_ELEMENTS // max(C * S, 1))
    # Work on (N, C) when S == 1: a trailing size-1 dim sends reductions over dim 1 down a slow
    # strided path (about 20x slower on CPU). Everything below reduces over dim 1 either way.
    u3 = uniform_rows
    if S == 1:
        x3, y3, grad3 = x3.view(N, C), y2, grad3.view(N, C) if grad3 is not None else None
        row_shape, w_shape = (N, 1), (1, C)
    else:
        y3 = y2.unsqueeze(1)
        u3 = u3.unsqueeze(1) if u3 is not None else None
        row_shape, w_shape = (N, 1, S), (1, C, 1)
    w3 = weight.to(acc).view(w_shape) if weight is not None else None
    sum_w = w3.sum() if w3 is not None else float(C)
    ce_scale, z_scale = scales[0], scales[1]
    transformed = softcap is not None or logit_scale != 1.0
    for n0 in range(0, N, rows_per_chunk):
        n1 = min(N, n0 + rows_per_chunk)
        y = y3[n0:n1].long()  # (n, 1, S) or (n, 1)
        in_range = (y >= 0) & (y < C)
        y_safe = torch.where(in_range, y, 0)
        # label_on multiplies the label (a) term, c and z: 1, 0 on ignored rows, nan for a bad
        # label; uniform_on multiplies the smoothing (b) term.
        label_on = torch.where(in_range, 1.0, float("nan")).to(acc)
        if ignore_index is not None:
            label_on = torch.where(y == ignore_index, 0.0, label_on)
        uniform_on = u3[n0:n1].to(acc) if u3 is not None else label_on

        # The chunk's working buffer: the gradient rows themselves when they are in acc already
        # (fp32 input with grad), so the finished gradient needs no final copy. Passes over the
        # (cache-resident) chunk: max, [smoothing sum], x - max, exp, sum, and the gradient's one
        # multiply-add.
        in_place = grad3 is not None and grad3.dtype == acc
        src = x3[n0:n1]
        work = grad3[n0:n1] if in_place else torch.empty(src.shape, dtype=acc, device=dev)
        if transformed:
            src = src.to(acc, copy=True).mul_(logit_scale)
            if softcap is not None:
                src.div_(softcap).tanh_().mul_(softcap)
        x_y = src.gather(1, y_safe).to(acc)
        w_y = w3.view(-1)[y_safe] if w3 is not None else 1.0
        m = src.amax(1, keepdim=True).to(acc)
        sum_wx = None
        if b != 0.0:
            sum_wx = (src * w3).sum(1, keepdim=True) if w3 is not None else src.sum(1, keepdim=True, dtype=acc)
        torch.sub(src, m, out=work).exp_()  # work = exp(x - m)
        d = work.sum(1, keepdim=True)
        lse = m + d.log()
        ce = label_on * (a * w_y * (lse - x_y) + c)
        if b != 0.0:
            ce = ce + uniform_on * b * (sum_w * lse - sum_wx)
        ce_rows.view(row_shape)[n0:n1] = ce
        if z_loss != 0.0:
            z_rows.view(row_shape)[n0:n1] = z_loss * lse * lse * label_on
        if grad3 is None:
            continue

        # Rows that do not count: exactly 0 even when 'mean' found no row at all (1 / 0 scale),
        # as PyTorch. logit_scale chains the gradient back through x -> logit_scale * x.
        s_label = torch.where(label_on == 0.0, 0.0, ce_scale * label_on) * logit_scale
        s_uniform = s_label if u3 is None else torch.where(uniform_on == 0.0, 0.0, ce_scale * uniform_on) * logit_scale
        coef_y = s_label * a * w_y
        coef_w = s_uniform * b
        coef_p = coef_y + coef_w * sum_w if b != 0.0 else coef_y
        if z_loss != 0.0:
            coef_p = coef_p + torch.where(label_on == 0.0, 0.0, z_scale * label_on) * logit_scale * 2.0 * z_loss * lse
        # (Q + 2 z lse) * softmax - b w, in one pass where w is uniform.
        if b != 0.0 and w3 is None:
            torch.addcmul(-coef_w, work, coef_p / d, out=work)
        else:
            work.mul_(coef_p / d)
            if b != 0.0:
                work.addcmul_(coef_w, w3, value=-1.0)
        work.scatter_add_(1, y_safe, -coef_y.expand_as(y_safe))
        if softcap is not None:
            t = x3[n0:n1].to(acc, copy=True).mul_(logit_scale).div_(softcap).tanh_()  # never in place on the input
            work.mul_(t.mul_(t).neg_().add_(1.0))
        if not in_place:
            grad3[n0:n1] = work


def kernel_choice(logits: torch.Tensor) -> str:
    """'triton' or 'torch' for these logits: SMOOTHCE_KERNEL when set, else triton on CUDA."""
    forced = os.environ.get("SMOOTHCE_KERNEL", "").strip().lower()
    if forced not in ("", "auto", "triton", "torch"):
        raise ValueError(f"SMOOTHCE_KERNEL={forced!r}: expected 'triton', 'torch' or 'auto'")
    if forced == "torch" or logits.dtype == torch.float64 and forced != "triton":
        return "torch"
    if forced == "triton":
        if logits.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"SMOOTHCE_KERNEL=triton on a {logits.device.type} tensor needs TRITON_INTERPRET=1 "
                "set before smoothce's kernels are imported"
            )
        return "triton"
    return "triton" if logits.device.type == "cuda" else "torch"


# --------------------------------------------------------------------------------------------
# The custom op
# --------------------------------------------------------------------------------------------


def _as_rows(logits, target):
    """(N, C, d1, ...) -> an (N, C, S) view and (N, S) labels; C is dim 1 as in F.cross_entropy."""
    N, C = logits.shape[0], logits.shape[1]
    S = math.prod(logits.shape[2:])  # not -1: ambiguous when N = 0
    return logits.reshape(N, C, S), target.reshape(N, S)


def _divisors(y2, weight, ignore_index, C, acc):
    """Mean divisors from the labels alone: sum of w[y] and count over non-ignored rows."""
    if ignore_index is None:
        valid = torch.ones_like(y2, dtype=torch.bool)
    else:
        valid = y2 != ignore_index
    count = valid.sum(dtype=acc)
    if weight is None:
        return count, count
    w_y = weight.to(acc)[torch.where(valid & (y2 >= 0) & (y2 < C), y2, 0).long()]
    return torch.where(valid, w_y, 0.0).sum(), count


@torch.library.custom_op("smoothce::cross_entropy", mutates_args=())
def cross_entropy_op(
    logits: torch.Tensor,  # (N, C, d1, ...)
    target: torch.Tensor,  # (N, d1, ...) int
    weight: Optional[torch.Tensor],  # (C,)
    ignore_index: Optional[int],
    reduction: str,
    label_smoothing: float,
    smoothing: str,
    scale: float,
    kl: bool,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    uniform_rows: Optional[torch.Tensor],  # (N, d1, ...) bool
    loss_dtype: Optional[torch.dtype],
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_term, gradient of the loss for grad_output = 1); the loss as LossForm describes it."""
    form = LossForm(ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale)
    if uniform_rows is not None and reduction == "mean":
        raise ValueError("smoothce: reduction='mean' with uniform_rows has no single divisor; use 'sum' or 'none'")
    x3, y2 = _as_rows(logits, target)
    u2 = uniform_rows.reshape(y2.shape) if uniform_rows is not None else None
    N, C, S = x3.shape
    a, b, c = form.coefficients(C)
    if logits.device.type == "cpu":
        check_labels_on_cpu(y2, C, ignore_index)
    # Per-row results and scales in the accumulation dtype: fp32, or fp64 for fp64 input.
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ce_div, z_div = _divisors(y2, weight, ignore_index, C, acc)
    one = torch.ones((), device=logits.device, dtype=acc)
    scales = torch.stack([one / ce_div, one / z_div]) if reduction == "mean" else torch.stack([one, one])
    ce_rows = torch.empty(N * S, device=logits.device, dtype=acc)
    z_rows = torch.zeros(N * S, device=logits.device, dtype=acc)
    grad = torch.empty_like(logits) if compute_grad else None
    grad3 = grad.view(N, C, S) if grad is not None else None
    run = launch_cross_entropy if kernel_choice(logits) == "triton" else torch_cross_entropy
    run(x3, y2, weight, scales, ce_rows, z_rows, grad3, ignore_index=ignore_index, a=a, b=b, c=c,
        z_loss=form.z_loss, softcap=form.softcap, logit_scale=form.logit_scale, uniform_rows=u2)

    if reduction == "none":
        z = z_rows.view(target.shape)
        loss = ce_rows.view(target.shape) + z
    elif reduction == "sum":
        z = z_rows.sum()
        loss = ce_rows.sum() + z
    else:
        z = z_rows.sum() / z_div if z_loss != 0.0 else z_rows.sum()
        loss = ce_rows.sum() / ce_div + z
    dtype = loss_dtype or logits.dtype
    empty = logits.new_empty(0)
    return loss.to(dtype), z.to(dtype), grad if grad is not None else empty


@cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap,
      logit_scale, uniform_rows, loss_dtype, compute_grad):
    shape = target.shape if reduction == "none" else ()
    dtype = loss_dtype or logits.dtype
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return logits.new_empty(shape, dtype=dtype), logits.new_empty(shape, dtype=dtype), grad


_OP_ARGS = 15


def _setup_context(ctx, inputs, output):
    _, grad = output[0], output[2]
    ctx.reduction = inputs[4]
    ctx.compute_grad = inputs[-1]
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(output[1], output[2])
    # Otherwise autograd hands backward a zeros((N, C)) "gradient" for the unused grad output:
    # a whole extra logits-sized buffer.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_z, grad_grad):
    if not ctx.compute_grad:
        raise RuntimeError(
            "smoothce::cross_entropy ran with compute_grad=False (no gradient was stored); "
            "call it with compute_grad=True to differentiate it"
        )
    (grad,) = ctx.saved_tensors
    scale = grad_loss.unsqueeze(1) if ctx.reduction == "none" else grad_loss
    rest = (None,) * (_OP_ARGS - 1)
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        # Traced (fake / functional tensors) or a tensor subclass: out of place, since the
        # partitioner rejects a mutated saved tensor; Inductor may still reuse the saved buffer,
        # which is donated to backward. The product rounds once, to the logits' dtype.
        return ((grad * scale).to(grad.dtype),) + rest
    # Eager: in place, so the stored gradient becomes the logits' gradient and backward allocates
    # no second N x C buffer. A second backward through the same graph raises (version counter)
    # instead of scaling twice.
    return (grad.mul_(scale),) + rest


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------


def _validate(logits, target, weight, uniform_rows, loss_dtype, form: LossForm):
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"smoothce: input and target must be tensors, got {type(logits).__name__} "
                        f"and {type(target).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"smoothce: input dtype {logits.dtype} is not supported; expected one of "
                        "float16, bfloat16, float32, float64")
    if target.dtype.is_floating_point:
        raise TypeError(f"smoothce: target dtype {target.dtype} looks like class probabilities; "
                        "smoothce takes class indices (int64 or int32)")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"smoothce: target dtype {target.dtype} is not supported; expected int64 or int32")
    if logits.dim() < 2:
        raise ValueError(f"smoothce: input must have shape (N, C) or (N, C, d1, ...), got {tuple(logits.shape)}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"smoothce: target shape {tuple(target.shape)} does not match input shape "
                         f"{tuple(logits.shape)} (expected {expected}: the class dim is 1)")
    if target.device != logits.device:
        raise ValueError(f"smoothce: target is on {target.device} but input is on {logits.device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != logits.shape[1]:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"smoothce: weight must have shape ({logits.shape[1]},) (one per class), got {got}")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"smoothce: weight dtype {weight.dtype} must be floating point")
        if weight.device != logits.device:
            raise ValueError(f"smoothce: weight is on {weight.device} but input is on {logits.device}")
        if weight.requires_grad:
            raise ValueError("smoothce: a weight that requires grad is not supported (its gradient "
                             "would be dropped); pass weight.detach()")
    if uniform_rows is not None:
        if not isinstance(uniform_rows, torch.Tensor) or uniform_rows.dtype != torch.bool:
            got = uniform_rows.dtype if isinstance(uniform_rows, torch.Tensor) else type(uniform_rows).__name__
            raise TypeError(f"smoothce: uniform_rows must be a bool tensor, got {got}")
        if tuple(uniform_rows.shape) != tuple(target.shape):
            raise ValueError(f"smoothce: uniform_rows shape {tuple(uniform_rows.shape)} must equal target "
                             f"shape {tuple(target.shape)}")
        if uniform_rows.device != logits.device:
            raise ValueError(f"smoothce: uniform_rows is on {uniform_rows.device} but input is on {logits.device}")
        if form.reduction == "mean":
            raise ValueError("smoothce: reduction='mean' with uniform_rows has no single divisor; "
                             "use 'sum' or 'none'")
        if form.kl:
            raise ValueError("smoothce: kl=True with uniform_rows is not supported (the KL constant "
                             "belongs to rows where both terms count)")
    if loss_dtype is not None and (not isinstance(loss_dtype, torch.dtype) or not loss_dtype.is_floating_point):
        raise TypeError(f"smoothce: loss_dtype={loss_dtype!r} must be None or a floating point dtype")


def fused_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
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
    uniform_rows: Optional[torch.Tensor] = None,
    loss_dtype: Optional[torch.dtype] = None,
    return_z_loss: bool = False,
):
    """The loss that LossForm(ignore_index, reduction, label_smoothing, ...) describes, through
    smoothce::cross_entropy.

    uniform_rows (bool, target's shape): the smoothing term counts on exactly those rows, the label
    term and z-loss on rows whose label is not ignore_index ('sum' / 'none' only). loss_dtype: the
    returned loss's dtype (default: the logits'). The gradient is computed in the forward launch
    only when autograd will need it.
    """
    form = LossForm(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                    smoothing=smoothing, scale=scale, kl=kl, z_loss=z_loss, softcap=softcap,
                    logit_scale=logit_scale)
    _validate(logits, target, weight, uniform_rows, loss_dtype, form)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, z, _ = torch.ops.smoothce.cross_entropy(
        logits, target, weight, *form.as_args(), uniform_rows, loss_dtype, compute_grad)
    return (loss, z) if return_z_loss else loss


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
):
    """F.cross_entropy with class-index targets (same signature and results), plus z-loss and softcap.

    With return_z_loss=True returns (loss, z_term): the loss includes z_loss * lse^2 (reduced like
    the loss), z_term is that part alone for logging.
    """
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    # As F.cross_entropy: label_smoothing above 1 raises, below 0 means none.
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    eps = max(float(label_smoothing), 0.0)
    if isinstance(input, torch.Tensor) and input.dim() == 1:  # unbatched (C,) with a scalar label
        out = cross_entropy(input.unsqueeze(0), target.unsqueeze(0), weight, None, ignore_index, None, reduction,
                            eps, z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss)
        if reduction != "none":
            return out
        return tuple(t.squeeze(0) for t in out) if return_z_loss else out.squeeze(0)
    return fused_cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=eps, z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss)


def _legacy_reduction(size_average, reduce) -> str:
    from torch.nn import _reduction

    return _reduction.legacy_get_string(size_average, reduce)


class CrossEntropyLoss(torch.nn.Module):
    """nn.CrossEntropyLoss twin backed by the fused op (class-index targets)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None, return_z_loss=False):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_z_loss = return_z_loss

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             return_z_loss=self.return_z_loss)
