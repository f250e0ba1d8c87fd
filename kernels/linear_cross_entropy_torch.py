"""The fused LM head's chunk loop in torch ops: CPU, and float64 anywhere.

Chunk logits are computed in the accumulation dtype (fp32; fp64 for fp64 input); a 16-bit head's
matmul runs in its own dtype, so the loss is that of the rounded logits F.linear returns. Without a
softcap the gradient is factored through the softmax (:func:`_softmax_grads_finish`): a chunk
costs one softmax pass in place, and the label and smoothing terms go through
(N, D)-sized work once, after the chunk buffer is freed. With a softcap the gradient is written
explicitly, over cache-sized blocks of in-place elementwise ops. Weight and bias gradients
accumulate in the accumulation dtype, which is the weight's own on CPU's usual fp32.

Every parallel op costs a thread barrier, which a busy machine makes expensive (a scheduler time
slice when another process holds the cores), so a chunk runs as few ops as its math allows.

Layout, low to high: per-chunk math (explicit over blocks; softmax-factored) -> the chunk loop ->
the deferred gradient terms.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

__all__ = ["head_logits", "torch_chunks"]

# With a softcap, a chunk's dozen elementwise passes run over blocks of about this many logits
# (16 MiB in fp32, half a typical L3), so a block stays in cache across them. Blocks much smaller
# than this lose more to per-op thread synchronisation than they gain in cache hits on a busy
# 2-core machine. (Without a softcap a chunk takes two passes, over the whole chunk at once.)
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


# p_y below this (2^-100) is too close to fp32's subnormal range for x_y - log p_y to be lse.
_TINY = 2.0 ** -100


def _chunk_softmax(
    x: Tensor,  # (R, V) logits in the acc dtype; overwritten with softmax(x), or log_softmax(x) without p
    y: Tensor,  # (R, 1) int64 labels, ignored / bad ones replaced by 0
    wy: Tensor,  # (R,) w[y_i]
    row_mask: Tensor,  # (R,) 1, 0 for ignored rows, nan for labels out of range
    w_sum: float | Tensor,  # sum_j w_j
    sx: Optional[Tensor],  # (R,) sum_j w_j x_ij, needed when b != 0
    a: float, b: float, c: float, z: float,
    p: bool,  # leave the softmax in x (for the gradient)
    recompute,  # rows -> those rows' logits again (from the hidden states)
) -> tuple[Tensor, Tensor, Tensor]:
    """ce_i, z_i and lse_i of a chunk of rows without a softcap.

    One elementwise pass, one parallel op: softmax in place when the gradient needs p (lse = x_y -
    log p_y), else log_softmax (lse = x_y - logp_y). Then
    ce_i = -a w[y] logp_iy - b (sum_j w_j x_ij - lse_i sum_j w_j) + c,
    with sum_j w_j x_ij = sx_i given by the caller (from the hidden state, no pass over x). A row
    whose p_y underflows (a confidently wrong model) has its logits recomputed for an exact lse;
    on CPU finding such rows costs no device sync, elsewhere log_softmax and exp keep it exact.
    """
    x_y = x.gather(1, y).squeeze(1)
    if p and x.device.type == "cpu":
        torch.softmax(x, dim=1, out=x)  # in place: the row kernel reads a row before writing it
        p_y = x.gather(1, y).squeeze(1)
        lse = x_y - p_y.log()
        tiny = (row_mask != 0) & ~(p_y >= _TINY)
        if bool(tiny.any()):
            rows = tiny.nonzero().squeeze(1)
            lse[rows] = torch.logsumexp(recompute(rows), dim=1)
        lp_y = x_y - lse
    else:
        torch.log_softmax(x, dim=1, out=x)
        lp_y = x.gather(1, y).squeeze(1)
        lse = x_y - lp_y
        if p:
            x.exp_()
    ce = c - a * wy * lp_y
    if b:
        ce = ce - b * (sx - lse * w_sum)
    ce = ce * row_mask
    z_rows = z * lse * lse * row_mask if z else torch.zeros_like(ce)
    return ce, z_rows, lse


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


def torch_chunks(hidden, weight, bias, tg, ignore_index, a, b, c, z, softcap, logit_scale, scales, row_grad, rows):
    """Per-row ce_i / z_i over chunks of ``rows`` rows. With ``scales`` ((2,) tensor: d(result)/d(ce_i)
    and d(result)/d(z_i) for counted rows, times ``row_grad`` (N,) if given) also the gradients of the
    result with respect to hidden, weight and bias, in their dtypes."""
    n, d = hidden.shape
    v = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    w_work = weight.to(acc)  # no copy for fp32 / fp64 weights
    b_work = None if bias is None else bias.to(acc)
    ce_rows = torch.empty(n, dtype=acc, device=dev)
    z_rows = torch.zeros(n, dtype=acc, device=dev)
    grads = scales is not None
    grad_h = grad_w = grad_b = None
    if grads:
        grad_h = torch.empty(n, d, dtype=hidden.dtype, device=dev)
        # written by the first chunk's GEMM, accumulated into by the others
        grad_w = torch.empty(v, d, dtype=acc, device=dev) if n else torch.zeros(v, d, dtype=acc, device=dev)
        grad_b = torch.zeros(v, dtype=acc, device=dev) if bias is not None else None
        scales = scales * logit_scale  # chain through logits = logit_scale * (hidden @ weight.T + bias)
        gce = torch.where(tg.valid, scales[0] * tg.row_mask, 0.0)
        gz = torch.where(tg.valid, scales[1] * tg.row_mask, 0.0)
        if row_grad is not None:
            gce, gz = gce * row_grad, gz * row_grad

    softmax_path = not softcap
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

    buf = torch.empty(min(rows, n), v, dtype=acc, device=dev)  # reused by every chunk
    # 16-bit heads: the logits F.linear returns are rounded to its dtype, and the loss is of those.
    # The chunk's matmul runs in that dtype, as F.linear's does, then is read into the fp32 chunk.
    rounded = hidden.dtype != acc
    low_buf = torch.empty(min(rows, n), v, dtype=hidden.dtype, device=dev) if rounded else None
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h = hidden[start:end].to(acc)
        logits = buf[: end - start]
        # (C, D) x (D, V) -> (C, V), logit_scale folded into the matmul
        if rounded:
            low = low_buf[: end - start]
            if bias is None:
                torch.mm(hidden[start:end], weight.t(), out=low)
            else:
                torch.addmm(bias, hidden[start:end], weight.t(), out=low)
            logits.copy_(low)
            if logit_scale != 1.0:
                logits.mul_(logit_scale)
        elif b_work is None:
            torch.mm(h, w_work.t(), out=logits)
            if logit_scale != 1.0:
                logits.mul_(logit_scale)
        else:
            torch.addmm(b_work, h, w_work.t(), beta=logit_scale, alpha=logit_scale, out=logits)
        if softcap:
            _chunk_ce_torch(logits, start, tg, ce_rows, z_rows, a, b, c, z, softcap,
                            gce if grads else None, gz if grads else None)
            if grads:
                # logits now holds d(result)/d(hidden @ weight.T + bias) for the chunk.
                if grad_h.dtype == acc:
                    torch.mm(logits, w_work, out=grad_h[start:end])
                else:
                    grad_h[start:end].copy_(torch.mm(logits, w_work))
                torch.addmm(grad_w, logits.t(), h, beta=1.0 if start else 0.0, out=grad_w)
                if grad_b is not None:
                    grad_b += logits.sum(dim=0)
            continue
        sx = None
        if b and rounded:  # of the rounded logits themselves
            sx = logits.sum(dim=1) if tg.class_weight is None else torch.mv(logits, tg.class_weight)
        elif b:
            # sum_j w_j x_ij = logit_scale (h_i . sum_j w_j W_j + sum_j w_j bias_j): (C, D) work
            # instead of a pass over the (C, V) logits.
            sx = torch.mv(h, u)
            if wb is not None:
                sx += wb
            if logit_scale != 1.0:
                sx *= logit_scale
        ce_rows[start:end], z_rows[start:end], lse_rows[start:end] = _chunk_softmax(
            logits, tg.y[start:end, None], tg.wy[start:end], tg.row_mask[start:end], tg.w_sum, sx, a, b, c, z, grads,
            functools.partial(_logits_of_rows, hidden, weight, bias, start, logit_scale, acc))
        if grads:
            # Only the coef_i p_ij part per chunk (see _softmax_grads_finish).
            coef = gce[start:end] * (a * tg.wy[start:end] + b * tg.w_sum)
            if z:
                coef = coef + (2.0 * z) * lse_rows[start:end] * gz[start:end]
            coef_rows[start:end] = coef
            torch.mm(logits, w_work, out=gh_acc[start:end])
            torch.addmm(grad_w, logits.t(), h * coef.unsqueeze(1), beta=1.0 if start else 0.0, out=grad_w)
            if grad_b is not None:
                grad_b.addmv_(logits.t(), coef)
    buf = logits = None  # the finish's (N, D) temporaries take the chunk's place, not more
    if grads and softmax_path:
        _softmax_grads_finish(hidden, gh_acc, grad_w, grad_b, tg, a, b, gce, coef_rows, w_work, u)
        if gh_acc is not grad_h:
            grad_h.copy_(gh_acc)
    if grads:
        # Half-precision weights on this path: the fp32 sums rounded once, here.
        grad_w = grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return ce_rows, z_rows, grad_h, grad_w, grad_b


def _logits_of_rows(hidden, weight, bias, start, logit_scale, acc, rows):
    """The logits of rows ``start + rows`` as the chunk loop computes them."""
    return head_logits(hidden[start + rows], weight, bias, acc) * logit_scale


def head_logits(h, weight, bias, acc):
    """h @ weight.T + bias in the accumulation dtype ``acc``, the matmul in the head's own dtype (a
    16-bit head's logits rounded as F.linear returns them)."""
    x = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
    return x.to(acc)


def _softmax_grads_finish(hidden, grad_h, grad_w, grad_b, tg, a, b, gce, coef_rows, w_work, u):
    """The parts of the softmax path's gradients that are not p, applied once for all rows.

    g_ij = coef_i p_ij - k_i w_j - s_i [j == y_i] with coef_i = gce_i Q_i + 2 z lse_i gz_i,
    k_i = gce_i b, s_i = gce_i a w[y_i]. Only the coef p part needs the chunk (the chunk loop adds
    p^T (coef h) to grad_W, p^T coef to grad_b, and leaves p W in grad_h); the rest factors through
    vectors, so the only passes over a chunk are its log_softmax and exp, and the rest costs a
    handful of (N, D) ops for all chunks together (each parallel op costs a thread barrier, which
    a busy machine makes expensive):
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
