"""Fused linear cross-entropy: an LM head (hidden @ weight.T + bias) and its (smoothed) cross-entropy
in one op that never holds the full N x V logits.

Loss semantics are those of ``fused_cross_entropy`` (see kernels/cross_entropy.py), applied
to ``x = softcap((hidden @ weight.T + bias) * logit_scale)``. For each non-ignored row i with target
y_i, class weights w (ones when None), lse_i = logsumexp_j x_ij:

    q_ij   = a * w[y_i] * [j == y_i] + b * w_j
    loss_i = sum_j q_ij * (lse_i - x_ij) + c + z * lse_i^2

Rows are processed in chunks (see :func:`chunk_rows`). Per chunk the op computes the chunk's logits
into one reused buffer, the per-row loss and, in the same buffer, d(loss)/d(logits); two GEMMs turn
that into the chunk's rows of grad_hidden and its contribution to grad_weight. Two chunk loops do
this: kernels/linear_cross_entropy_triton.py on CUDA (the Triton kernel of
kernels/cross_entropy_triton.py on chunk logits in the input dtype; the weight gradient accumulates
in its own buffer and dtype, and that module says how precise it stays), and
kernels/linear_cross_entropy_torch.py on CPU and for float64 (fp32 chunk logits, few torch ops per
chunk). For 'sum' / 'mean' the loss is a scalar, so backward only scales the stored gradients by
grad_output, over themselves. For 'none' every row has its own grad_output, which cannot be folded
into a precomputed grad_weight: forward then computes the loss only and backward recomputes the
chunks with the per-row grad_output (one extra head GEMM per chunk, still no full logits).

Budget on a GPU, at N = 16384 tokens, D = 4096, V = 131072, bf16 (an H100 SXM: cuBLAS about
790 TFLOP/s on these GEMMs, 3.02 TB/s device-to-device copy). A prediction, to be measured:

    memory  floor: the gradients the op returns, grad_weight V D 2 B = 1 GiB and grad_hidden
            N D 2 B = 128 MiB, 1.125 GiB. Above it: one chunk of logits in the input dtype, its
            gradient written over it, R V 2 B; a 224 MiB budget gives R = 896 rows, K = 19 chunks
            (18 x 896 + 256). Per-row results and label vectors: under 1 MiB. Total 225 MiB above
            the floor (the promise: at most 256 MiB). No (V, D) accumulator, no final copy.
    time    GEMMs 6 N D V = 5.3e13 flop: 66.8 ms. Cross-entropy of the chunks, one read and one
            write of N V bf16 = 8.6 GB: 2.8 ms at copy speed, 4.3 ms at 66 % of it (what
            kernels/cross_entropy_tuning.py predicts of its two-pass variant at V >= 128K), 10 ms at
            the 28 % the earlier kernel measured. grad_weight accumulated chunk by chunk: chunks
            2..K read and write it, 18 x 2 GiB = 38.7 GB, 12.8 ms if it ran alone; the accumulating
            GEMM does R / 2 = 448 flop per byte of it, above the 262 flop/B where the H100 turns
            compute-bound, so most of it hides under the GEMM: 2-4 ms. Backward scaling by
            grad_output: nothing for loss.backward()'s 1 (decided on the device), else in place,
            2.4 GB, 0.8 ms. Predicted step: about 74 ms with the two-pass kernel at 66 % of copy,
            80 ms at 28 %; Inductor's unfused step measured 93.6 / 85.0 ms (eps 0 / 0.1), Liger's
            fused one 97.1 / 95.4 ms.

Layout, low to high: chunk rule -> forward and backward over a chunk loop -> ``smoothce::`` custom
ops (with fakes) -> autograd -> the public functional.
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
    is_dtensor,
    kernel_choice,
)
from smoothce.kernels.form import LossForm
from smoothce.kernels.gradients import scale_in_place
from smoothce.kernels.linear_cross_entropy_torch import torch_chunks

__all__ = ["chunk_rows", "fused_linear_cross_entropy"]



# ------------------------------------------------------------------------------------------------
# chunk rule
# ------------------------------------------------------------------------------------------------
# The most bytes one chunk of logits may take. The chunk (its gradient written over it) is all the
# op holds above the gradients it returns, so this keeps the fused head within 256 MiB of them,
# with room for its per-row vectors.
CHUNK_BYTES = 224 << 20
_MIN_CHUNK_LOGITS = 1 << 20


def chunk_rows(n: int, v: int, d: int, itemsize: int) -> int:
    """Rows per chunk for an (n, d) x (d, v) head whose chunk logits take ``itemsize`` bytes each.

    At most ``d`` rows, so a chunk's logits are no larger than the weight gradient the op returns
    (in the dtype the chunk loop accumulates it in): chunking at most doubles the op's unavoidable
    state, whatever n is. At most CHUNK_BYTES, which binds on LM heads (896 rows at V = 131072 in
    bf16). As many rows as those allow, because grad_weight is read, written and rounded once per
    chunk (kernels/linear_cross_entropy_triton.py), and the GEMM that accumulates it does rows / 2
    flop per byte of it: large chunks keep that compute-bound. A small head gets at least about
    _MIN_CHUNK_LOGITS logits per chunk, so it is not cut into many tiny chunks whose fixed cost
    would dominate. A multiple of 8 (vector-friendly row blocks), at most n.
    """
    if n <= 0:
        return 1
    rows = max(min(d, CHUNK_BYTES // (v * itemsize)), -(-_MIN_CHUNK_LOGITS // max(v, 1)), 8)
    return min(n, rows // 8 * 8)


def _chunk_loop(hidden: Tensor):
    """The chunk loop that runs for these tensors, and the bytes of one logit in its chunks."""
    if kernel_choice(hidden) == "triton":
        from smoothce.kernels.linear_cross_entropy_triton import triton_chunks

        return triton_chunks, hidden.element_size()
    return torch_chunks, acc_dtype(hidden.dtype).itemsize


def _forward(hidden, weight, bias, target, class_weight, ignore_index, reduction, a, b, c, z, softcap,
             logit_scale, compute_grad, rows, loss_dtype):
    n, d = hidden.shape
    v = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    if hidden.device.type == "cpu":
        check_labels_on_cpu(target, v, ignore_index)
    tg = Labels(target, class_weight, ignore_index, v, acc)
    # 'none' cannot use forward-time gradients (see module docstring): its backward recomputes.
    # 'mean' divisors come from the labels alone, before the chunk loop.
    scales = tg.scales(reduction) if compute_grad and reduction != "none" else None
    chunks, itemsize = _chunk_loop(hidden)
    ce_rows, z_rows, grad_h, grad_w, grad_b = chunks(
        hidden, weight, bias, tg, ignore_index, a, b, c, z, softcap, logit_scale, scales, None,
        rows or chunk_rows(n, v, d, itemsize))
    loss, z_term = tg.reduce(ce_rows, z_rows, reduction, z)
    loss, z_term = loss.to(loss_dtype), z_term.to(loss_dtype)
    if scales is None:
        return loss, z_term, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    return loss, z_term, grad_h, grad_w, weight.new_empty(0) if grad_b is None else grad_b


def _backward_rows(grad_loss, hidden, weight, bias, target, class_weight, ignore_index, a, b, z, softcap,
                   logit_scale, rows):
    n, d = hidden.shape
    v = weight.shape[0]
    tg = Labels(target, class_weight, ignore_index, v, acc_dtype(hidden.dtype))
    chunks, itemsize = _chunk_loop(hidden)
    _, _, grad_h, grad_w, grad_b = chunks(
        hidden, weight, bias, tg, ignore_index, a, b, 0.0, z, softcap, logit_scale, tg.scales("sum"),
        grad_loss.to(tg.acc), rows or chunk_rows(n, v, d, itemsize))
    return grad_h, grad_w, weight.new_empty(0) if grad_b is None else grad_b


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
        saved = ctx.saved_tensors
        if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in saved):
            # Traced (fake / functional tensors) or a tensor subclass: out of place, since the
            # partitioner rejects a mutated saved tensor. The saved gradients are donated to
            # backward, so Inductor may write the product over them; it computes in fp32 and
            # rounds once.
            grad_h, grad_w, grad_b = ((t.to(grad_loss.dtype) * grad_loss).to(t.dtype) for t in saved)
        else:
            # Eager: in place, so the stored gradients become the parameters' gradients and backward
            # allocates no second (V, D) buffer. A second backward through the same graph raises
            # (version counter) instead of scaling twice.
            grad_h, grad_w, grad_b = (scale_in_place(t, grad_loss) for t in saved)
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
    process_group=None,
):
    """The loss LossForm(ignore_index, reduction, label_smoothing, ...) describes, of the logits
    ``softcap(logit_scale * (hidden @ weight.T + bias))``, without materialising them.

    hidden (..., D), weight (V, D), bias (V,) or None, target (...) class indices, class_weight (V,)
    or None. The loss is that of ``fused_cross_entropy`` in kernels/cross_entropy.py with the same
    keywords. ``reduction='none'`` returns a loss with target's shape. ``loss_dtype``: the returned
    loss's dtype (default: hidden's). ``chunk_size`` overrides the rows per chunk (default
    :func:`chunk_rows`). With ``return_z_loss`` returns ``(loss, z_term)``, z_term being the
    (non-differentiable) z-loss part.

    A head whose classes are split across processes (kernels/linear_vocab_parallel.py): with
    ``process_group``, each rank passes the same hidden states and labels and its equal slice of
    the classes (rank r the r-th rows of the weight, and of the bias and class weights); or a
    DTensor weight sharded on dim 0 with Replicate DTensor hidden states, whose loss comes back a
    Replicate DTensor. Either way the loss is that of all the classes on every rank, the weight's
    (and bias') gradient is the rank's slice, and the hidden states' gradient is the whole one
    (backward all-reduces it over the group, as a column-parallel linear does).
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

    if process_group is not None or is_dtensor(weight) or is_dtensor(hidden):
        from smoothce.kernels import linear_vocab_parallel as split_head
        from smoothce.kernels.vocab_parallel import process_group_split

        if process_group is None:
            loss, z_term = split_head.dtensor_linear_cross_entropy(hidden, weight, bias, target, class_weight, form,
                                                                   loss_dtype, chunk_size)
        else:
            split = process_group_split(process_group, v)
            loss, z_term = split_head.split_linear_cross_entropy(hidden, weight, bias, target, class_weight, form,
                                                                 loss_dtype, split, chunk_size)
        return (loss, z_term.detach()) if return_z_loss else loss
    compute_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, weight, bias) if t is not None)
    loss, z_term, *_ = torch.ops.smoothce.linear_cross_entropy(
        hidden.reshape(-1, d), weight, bias, target.reshape(-1), class_weight, *form.as_args(), None, loss_dtype,
        compute_grad, chunk_size)
    if reduction == "none":
        loss = loss.view(target.shape)
        z_term = z_term.view(target.shape)
    return (loss, z_term.detach()) if return_z_loss else loss
