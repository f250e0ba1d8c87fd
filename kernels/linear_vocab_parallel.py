"""The fused LM head of kernels/linear_cross_entropy.py with its classes split across a process group.

A column-parallel head: rank r of a group of tp holds the rows [o_r, o_r + C_r) of the head's
weight (V, D) (and of its bias), i.e. the classes of its logits' shard, and every rank holds the
same hidden states (N, D) and labels. The loss is kernels/vocab_parallel.py's over all V classes:
each rank reduces its shard to per-row partials, one all-gather of k = 2-4 floats per row
(``torch.distributed._functional_collectives``, traced by torch.compile) combines them, and the
shard's gradient follows from the combined per-row values without further communication. Here the
shard's logits are never materialised beyond a chunk of rows (the head's chunk rule,
:func:`kernels.linear_cross_entropy.chunk_rows` with V = C_r):

    forward   statistics pass: per chunk of rows, logits = h W_r^T (+ b_r), their partials
              (vocab_parallel.row_partials); one all-gather of all N rows' partials; every rank
              combines them into the loss (vocab_parallel.combine_partials) and the per-row lse
              and gradient coefficients, (N,) vectors it saves.
    backward  gradient pass: per chunk, the logits again and their gradient
              (vocab_parallel.logits_grad, grad_output folded into the coefficients), then
              grad_h = g W_r and grad_W_r += g^T h, grad_b_r += sum_i g_i.

Matmul flops per rank, C_r = V / tp: 2 N D C_r forward, 6 N D C_r backward (the recomputed logits,
grad_h, grad_W): 8 N D C_r, a third more than the 6 N D C_r of a head that keeps each chunk's
gradient from forward. That would take the combined statistics in the middle of the chunk loop:
one collective per chunk, either a c10d call hidden inside the op (invisible to torch.compile,
which then cannot order or overlap it) or one traced collective and op call per chunk with the
weight gradient summed across op calls out of place (a second C_r x D buffer once functionalised);
and reduction 'none' would recompute anyway, as the single-process head does. Two passes keep one
collective of a few floats per row in forward and none of the loss's own in backward, and
backward's grad_output folds into the per-row coefficients for every reduction alike.

The hidden states' gradient. grad_h computed from the shard is rank r's share, sum over its classes
of g_ij W_j; the true gradient is the sum of the shares over the group. A column-parallel linear
gives its caller the true one: Megatron-LM's ColumnParallelLinear all-reduces its input's
gradient in backward, and ``ColwiseParallel`` takes its input as a Replicate DTensor, whose
backward turns the Partial gradient of the sharded matmul into a Replicate one by an all-reduce.
This op does the same: backward all-reduces grad_h (a functional all-reduce of N x D, sum over the
group), so the gradient autograd hands the hidden states is the true one on every rank and the
caller adds no collective. (DTensor hidden states get it as a Replicate gradient, which
``ColwiseParallel``'s input conversion passes through without a second all-reduce.)

Two entry points: ``fused_linear_cross_entropy(..., process_group=g)`` with each rank's equal
slice of the classes (weight, bias and class weights), and DTensor arguments (hidden states
Replicate, the weight sharded on dim 0 over one mesh dim, the bias likewise), whose loss comes back
as a Replicate DTensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from smoothce.kernels.form import LossForm
from smoothce.kernels.inputs import acc_dtype, check_labels_on_cpu, class_split, dtensor_reason, is_dtensor
from smoothce.kernels.linear_cross_entropy import chunk_rows
from smoothce.kernels.linear_cross_entropy_torch import head_logits
from smoothce.kernels.vocab_parallel import (
    Split,
    combine_partials,  # noqa: F401 - registers smoothce::combine_partials
    dtensor_split,
    local_per_class,
    logits_grad,
    partials_shape,
    replicated,
    row_partials,
    with_weight_sum,
    _all_gather,
    _local,
)

__all__ = ["split_linear_cross_entropy", "dtensor_linear_cross_entropy"]


def _rows(n: int, columns: int, d: int, dtype, chunk_size: int) -> int:
    return chunk_size or chunk_rows(n, columns, d, acc_dtype(dtype).itemsize)


@torch.library.custom_op("smoothce::linear_shard_partials", mutates_args=())
def linear_shard_partials(
    hidden: Tensor,  # (N, D)
    weight: Tensor,  # (C_r, D) the head's rows of classes [class_offset, class_offset + C_r)
    bias: Optional[Tensor],  # (C_r,)
    target: Tensor,  # (N,) int, every row's label among all the classes
    class_weight: Optional[Tensor],  # (C_r,)
    class_offset: int,
    classes: int,
    ignore_index: Optional[int],
    logit_scale: float,
    softcap: Optional[float],
    smoothing: bool,
    chunk_size: int,  # rows per chunk; 0 = chunk_rows(N, C_r, D)
) -> Tensor:
    """smoothce::shard_partials of the shard's logits h W^T + b, computed chunk by chunk."""
    if hidden.device.type == "cpu":
        check_labels_on_cpu(target, classes, ignore_index)
    n, d = hidden.shape
    acc = acc_dtype(hidden.dtype)
    out = hidden.new_empty((n, partials_shape(n, class_weight is not None, smoothing)[1]), dtype=acc)
    step = _rows(n, weight.shape[0], d, hidden.dtype, chunk_size)
    for start in range(0, n, step):
        end = min(start + step, n)
        x = head_logits(hidden[start:end], weight, bias, acc).unsqueeze(2)
        out[start:end] = row_partials(x, target[start:end].unsqueeze(1), class_weight, class_offset, ignore_index,
                                      logit_scale, softcap, smoothing)
    return with_weight_sum(out, class_weight, smoothing)


@linear_shard_partials.register_fake
def _(hidden, weight, bias, target, class_weight, class_offset, classes, ignore_index, logit_scale, softcap,
      smoothing, chunk_size):
    shape = partials_shape(hidden.shape[0], class_weight is not None, smoothing)
    return hidden.new_empty(shape, dtype=acc_dtype(hidden.dtype))


@torch.library.custom_op("smoothce::linear_shard_grad", mutates_args=())
def linear_shard_grad(
    hidden: Tensor,  # (N, D)
    weight: Tensor,  # (C_r, D)
    bias: Optional[Tensor],  # (C_r,)
    target: Tensor,  # (N,) int
    class_weight: Optional[Tensor],  # (C_r,)
    lse: Tensor,  # (N,) the log-sum-exp over all the classes
    coef_p: Tensor,  # (N,)
    coef_y: Tensor,  # (N,)
    coef_w: Optional[Tensor],  # (N,)
    class_offset: int,
    ignore_index: Optional[int],
    logit_scale: float,
    softcap: Optional[float],
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) of the shard, the logits' gradient
    (vocab_parallel.logits_grad) taken through the head chunk by chunk; grad_hidden is this rank's
    share (its classes' part of the sum), grad_bias empty without a bias. Accumulated in the
    accumulation dtype, returned in the inputs' dtypes."""
    n, d = hidden.shape
    acc = acc_dtype(hidden.dtype)
    w = weight.to(acc)
    grad_h = hidden.new_empty((n, d), dtype=acc)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_b = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
    step = _rows(n, weight.shape[0], d, hidden.dtype, chunk_size)

    def rows(t, start, end):
        return None if t is None else t[start:end].unsqueeze(1)

    for start in range(0, n, step):
        end = min(start + step, n)
        h = hidden[start:end]
        x = head_logits(h, weight, bias, acc).unsqueeze(2)
        g = logits_grad(x, rows(target, start, end), class_weight, rows(lse, start, end), rows(coef_p, start, end),
                        rows(coef_y, start, end), rows(coef_w, start, end), class_offset, ignore_index, logit_scale,
                        softcap).squeeze(2)
        torch.mm(g, w, out=grad_h[start:end])
        grad_w.addmm_(g.t(), h.to(acc))
        if grad_b is not None:
            grad_b += g.sum(0)
    return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype),
            weight.new_empty(0) if grad_b is None else grad_b.to(bias.dtype))


@linear_shard_grad.register_fake
def _(hidden, weight, bias, target, class_weight, lse, coef_p, coef_y, coef_w, class_offset, ignore_index,
      logit_scale, softcap, chunk_size):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(0) if bias is None else torch.empty_like(bias))


def _all_reduce(t, split: Split):
    """The sum of t over the group, by the functional collective torch.compile traces."""
    ops = torch.ops._c10d_functional
    return ops.wait_tensor(ops.all_reduce(t, "sum", split.group.group_name))


class _HeadShardGrad(torch.autograd.Function):
    """The loss, already computed from the combined partials, with the head's gradients attached:
    backward runs the gradient pass and all-reduces the hidden states' gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, target, class_weight, lse, coef_p, coef_y, coef_w, split, form,
                chunk_size, per_row):
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, lse, coef_p, coef_y, coef_w)
        ctx.args = (split.offset, form.ignore_index, form.logit_scale, form.softcap, chunk_size)
        ctx.split, ctx.per_row = split, per_row  # reduction 'none': a grad_output per row
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target, class_weight, lse, coef_p, coef_y, coef_w = ctx.saved_tensors
        go = grad_loss.to(lse.dtype)
        go = go.reshape(lse.shape) if ctx.per_row else go
        grad_h, grad_w, grad_b = torch.ops.smoothce.linear_shard_grad(
            hidden, weight, bias, target, class_weight, lse, coef_p * go, coef_y * go,
            None if coef_w is None else coef_w * go, *ctx.args)
        grad_h = _all_reduce(grad_h, ctx.split) if ctx.needs_input_grad[0] else None
        return (grad_h, grad_w, grad_b if bias is not None else None) + (None,) * 11


def split_linear_cross_entropy(hidden, weight, bias, target, class_weight, form: LossForm, loss_dtype, split: Split,
                               chunk_size: int = 0):
    """(loss, z_term) of LossForm's loss over all ``split.classes`` classes of the logits
    softcap(logit_scale (hidden @ weight.T + bias)), from this rank's rows ``weight`` (C_r, D) of the
    head (and ``bias``, ``class_weight`` (C_r,)), the hidden states (..., D) and labels (...) that
    every rank holds alike."""
    d = hidden.shape[-1]
    h2, y1 = hidden.reshape(-1, d), target.reshape(-1)
    smoothing = form.coefficients(split.classes)[1] != 0.0
    detached = [None if t is None else t.detach() for t in (h2, weight, bias)]
    partials = torch.ops.smoothce.linear_shard_partials(*detached, y1, class_weight, split.offset, split.classes,
                                                        form.ignore_index, form.logit_scale, form.softcap, smoothing,
                                                        chunk_size)
    compute_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    y2 = y1.unsqueeze(1)
    loss, z_term, lse, coef_p, coef_y, coef_w = torch.ops.smoothce.combine_partials(
        _all_gather(partials, split), y2, None, split.world, split.classes, class_weight is not None,
        *form.as_args(), loss_dtype or hidden.dtype, compute_grad)
    per_row = form.reduction == "none"
    if compute_grad:
        loss = _HeadShardGrad.apply(h2, weight, bias, loss, y1, class_weight, lse.view(-1), coef_p.view(-1),
                                    coef_y.view(-1), coef_w.view(-1) if smoothing else None, split, form,
                                    chunk_size, per_row)
    if per_row:
        loss, z_term = loss.view(target.shape), z_term.view(target.shape)
    return loss, z_term


def dtensor_linear_cross_entropy(hidden, weight, bias, target, class_weight, form: LossForm, loss_dtype,
                                 chunk_size: int = 0):
    """(loss, z_term) of a head whose weight is a DTensor sharded on its classes (dim 0) over one
    mesh dim, as Replicate DTensors on its mesh. The hidden states are a Replicate DTensor, the bias
    None or sharded like the weight (or replicated); labels and class weights as
    vocab_parallel.dtensor_cross_entropy takes them."""
    dim, _ = class_split(weight, 0)
    if dim is None:
        raise ValueError(f"smoothce: the head's weight is a DTensor placed {tuple(weight.placements)}: the fused "
                         "head takes it sharded on its classes (dim 0) over one mesh dim, replicated over the others")
    for t, role in ((hidden, "the hidden states"), (bias, "the bias")):
        why = None if t is None else dtensor_reason(t, role, weight, dim) if is_dtensor(t) else (
            f"{role} are a plain tensor next to a DTensor weight")
        if why is not None:
            raise ValueError("smoothce: " + why)
    split = dtensor_split(weight, dim, 0)
    local = weight.to_local()
    columns = local.shape[0]
    loss, z_term = split_linear_cross_entropy(
        hidden.to_local(), local, local_per_class(bias, "the bias", weight, dim, split, columns),
        _local(target, "labels", weight, dim),
        local_per_class(class_weight, "class weights", weight, dim, split, columns), form, loss_dtype, split,
        chunk_size)
    return replicated(weight.device_mesh, loss, z_term)
