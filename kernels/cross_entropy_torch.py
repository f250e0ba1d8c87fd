"""smoothce::cross_entropy_stats and smoothce::cross_entropy_grad in torch ops: the CPU path (and
SMOOTHCE_KERNEL=torch anywhere).

Same contracts and math as the Triton launchers (kernels/cross_entropy_triton.py, end of file):
per-row statistics (lse, label logit, sum_j w_j x_j) of a block of columns, and the gradient
from per-row derivatives with respect to them.

Statistics. ATen has no reduction that sums exp(x - max) without writing the exponentials, so
rows go block by block through a bounded work buffer: one fused softmax per block (it reads a row
once from memory; its max / exp / scale passes stay in cache), then

    lse = x_r - log p_r         for a reference column r: the label where it is one of the columns
                                (else column 0), exact while p_r is a normal float;
    lse = max_j x_j - log max_j p_j    for rows whose p_r is tiny (max_j p_j >= 1 / C never is),
                                two more reductions of the block, only when such a row exists.

Gradient. With the lse given, p = exp(x - lse) needs no reduction: g_lse p = exp(x - (lse -
log |g_lse|)) (sign restored where g_lse < 0), one subtraction into the gradient and one exp in
place; then the weighted-sum term (a per-row constant, or a rank-1 update with class weights) and
the label term (a scatter).

Why whole-batch passes where possible: every torch op is a parallel region that waits for all of
torch's threads, and on a CPU shared with other busy processes each such wait can cost a
scheduler time slice. So the gradient, when it is written in the math dtype and without a
softcap, takes a handful of regions over the whole batch, straight into its buffer; the
statistics (which have no logits-sized output) and the other gradient cases go through blocks
of about _BLOCK_ELEMENTS, few enough to keep the regions to tens per call.
"""

from __future__ import annotations

import torch

from smoothce.kernels.inputs import acc_dtype

# Elements of the work buffer (16 MiB in fp32): the blocks of rows the statistics (and a
# gradient that needs a work buffer) go through.
_BLOCK_ELEMENTS = 1 << 22
# p below this (2^-100) is too close to fp32's subnormal range for log p to be exact.
_TINY = 2.0 ** -100


def _views(x3, y2, class_offset, weight, acc):
    """Classes on dim 1 of (N, C) (S == 1: a trailing size-1 dim sends reductions over dim 1 down a
    slow strided path) or (N, C, S); the labels as columns here, clamped to a safe index, and
    whether they are one of these columns; the weights shaped to broadcast over dim 1."""
    N, C, S = x3.shape
    flat = S == 1
    x = x3[:, :, 0] if flat else x3
    rows = (N, 1) if flat else (N, 1, S)
    local = y2.reshape(rows).long() - class_offset
    here = (local >= 0) & (local < C)
    w = None if weight is None else weight.to(acc).view((1, C) if flat else (1, C, 1))
    return x, torch.where(here, local, 0), here, w, rows


def _transformed(x, work, logit_scale, softcap, keep_tanh=False):
    """softcap(logit_scale * x) into work (None when there is nothing to do), and with keep_tanh the
    tanh that the softcap's derivative needs (else None)."""
    if softcap is None and logit_scale == 1.0:
        return None, None
    torch.mul(x, logit_scale, out=work)
    if softcap is None:
        return work, None
    t = work.div_(softcap).tanh_()
    t = t.clone() if keep_tanh else None
    return work.mul_(softcap), t


def torch_row_stats(x3, y2, weight, out, *, class_offset=0, logit_scale=1.0, softcap=None, weighted_sum=False):
    """Same contract as launch_row_stats: fills out (3, N * S) with lse, label logit and (with
    weighted_sum) sum_j w_j x_j of each row."""
    N, C, S = x3.shape
    if N * S == 0:
        return
    acc = acc_dtype(x3.dtype)
    x, ref, here, w, rows = _views(x3, y2, class_offset, weight, acc)
    lse_out, label_out, wsum_out = (out[k].view(rows) for k in range(3))
    if weighted_sum and w is None:
        w = torch.ones(C, dtype=acc, device=x.device)
    step = max(1, _BLOCK_ELEMENTS // max(C * S, 1))
    work_buf = torch.empty((min(step, N),) + tuple(x.shape[1:]), dtype=acc, device=x.device)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        work = work_buf[: n1 - n0]
        src, _ = _transformed(x[n0:n1], work, logit_scale, softcap)
        src = x[n0:n1] if src is None else src
        r, h = ref[n0:n1], here[n0:n1]
        x_r = src.gather(1, r).to(acc)
        label_out[n0:n1] = torch.where(h, x_r, 0.0)
        if weighted_sum:
            wsum_out[n0:n1] = _weighted_sum(src, w)
        m = src.amax(1, keepdim=True).to(acc) if src is work else None  # gone once work holds p
        torch.softmax(src, 1, dtype=acc, out=work)
        p_r = work.gather(1, r)
        lse = x_r - p_r.log()
        tiny = ~(p_r >= _TINY)
        # On CPU asking costs nothing; on a device it would wait for it, so the fallback always runs.
        if x.device.type != "cpu" or bool(tiny.any()):
            m = src.amax(1, keepdim=True).to(acc) if m is None else m
            lse = torch.where(tiny, m - work.amax(1, keepdim=True).log(), lse)
        lse_out[n0:n1] = lse


def torch_row_grad(grad_stats, x3, y2, weight, lse, grad3, *, class_offset=0, logit_scale=1.0, softcap=None,
                   weighted_sum=False):
    """Same contract as launch_row_grad: writes grad3 (N, C, S) from grad_stats (3, N * S), the
    derivatives of the result with respect to each row's (lse, label logit, weighted sum)."""
    N, C, S = x3.shape
    if N * S * C == 0:
        return
    acc = acc_dtype(x3.dtype)
    x, y, here, w, rows = _views(x3, y2, class_offset, weight, acc)
    grad = grad3[:, :, 0] if S == 1 else grad3
    # logit_scale chains d/dx back through x = logit_scale * logits.
    g_lse, g_label, g_wsum = (grad_stats[k].view(rows).to(acc) * logit_scale for k in range(3))
    lse = lse.view(rows).to(acc)
    g_label = torch.where(here, g_label, 0.0)
    whole = grad.dtype == acc and softcap is None
    step = max(N, 1) if whole else max(1, _BLOCK_ELEMENTS // max(C * S, 1))
    work_buf = None if whole else torch.empty((min(step, N),) + tuple(x.shape[1:]), dtype=acc, device=x.device)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        work = grad[n0:n1] if whole else work_buf[: n1 - n0]
        src, t = _transformed(x[n0:n1], work, logit_scale, softcap, keep_tanh=True)
        _grad_block(x[n0:n1] if src is None else src, work, lse[n0:n1], y[n0:n1], w, g_lse[n0:n1],
                    g_label[n0:n1], g_wsum[n0:n1] if weighted_sum else None)
        if t is not None:
            work.mul_(t.square_().neg_().add_(1.0))  # d softcap(u) / du = 1 - tanh^2
        if not whole:
            grad[n0:n1] = work


def _grad_block(src, work, lse, y, w, g_lse, g_label, g_wsum):
    """work = g_lse p + g_label [j == y] + g_wsum w_j for a block of rows; src may be work itself."""
    # g_lse p = sign(g_lse) exp(x - (lse - log |g_lse|)): the scale rides in the exponent (a row
    # with g_lse = 0 gets exp(-inf) = 0, a nan one stays nan).
    torch.sub(src, lse - g_lse.abs().log(), out=work)
    work.exp_()
    negative = g_lse < 0
    if work.device.type != "cpu" or bool(negative.any()):  # asking is free on CPU only
        work.mul_(torch.where(negative, -1.0, 1.0))
    if g_wsum is not None:
        if w is None:
            work.add_(g_wsum)
        else:
            work.addcmul_(g_wsum, w)
    work.scatter_add_(1, y, g_label)


def _weighted_sum(src, w):
    """sum_j w_j x_j over dim 1, without an (N, C) product; a matrix-vector product reads the block
    at memory speed (a little faster than sum(1) without weights too)."""
    w = w.reshape(-1)
    if src.dim() == 2:
        return torch.mv(src.to(w.dtype), w).unsqueeze(1)
    return torch.einsum("ncs,c->ns", src.to(w.dtype), w).unsqueeze(1)
