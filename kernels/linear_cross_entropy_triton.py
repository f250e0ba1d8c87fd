"""The fused LM head's chunk loop around the Triton cross-entropy kernel (CUDA; the interpreter in
tests).

Per chunk of R rows, with every buffer in the input dtype (bf16 below) and every GEMM in cuBLAS
(fp32 accumulation inside):

    logits  = hidden_c @ weight.T (+ bias)           one rounding to bf16, as F.linear rounds
    kernel  : loss rows, and d(result)/d(logits) written over the logits (math in fp32)
    grad_hidden_c  = g @ weight                      straight into grad_hidden's rows
    grad_weight   += g.T @ hidden_c                  in grad_weight itself (see below)
    grad_bias     += sum of g's rows                 an fp32 (V,) accumulator, rounded once

so the op holds one chunk of logits above the gradients it returns, nothing of size (V, D) or
(N, V) besides. (The first step at a new shape holds one chunk more while the kernel's autotuner
tries its variants on a copy of the logits it overwrites.) logit_scale and the softcap are applied
inside the kernel, in fp32, to the logits F.linear would have produced.

Precision of grad_weight. A fp32 (V, D) accumulator would cost twice the weight's bytes (2 GiB
for a 131072 x 4096 bf16 head, eight times the op's whole budget above its outputs), so the
weight gradient accumulates in its own buffer and dtype: chunk k's contribution
P_k = g_k.T @ hidden_k is summed over the chunk's R rows in fp32 inside the GEMM, and the GEMM's
epilogue adds it to the running sum in fp32 and rounds once (``addmm``, beta 0 for the first). With
K = ceil(N / R) chunks, S_k = P_1 + ... + P_k and u the unit roundoff of the weight's dtype
(2^-8 for bf16, 2^-11 for fp16, 2^-24 for fp32), elementwise

    |grad_weight - S_K| <= u (|S_1| + ... + |S_K|) <= K u max_k |S_k|     (+ fp32 GEMM error)

against u |S_K| for a single rounding. That is K roundings instead of one (19 at N = 16384 with
896-row chunks), in the same dtype the gradient is returned in; the chunk rule keeps K small by
making chunks as large as the memory budget allows. grad_hidden is one GEMM per row (one
rounding), grad_bias sums per-chunk fp32 sums in fp32 (one rounding at the end).

reduction='none' (``row_grad``): each row's gradient is scaled by its own grad_output. Rather than
a pass over the (R, V) gradient, the scale goes on the (R, D) operands: grad_hidden's rows after
their GEMM, and hidden_c's rows before the weight GEMM (one rounding of r_i h_i).
"""
from __future__ import annotations

import torch

from smoothce.kernels.cross_entropy_triton import launch_cross_entropy

__all__ = ["launch_chunk", "triton_chunks"]


def launch_chunk(logits, tg, start, ce_rows, z_rows, scales, grads, ignore_index, a, b, c, z, softcap, logit_scale,
                 compile_for=None):
    """The cross-entropy kernel on one chunk's (R, V) logits, the rows from ``start`` on: loss rows
    into ce_rows / z_rows, and with ``grads`` the gradient written over the logits.
    ``compile_for``: see launch_cross_entropy."""
    rows, v = logits.shape
    x3 = logits.view(rows, v, 1)
    return launch_cross_entropy(x3, tg.target[start:start + rows].view(-1, 1), tg.class_weight, scales,
                                ce_rows[start:start + rows], z_rows[start:start + rows], x3 if grads else None,
                                ignore_index=ignore_index, a=a, b=b, c=c, z_loss=z, softcap=softcap or None,
                                logit_scale=logit_scale, compile_for=compile_for)


def triton_chunks(hidden, weight, bias, tg, ignore_index, a, b, c, z, softcap, logit_scale, scales, row_grad,
                  rows):
    """Per-row ce_i / z_i (in the accumulation dtype) over chunks of ``rows`` rows. With ``scales``
    ((2,) tensor: d(result)/d(ce_i) and d(result)/d(z_i) for counted rows, times ``row_grad`` (N,)
    if given) also the gradients of the result with respect to hidden, weight and bias, in their
    dtypes."""
    n, d = hidden.shape
    v = weight.shape[0]
    dtype, dev = hidden.dtype, hidden.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ce_rows = torch.empty(n, dtype=acc, device=dev)
    z_rows = torch.zeros(n, dtype=acc, device=dev)
    grads = scales is not None
    grad_h = grad_w = grad_b = None
    if grads:
        grad_h = torch.empty(n, d, dtype=dtype, device=dev)
        # written by the first chunk's GEMM, accumulated into by the others
        grad_w = torch.empty(v, d, dtype=dtype, device=dev) if n else torch.zeros(v, d, dtype=dtype, device=dev)
        grad_b = None if bias is None else torch.zeros(v, dtype=acc, device=dev)
    else:
        scales = torch.ones(2, dtype=acc, device=dev)  # read by no kernel: COMPUTE_GRAD is off
    buf = torch.empty(min(rows, n), v, dtype=dtype, device=dev)  # one chunk, reused by every chunk
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h = hidden[start:end]
        logits = buf[: end - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        launch_chunk(logits, tg, start, ce_rows, z_rows, scales, grads, ignore_index, a, b, c, z, softcap,
                     logit_scale)
        if not grads:
            continue
        # logits now holds g = d(result)/d(hidden @ weight.T + bias) for the chunk's rows.
        gh = grad_h[start:end]
        torch.mm(logits, weight, out=gh)
        if row_grad is not None:
            r = row_grad[start:end].unsqueeze(1)
            gh.mul_(r)
            h = (h * r).to(dtype)
        torch.addmm(grad_w, logits.t(), h, beta=1.0 if start else 0.0, out=grad_w)  # one rounding per chunk
        if grad_b is not None:
            if row_grad is None:
                grad_b += logits.sum(dim=0, dtype=acc)
            else:
                grad_b += torch.mv(logits.t(), row_grad[start:end].to(dtype))
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return ce_rows, z_rows, grad_h, grad_w, grad_b
