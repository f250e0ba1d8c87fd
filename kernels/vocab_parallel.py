"""The loss of kernels/cross_entropy.py over logits whose classes are split across a process group.

Tensor parallelism shards an LM head's output on the vocabulary: rank r of a group of tp holds the
columns [o_r, o_r + V_r) of every row's logits; the labels are replicated. With x the logits after
logit_scale and softcap, LossForm's loss of a row (kernels/cross_entropy.py) is

    loss_i = Q_i lse_i - a w[y_i] x_iy - b sum_j w_j x_ij + c + z lse_i^2,   Q_i = a w[y_i] + b sum_j w_j,

so besides the labels it needs, over all V classes, the log-sum-exp, the label's logit and (with
smoothing) sum_j w_j x_ij. Each rank reads its shard once and reduces every row to partials that
combine across the shards; one all-gather (``torch.distributed._functional_collectives``, so
torch.compile traces it) hands every rank everyone's partials, and every rank computes the same
loss from them. Per row, in the logits' accumulation dtype:

    lse_r = log sum_{j in r} exp x_ij    lse_i = logsumexp_r lse_r: exact, and no overflow. A max
                                         and a sum of exponentials reduced apart would need two
                                         rounds: the sum must be rescaled by the global max.
    x_iy on the rank holding y_i, else 0                         summed
    sum_{j in r} w_j x_ij                only with smoothing     summed
    w[y_i] on the rank holding y_i       only with class weights summed (the weights are sharded
                                                                 with the classes)

2 floats per row, 3 with smoothing or class weights, 4 with both; with both, one more row holds
the shard's sum_j w_j (Q_i needs the global sum). Every rank sends N x k and receives tp x N x k.

The gradient of a shard needs only its own columns and the combined per-row values:

    d loss / d x_ij = (Q_i + 2 z lse_i) p_ij - a w[y_i] [j == y_i] - b w_j,   p_ij = exp(x_ij - lse_i)

(times the reduction's scale, grad_output, logit_scale and the softcap's 1 - (x / cap)^2), so
backward communicates nothing: it recomputes p from the shard and the global lse.

Two entry points reach :func:`split_cross_entropy`: ``fused_cross_entropy(..., process_group=g)``
with each rank's equal slice of the classes, and DTensor logits sharded on the class dim
(:func:`dtensor_cross_entropy`), whose loss comes back as a Replicate DTensor.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from smoothce.kernels.form import LossForm
from smoothce.kernels.inputs import Labels, acc_dtype, check_labels_on_cpu, class_split, dtensor_reason

__all__ = ["Split", "split_cross_entropy", "dtensor_cross_entropy", "process_group_split"]


class Split:
    """Where a rank's columns lie among the classes, and the group that holds the others."""

    def __init__(self, group, rank: int, world: int, offset: int, classes: int):
        self.group, self.rank, self.world, self.offset, self.classes = group, rank, world, offset, classes

    def __repr__(self) -> str:
        return f"Split(rank={self.rank}/{self.world}, offset={self.offset}, classes={self.classes})"


def process_group_split(group, local_classes: int) -> Split:
    """Equal slices in rank order: rank r holds classes [r C, (r + 1) C) of world x C."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return Split(group, rank, world, rank * local_classes, world * local_classes)


# --------------------------------------------------------------------------------------------
# a shard's per-row partials and its gradient
# --------------------------------------------------------------------------------------------


def _all_gather(t, split: Split):
    """Every rank's t stacked on dim 0, by the functional collective that torch.compile traces (and
    Inductor may overlap with other work); eager waits for it at once."""
    ops = torch.ops._c10d_functional
    return ops.wait_tensor(ops.all_gather_into_tensor(t, split.world, split.group.group_name))


class _CombinedLabels(Labels):
    """Labels whose class weights are sharded: w[y] and sum_j w_j come from the combined partials."""

    def __init__(self, target, ignore_index, classes, acc, uniform_rows, wy, w_sum):
        super().__init__(target, None, ignore_index, classes, acc, uniform_rows)
        self.wy, self.w_sum = wy, w_sum  # shadow the properties computed from a whole weight

    @functools.cached_property
    def wy_sum(self) -> torch.Tensor:
        return self.wy.sum()


def _transformed(x3, logit_scale: float, softcap: Optional[float]):
    """softcap(logit_scale * x) in the accumulation dtype, and tanh(...) for the softcap's derivative."""
    x = x3.to(acc_dtype(x3.dtype))
    if logit_scale != 1.0:
        x = x * logit_scale
    if softcap is None:
        return x, None
    t = torch.tanh(x / softcap)
    return softcap * t, t


def _labels_in(target, offset: int, columns: int, ignore_index):
    """(the label's column in the shard, 0 where it is elsewhere; whether it is in the shard)."""
    y = target - offset
    inside = (y >= 0) & (y < columns)
    if ignore_index is not None:
        inside &= target != ignore_index
    return torch.where(inside, y, 0), inside


def row_partials(x, target, weight, class_offset: int, ignore_index, logit_scale: float, softcap, smoothing: bool):
    """(N S, k) per-row partials of shard columns ``x`` (N, C_r, S) of the untransformed logits, in
    the accumulation dtype: what shard_partials sends, without its row of the shard's weight sum."""
    x, _ = _transformed(x, logit_scale, softcap)
    y, inside = _labels_in(target, class_offset, x.shape[1], ignore_index)
    parts = [torch.logsumexp(x, 1), torch.where(inside, x.gather(1, y.unsqueeze(1)).squeeze(1), 0.0)]
    if smoothing:
        parts.append(x.sum(1) if weight is None else torch.einsum("ncs,c->ns", x, weight.to(x.dtype)))
    if weight is not None:
        parts.append(torch.where(inside, weight.to(x.dtype)[y], 0.0))
    return torch.stack(parts, -1).reshape(-1, len(parts))


def with_weight_sum(rows, weight, smoothing: bool):
    """The partials with, when both class weights and smoothing are on, a last row holding the
    shard's sum of class weights (Q_i needs the global sum)."""
    if weight is None or not smoothing:
        return rows
    extra = rows.new_zeros(1, rows.shape[1])
    extra[0, 0] = weight.to(rows.dtype).sum()
    return torch.cat([rows, extra])


def partials_shape(rows: int, has_weight: bool, smoothing: bool) -> tuple[int, int]:
    """The shape of the partials of ``rows`` rows (the fakes' rule)."""
    # ints, not bools: torch 2.11's symbolic shapes cannot add a bool to a dynamic size
    return rows + int(has_weight and smoothing), 2 + int(smoothing) + int(has_weight)


@torch.library.custom_op("smoothce::shard_partials", mutates_args=())
def shard_partials(
    x: Tensor,  # (N, C_r, S) the shard: classes [class_offset, class_offset + C_r)
    target: Tensor,  # (N, S) int, every row's label among all the classes
    weight: Optional[Tensor],  # (C_r,) the shard's class weights
    class_offset: int,
    classes: int,
    ignore_index: Optional[int],
    logit_scale: float,
    softcap: Optional[float],
    smoothing: bool,
) -> Tensor:
    """(N S [+ 1], k) per-row partials of a shard, what it sends (accumulation dtype): its
    log-sum-exp, the label's logit where the label is among its columns (else 0), sum_j w_j x_ij
    (with ``smoothing``) and w[y] (with class weights, else 0); with both, a last row holding the
    shard's sum of class weights. On CPU a label outside [0, classes) that is not ignore_index
    raises, as the single-process op does; the labels are the same on every rank, so all raise."""
    if x.device.type == "cpu":
        check_labels_on_cpu(target, classes, ignore_index)
    rows = row_partials(x, target, weight, class_offset, ignore_index, logit_scale, softcap, smoothing)
    return with_weight_sum(rows, weight, smoothing)


@shard_partials.register_fake
def _(x, target, weight, class_offset, classes, ignore_index, logit_scale, softcap, smoothing):
    shape = partials_shape(x.shape[0] * x.shape[2], weight is not None, smoothing)
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("smoothce::combine_partials", mutates_args=())
def combine_partials(
    gathered: Tensor,  # (tp * R, k) every rank's shard_partials, in rank order
    target: Tensor,  # (N, S) int
    uniform_rows: Optional[Tensor],  # (N, S) bool
    world: int,
    classes: int,
    has_weight: bool,
    ignore_index: Optional[int],
    reduction: str,
    label_smoothing: float,
    smoothing: str,
    scale: float,
    kl: bool,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    loss_dtype: torch.dtype,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, z_term, lse, coef_p, coef_y, coef_w) from every shard's partials: the loss of all the
    classes (every rank computes the same) and, with compute_grad, the per-row values a shard's
    gradient needs (kernels/cross_entropy.py's formula, the reduction's scale and logit_scale in
    them; coef_w empty without smoothing)."""
    form = LossForm(ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale)
    a, b, c = form.coefficients(classes)
    N, S = target.shape
    n = N * S
    parts = gathered.view(world, -1, gathered.shape[1])
    acc = gathered.dtype
    lse = torch.logsumexp(parts[:, :n, 0], 0).view(N, S)
    x_y = parts[:, :n, 1].sum(0).view(N, S)
    sum_wx = parts[:, :n, 2].sum(0).view(N, S) if b != 0.0 else None
    if has_weight:
        w_sum = parts[:, n, 0].sum() if b != 0.0 else None
        labels = _CombinedLabels(target, ignore_index, classes, acc, uniform_rows,
                                 parts[:, :n, -1].sum(0).view(N, S), w_sum)
    else:
        labels = Labels(target, None, ignore_index, classes, acc, uniform_rows)
    # per-row parts as kernels/cross_entropy_torch.py has them
    label_on, uniform_on, w_y = labels.row_mask, labels.uniform_mask, labels.wy
    counts = (label_on != 0.0) | (uniform_on != 0.0)
    lse = torch.where(counts, lse, 0.0)  # rows that count nowhere: no inf * 0
    ce = label_on * (a * w_y * (lse - x_y) + c)
    smooth = uniform_on * b * (labels.w_sum * lse - sum_wx) if b != 0.0 else None
    z = z_loss * lse * lse * label_on if z_loss else torch.zeros_like(ce)
    apart = uniform_rows is not None
    if smooth is not None and not apart:
        ce, smooth = ce + smooth, None
    loss, z_term = labels.reduce(ce, z, reduction, z_loss, smooth)
    loss, z_term = loss.to(loss_dtype), z_term.to(loss_dtype)
    empty = gathered.new_empty(0)
    if not compute_grad:
        return loss, z_term, empty, empty, empty, empty
    # Rows that do not count: exactly 0 even when 'mean' found no row at all (1 / 0 scale), as
    # PyTorch.
    scales = labels.scales(reduction)
    coef_y = torch.where(label_on == 0.0, 0.0, scales[0] * label_on) * logit_scale * a * w_y
    coef_p, coef_w = coef_y.clone(), empty  # (an op's outputs may not alias)
    if b != 0.0:
        coef_w = torch.where(uniform_on == 0.0, 0.0, scales[2 if apart else 0] * uniform_on) * logit_scale * b
        coef_p = coef_p + coef_w * labels.w_sum
    if z_loss:
        coef_p = coef_p + torch.where(label_on == 0.0, 0.0, scales[1] * label_on) * logit_scale * 2.0 * z_loss * lse
    return loss, z_term, lse, coef_p, coef_y, coef_w


@combine_partials.register_fake
def _(gathered, target, uniform_rows, world, classes, has_weight, ignore_index, reduction, label_smoothing,
      smoothing, scale, kl, z_loss, softcap, logit_scale, loss_dtype, compute_grad):
    shape = target.shape if reduction == "none" else ()
    loss = gathered.new_empty(shape, dtype=loss_dtype)
    if not compute_grad:
        empty = gathered.new_empty(0)
        return loss, torch.empty_like(loss), empty, empty, empty, empty
    rows = [gathered.new_empty(target.shape) for _ in range(3)]
    smoothed = LossForm(ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap,
                        logit_scale).coefficients(classes)[1] != 0.0
    return loss, torch.empty_like(loss), *rows, gathered.new_empty(target.shape if smoothed else 0)


def logits_grad(x, target, weight, lse, coef_p, coef_y, coef_w, class_offset: int, ignore_index, logit_scale: float,
                softcap):
    """The gradient of shard columns ``x`` (N, C_r, S) of the untransformed logits, in the
    accumulation dtype: coef_p p - coef_w w - coef_y [j == y] with p = exp(x - lse), times the
    softcap's derivative (the per-row coefficients hold the reduction's scale, grad_output and
    logit_scale)."""
    xs, t = _transformed(x, logit_scale, softcap)
    y, inside = _labels_in(target, class_offset, x.shape[1], ignore_index)
    # in place on one buffer: besides the transformed logits, the gradient is all this allocates
    g = torch.sub(xs, lse.unsqueeze(1)).exp_().mul_(coef_p.unsqueeze(1))
    if coef_w is not None:
        w = torch.ones(x.shape[1], dtype=xs.dtype, device=x.device) if weight is None else weight.to(xs.dtype)
        g.addcmul_(coef_w.unsqueeze(1), w.view(1, -1, 1), value=-1.0)
    g.scatter_add_(1, y.unsqueeze(1), torch.where(inside, -coef_y, 0.0).unsqueeze(1))
    if t is not None:
        g.mul_(t.mul_(t).neg_().add_(1.0))
    return g


@torch.library.custom_op("smoothce::shard_grad", mutates_args=())
def shard_grad(
    x: Tensor,  # (N, C_r, S) the shard: classes [class_offset, class_offset + C_r)
    target: Tensor,  # (N, S) int
    weight: Optional[Tensor],  # (C_r,)
    lse: Tensor,  # (N, S) the log-sum-exp over all the classes
    coef_p: Tensor,  # (N, S)
    coef_y: Tensor,  # (N, S)
    coef_w: Optional[Tensor],  # (N, S)
    class_offset: int,
    ignore_index: Optional[int],
    logit_scale: float,
    softcap: Optional[float],
) -> Tensor:
    """The shard's gradient (:func:`logits_grad`) in its dtype."""
    return logits_grad(x, target, weight, lse, coef_p, coef_y, coef_w, class_offset, ignore_index, logit_scale,
                       softcap).to(x.dtype)


@shard_grad.register_fake
def _(x, target, weight, lse, coef_p, coef_y, coef_w, class_offset, ignore_index, logit_scale, softcap):
    return torch.empty_like(x)


class _ShardGrad(torch.autograd.Function):
    """The loss, already computed from the combined partials, with the shard's gradient attached:
    backward recomputes it from the shard and the saved per-row values, with no communication."""

    @staticmethod
    def forward(ctx, x3, loss, y2, weight, lse, coef_p, coef_y, coef_w, class_offset, ignore_index, logit_scale,
                softcap, per_row):
        ctx.save_for_backward(x3, y2, weight, lse, coef_p, coef_y, coef_w)
        ctx.args = (class_offset, ignore_index, logit_scale, softcap)
        ctx.per_row = per_row  # reduction 'none': a grad_output per row
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        x3, y2, weight, lse, coef_p, coef_y, coef_w = ctx.saved_tensors
        go = grad_loss.to(lse.dtype)
        go = go.reshape(lse.shape) if ctx.per_row else go
        grad = torch.ops.smoothce.shard_grad(x3, y2, weight, lse, coef_p * go, coef_y * go,
                                             None if coef_w is None else coef_w * go, *ctx.args)
        return (grad,) + (None,) * 12


# --------------------------------------------------------------------------------------------
# the loss of a shard, globally exact
# --------------------------------------------------------------------------------------------


def split_cross_entropy(x, target, weight, form: LossForm, uniform_rows, loss_dtype, split: Split):
    """(loss, z_term) of LossForm's loss over all ``split.classes`` classes, from this rank's
    columns ``x`` (N, C_r, d1, ...) of the logits, the replicated labels ``target`` (N, d1, ...),
    this rank's class weights ``weight`` (C_r,) and ``uniform_rows`` (target's shape)."""
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    x3, y2 = x.reshape(N, C, S), target.reshape(N, S)
    u2 = None if uniform_rows is None else uniform_rows.reshape(N, S)
    smoothing = form.coefficients(split.classes)[1] != 0.0
    partials = torch.ops.smoothce.shard_partials(x3.detach(), y2, weight, split.offset, split.classes,
                                                 form.ignore_index, form.logit_scale, form.softcap, smoothing)
    compute_grad = torch.is_grad_enabled() and x.requires_grad
    loss, z_term, lse, coef_p, coef_y, coef_w = torch.ops.smoothce.combine_partials(
        _all_gather(partials, split), y2, u2, split.world, split.classes, weight is not None, *form.as_args(),
        loss_dtype or x.dtype, compute_grad)
    if form.reduction == "none":
        loss, z_term = loss.view(target.shape), z_term.view(target.shape)
    if compute_grad:
        loss = _ShardGrad.apply(x3, loss, y2, weight, lse, coef_p, coef_y, coef_w if smoothing else None,
                                split.offset, form.ignore_index, form.logit_scale, form.softcap,
                                form.reduction == "none")
    return loss, z_term


# --------------------------------------------------------------------------------------------
# DTensor logits
# --------------------------------------------------------------------------------------------


def _local(t, role: str, logits, mesh_dim: int):
    """The local tensor of a DTensor smoothce takes (a plain tensor as it is); ValueError else."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    why = dtensor_reason(t, role, logits, mesh_dim)
    if why is not None:
        raise ValueError("smoothce: " + why)
    return t.to_local()


def dtensor_split(t, mesh_dim: int, dim: int) -> Split:
    """Where this rank's slice of DTensor ``t``'s classes (its dim ``dim``, sharded over mesh dim
    ``mesh_dim``) lies: DTensor's Shard splits as torch.chunk does, ceil(V / tp) per rank, fewer at
    the end."""
    mesh = t.device_mesh
    world, rank, V = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim), t.shape[dim]
    local = t.to_local().shape[dim]
    per_rank = -(-V // world)
    offset = min(rank * per_rank, V)
    if local != min(V, offset + per_rank) - offset:
        raise ValueError(f"smoothce: rank {rank} holds {local} of {V} classes, not the "
                         f"{min(V, offset + per_rank) - offset} of torch.chunk's split")
    return Split(mesh.get_group(mesh_dim), rank, world, offset, V)


def local_per_class(t, role: str, sharded_like, mesh_dim: int, split: Split, columns: int):
    """This rank's slice of a per-class tensor (class weights, a bias): a plain (V,) tensor or a
    Replicate DTensor sliced, a DTensor sharded like the classes as it is."""
    from torch.distributed.tensor import DTensor

    sharded = isinstance(t, DTensor) and not all(p.is_replicate() for p in t.placements)
    t = _local(t, role, sharded_like, mesh_dim)
    return t if t is None or sharded else t[split.offset:split.offset + columns]


def replicated(mesh, *tensors):
    """Each tensor, the same on every rank, as a Replicate DTensor on ``mesh``."""
    from torch.distributed.tensor import DTensor, Replicate

    return tuple(DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False) for t in tensors)


def dtensor_cross_entropy(logits, target, weight, form: LossForm, uniform_rows, loss_dtype):
    """(loss, z_term) of DTensor logits sharded on the classes, as Replicate DTensors on their mesh.

    The labels (and uniform_rows) are replicated: plain tensors or Replicate DTensors. Class
    weights are a plain (V,) tensor, a Replicate DTensor, or a DTensor sharded like the classes."""
    dim, why = class_split(logits)
    if dim is None:
        raise ValueError("smoothce: " + why)
    split = dtensor_split(logits, dim, 1)
    local = logits.to_local()
    weight = local_per_class(weight, "class weights", logits, dim, split, local.shape[1])
    loss, z_term = split_cross_entropy(local, _local(target, "labels", logits, dim), weight, form,
                                       _local(uniform_rows, "uniform_rows", logits, dim), loss_dtype, split)
    return replicated(logits.device_mesh, loss, z_term)
