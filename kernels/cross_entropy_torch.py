"""smoothce::cross_entropy in torch ops: the CPU path (and SMOOTHCE_KERNEL=torch anywhere).

Same contract and math as the Triton launcher (kernels/cross_entropy_triton.py). Built around
one fused ATen kernel: softmax, which reads a row once from memory (it stays in cache for its
max / exp / scale passes) and writes p. Everything else is one pass or a per-row gather:

    x_y = x[y]            lse = x_y - log p_y             (exact where p_y is a normal float)
    sum_j w_j x_j         one reduction, with smoothing only
    g = coef_p p - coef_w w - coef_y [j == y]             a multiply, a subtraction, a scatter

A row whose p_y is tiny (its lse would lose digits or be infinite) takes lse = max_j x_j -
log max_j p_j instead, which never underflows (max_j p_j >= 1 / V); that costs two reductions
and runs only when such a row exists.

Why so few passes, each over all rows at once: every torch op is a parallel region that waits
for all of torch's threads. Chunked loops of a dozen ops per cache-sized chunk ran thousands of
regions per step, and on a CPU shared with another busy process each region waits for a thread
the OS has parked (9x slower than alone). Here an fp32 step with its gradient runs about six
regions over the whole batch, straight into the gradient buffer; only cases that need a work
buffer (no gradient, a gradient in another dtype, a softcap) go block by block through a
bounded one.
"""

from __future__ import annotations

import torch

from smoothce.kernels.inputs import Labels, acc_dtype

# Rows per block where a work buffer is needed: about this many elements (16 MiB in fp32).
_BLOCK_ELEMENTS = 1 << 22
# p_y below this (2^-100) is too close to fp32's subnormal range for log p_y to be exact.
_TINY = 2.0 ** -100


def torch_cross_entropy(x3, y2, weight, scales, ce_rows, z_rows, grad3, *, ignore_index, a, b, c, z_loss,
                        softcap, logit_scale=1.0, uniform_rows=None, smooth_rows=None):
    """Same contract as launch_cross_entropy: fills ce_rows, z_rows (N * S,) and grad3 (if given);
    with uniform_rows the smoothing part goes to smooth_rows, and scales[2] is its gradient scale."""
    N, C, S = x3.shape
    acc = acc_dtype(x3.dtype)
    labels = Labels(y2, weight, ignore_index, C, acc, uniform_rows)
    # S == 1 works on (N, C): a trailing size-1 dim sends reductions over dim 1 down a slow
    # strided path. Either way classes are dim 1 and per-row quantities are shaped `rows`.
    flat = S == 1
    rows = (N, 1) if flat else (N, 1, S)
    x = x3[:, :, 0] if flat else x3
    grad = None if grad3 is None else grad3[:, :, 0] if flat else grad3
    w = None if weight is None else weight.to(acc).view((1, C) if flat else (1, C, 1))
    per_row = dict(y=labels.y, label_on=labels.row_mask, uniform_on=labels.uniform_mask, w_y=labels.wy)
    per_row = {k: v.reshape(rows) for k, v in per_row.items()}
    ce_out, z_out = ce_rows.view(rows), z_rows.view(rows)
    apart = uniform_rows is not None  # the smoothing part is reduced by its own divisor
    smooth_out = smooth_rows.view(rows) if apart else None

    whole = grad is not None and grad.dtype == acc and softcap is None
    step = max(N, 1) if whole else max(1, _BLOCK_ELEMENTS // max(C * S, 1))
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        block = {k: v[n0:n1] for k, v in per_row.items()}
        work = grad[n0:n1] if whole else torch.empty(x[n0:n1].shape, dtype=acc, device=x.device)
        ce, smooth, z = _block(x[n0:n1], work, w, block, labels.w_sum, scales, grad is not None, apart, a, b, c,
                               z_loss, softcap, logit_scale)
        if apart:
            ce_out[n0:n1] = ce
            smooth_out[n0:n1] = smooth
        else:
            ce_out[n0:n1] = ce + smooth
        z_out[n0:n1] = z
        if grad is not None and not whole:
            grad[n0:n1] = work


def _block(x, work, w, rows, w_sum, scales, compute_grad, apart, a, b, c, z_loss, softcap, logit_scale):
    """Loss parts (label, smoothing, z) of a block of rows (classes on dim 1); with compute_grad,
    work ends as the gradient. work (acc) may be the gradient buffer itself. ``apart``: the
    smoothing part has its own gradient scale, scales[2]."""
    acc = work.dtype
    y, label_on, uniform_on, w_y = rows["y"], rows["label_on"], rows["uniform_on"], rows["w_y"]
    t = None
    if softcap is not None or logit_scale != 1.0:
        # x -> softcap(logit_scale * x) into work; softmax then runs on work in place.
        torch.mul(x, logit_scale, out=work)
        if softcap is not None:
            work.div_(softcap).tanh_()
            t = work.clone() if compute_grad else None  # tanh, for the softcap's derivative
            work.mul_(softcap)
        src = work
    else:
        src = x
    x_y = src.gather(1, y).to(acc)
    sum_wx = None
    if b != 0.0:
        sum_wx = _weighted_sum(src, w if w is not None else x_y.new_ones(src.shape[1]))
    m = src.amax(1, keepdim=True).to(acc) if src is work else None  # gone once work holds p
    torch.softmax(src, 1, dtype=acc, out=work)

    p_y = work.gather(1, y)
    lse = x_y - p_y.log()
    counts = (label_on != 0.0) | (uniform_on != 0.0)
    tiny = counts & ~(p_y >= _TINY)
    # On CPU asking costs nothing; on a device it would wait for it, so the fallback always runs.
    if x.device.type != "cpu" or bool(tiny.any()):
        if m is None:
            m = src.amax(1, keepdim=True).to(acc)
        lse = torch.where(tiny, m - work.amax(1, keepdim=True).log(), lse)
    lse = torch.where(counts, lse, 0.0)  # rows that count nowhere: no inf * 0
    ce = label_on * (a * w_y * (lse - x_y) + c)
    smooth = uniform_on * b * (w_sum * lse - sum_wx) if b != 0.0 else torch.zeros_like(ce)
    z = z_loss * lse * lse * label_on if z_loss else torch.zeros_like(ce)
    if not compute_grad:
        return ce, smooth, z

    # Rows that do not count: exactly 0 even when 'mean' found no row at all (1 / 0 scale), as
    # PyTorch. logit_scale chains the gradient back through x -> logit_scale * x.
    s_label = torch.where(label_on == 0.0, 0.0, scales[0] * label_on) * logit_scale
    s_uniform = torch.where(uniform_on == 0.0, 0.0, scales[2 if apart else 0] * uniform_on) * logit_scale
    coef_y = s_label * a * w_y
    coef_w = s_uniform * b
    coef_p = coef_y + coef_w * w_sum if b != 0.0 else coef_y
    if z_loss:
        coef_p = coef_p + torch.where(label_on == 0.0, 0.0, scales[1] * label_on) * logit_scale * 2.0 * z_loss * lse
    # Two vectorised passes: ATen's addcmul with two per-row operands is not vectorised and takes
    # longer than both together.
    work.mul_(coef_p)
    if b != 0.0:
        if w is None:
            work.sub_(coef_w)
        else:
            work.addcmul_(coef_w, w, value=-1.0)
    work.scatter_add_(1, y, -coef_y)
    if t is not None:
        work.mul_(t.square_().neg_().add_(1.0))  # d softcap(u) / du = 1 - tanh^2
    return ce, smooth, z


def _weighted_sum(src, w):
    """sum_j w_j x_j over dim 1, without an (N, C) product; a matrix-vector product reads the
    block at memory speed (a little faster than sum(1) without weights too)."""
    if src.dim() == 2:
        return torch.mv(src.to(w.dtype), w.view(-1)).unsqueeze(1)
    return torch.einsum("ncs,c->ns", src.to(w.dtype), w.view(-1)).unsqueeze(1)
