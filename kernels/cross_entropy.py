"""The loss LossForm describes, from two ops: per-row statistics of the logits, and the gradient
from per-row derivatives.

Every way people write cross-entropy reduces to a cross-entropy against a target distribution
built from the labels (kernels/form.py). For a row i with label y_i, class weights w (all ones
without weight), x = softcap(logit_scale * logits) and (a, b, c) = LossForm.coefficients(V):

    loss_i = sum_j q_ij (lse_i - x_ij) + c + z lse_i^2,          q_ij = a w[y_i] [j == y_i] + b w_j
           = Q_i lse_i - a w[y_i] l_i - b u_i + c + z lse_i^2,    Q_i = a w[y_i] + b sum_j w_j,

with three statistics of the row: lse_i = logsumexp_j x_ij, the label's logit l_i = x_i(y_i) and
the weighted sum u_i = sum_j w_j x_ij (needed only with smoothing). Everything else (ignored rows,
the 'mean' divisors, uniform_rows, z-loss, the KL constant, the reduction) is arithmetic on
N numbers. Hence two ops:

- ``smoothce::cross_entropy_stats``: one read of the logits, (lse, l, u) of every row, (3, rows).
- ``smoothce::cross_entropy_grad``: its backward. Since d lse_i / d x_ij = p_ij = exp(x_ij - lse_i),
  d l_i / d x_ij = [j == y_i] and d u_i / d x_ij = w_j, the logits' gradient from the per-row
  derivatives g of the result is (g_lse_i p_ij + g_l_i [j == y_i] + g_u_i w_j) dx_ij / dlogits_ij:
  one read of the logits and one write of the gradient.

:func:`loss_from_stats` is the loss as plain torch on the statistics, so autograd (AOTAutograd
under torch.compile, where Inductor fuses those few N-sized ops) derives g, including whatever
multiplies the loss afterwards: grad_output 1, 0.25, a tensor, or per row for 'none'.

Both ops work on columns [class_offset, class_offset + C) of ``classes`` classes, labels numbered
among all of them. So a vocabulary-parallel head runs them on its shard: the shards' statistics
combine into the row's (the logsumexp of their lse, the sums of their l and u: one collective
round), the loss is loss_from_stats of the combined ones, and each shard's gradient needs only the
combined lse and g (no communication in backward).

Where the gradient is computed, and why. A training step reads or writes logits-sized tensors
    gradient in forward:  forward reads the logits and writes the gradient for grad_output = 1
                          (2; a two-pass kernel re-reads each row, from L2 while it is there);
                          backward scales it by grad_output unless that is 1 (2 more: 4);
    gradient in backward: forward reads the logits once; backward reads them once and writes the
                          gradient already scaled (3, whatever grad_output is).
Forward cannot know grad_output in either mode: in eager it arrives afterwards, and under
torch.compile it is a graph input while the graph is traced, so the compiled step would always
pay the scaling pass (4, and 5 on HBM at large V). The first saves one access when grad_output
turns out to be 1 and costs one otherwise; these ops take the second, which bounds every step
at 3 (what Inductor's own cross-entropy and Quack move), needs no second pass over a row at any
V, and leaves the logits' gradient unwritten until something asks for it. (A constant scale of
the loss is folded into LossForm.scale by the detector, but here it would change nothing.) The
fused head (kernels/linear_cross_entropy.py) keeps the gradient in forward: its chunks' logits are
gone by backward (recomputing them is a GEMM), and a scalar grad_output commutes with the GEMMs
that consume a chunk's gradient, so it scales the (N, D) and (V, D) results, never anything of
the logits' size.

No host-device synchronisation. The labels are checked on CPU, where it is free.

Layout, low to high: kernels/inputs.py (checks, labels, kernel choice) -> the Triton kernels
(kernels/cross_entropy_triton.py) and the torch path (kernels/cross_entropy_torch.py) -> here:
the custom ops with their fakes and autograd -> the loss from statistics -> the functionals.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from smoothce.kernels.form import LossForm
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
    check_uniform_rows,
    is_dtensor,
    kernel_choice,
)

__all__ = ["CrossEntropyLoss", "cross_entropy", "fused_cross_entropy", "loss_from_stats"]

# Rows of the statistics: what each row of a cross_entropy_stats result (and of its gradient) holds.
LSE, LABEL_LOGIT, WEIGHTED_SUM = 0, 1, 2


def _launchers(logits: torch.Tensor):
    """(statistics, gradient) launchers for these logits; the Triton module is imported only when
    it runs."""
    if kernel_choice(logits) == "triton":
        from smoothce.kernels.cross_entropy_triton import launch_row_grad, launch_row_stats

        return launch_row_stats, launch_row_grad
    from smoothce.kernels.cross_entropy_torch import torch_row_grad, torch_row_stats

    return torch_row_stats, torch_row_grad


def _as_rows(t):
    """(N, C, d1, ...) -> an (N, C, S) view; C is dim 1 as in F.cross_entropy."""
    N, C = t.shape[0], t.shape[1]
    return t.reshape(N, C, math.prod(t.shape[2:]))  # not -1: ambiguous when N = 0


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-row and per-class vectors as the kernels index them (a copy of a few numbers at most)."""
    return None if t is None else t.contiguous()


def _label_rows(target):
    """(N, d1, ...) labels -> (N, S)."""
    return target.reshape(target.shape[0], math.prod(target.shape[1:]))


# --------------------------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("smoothce::cross_entropy_stats", mutates_args=())
def cross_entropy_stats_op(
    logits: torch.Tensor,  # (N, C, d1, ...): columns [class_offset, class_offset + C) of the classes
    target: torch.Tensor,  # (N, d1, ...) int, labels among all the classes
    weight: Optional[torch.Tensor],  # (C,) these columns' class weights
    ignore_index: Optional[int],  # with classes: the labels allowed (checked on CPU)
    classes: int,  # how many classes in all
    class_offset: int,
    logit_scale: float,
    softcap: Optional[float],
    weighted_sum: bool,  # also sum_j w_j x_ij (label smoothing needs it)
) -> torch.Tensor:
    """(3, N * d1 * ...) in the accumulation dtype: each row's lse, label logit (0 where the label
    is not one of these columns) and weighted sum (0 without weighted_sum), of x = softcap(logit_scale
    * logits)."""
    if logits.device.type == "cpu":
        check_labels_on_cpu(target, classes, ignore_index)
    x3 = _as_rows(logits)
    out = logits.new_empty((3, x3.shape[0] * x3.shape[2]), dtype=acc_dtype(logits.dtype))
    if not weighted_sum:
        out[WEIGHTED_SUM].zero_()
    _launchers(logits)[0](x3, _label_rows(target), _dense(weight), out, class_offset=class_offset,
                          logit_scale=logit_scale, softcap=softcap, weighted_sum=weighted_sum)
    return out


@cross_entropy_stats_op.register_fake
def _(logits, target, weight, ignore_index, classes, class_offset, logit_scale, softcap, weighted_sum):
    return logits.new_empty((3, target.numel()), dtype=acc_dtype(logits.dtype))


@torch.library.custom_op("smoothce::cross_entropy_grad", mutates_args=())
def cross_entropy_grad_op(
    grad_stats: torch.Tensor,  # (3, rows): d(result) / d(lse, label logit, weighted sum)
    logits: torch.Tensor,  # (N, C, d1, ...), as for cross_entropy_stats
    target: torch.Tensor,  # (N, d1, ...) int
    weight: Optional[torch.Tensor],  # (C,)
    lse: torch.Tensor,  # (rows,) the lse of the whole row (all the classes)
    class_offset: int,
    logit_scale: float,
    softcap: Optional[float],
    weighted_sum: bool,  # whether grad_stats' weighted-sum row counts
) -> torch.Tensor:
    """d(result) / d(logits), in the logits' dtype and shape."""
    grad = torch.empty_like(logits)
    _launchers(logits)[1](grad_stats.contiguous(), _as_rows(logits), _label_rows(target), _dense(weight),
                          lse.contiguous(), _as_rows(grad),
                          class_offset=class_offset, logit_scale=logit_scale, softcap=softcap,
                          weighted_sum=weighted_sum)
    return grad


@cross_entropy_grad_op.register_fake
def _(grad_stats, logits, target, weight, lse, class_offset, logit_scale, softcap, weighted_sum):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, weight, _, _, class_offset, logit_scale, softcap, weighted_sum = inputs
    ctx.save_for_backward(logits, target, weight, output)
    ctx.params = (class_offset, logit_scale, softcap, weighted_sum)


def _backward(ctx, grad_stats):
    logits, target, weight, stats = ctx.saved_tensors
    grad = torch.ops.smoothce.cross_entropy_grad(grad_stats, logits, target, weight, stats[LSE], *ctx.params)
    return (grad,) + (None,) * 8


cross_entropy_stats_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# The loss from the statistics
# --------------------------------------------------------------------------------------------


def loss_from_stats(stats: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], form: LossForm,
                    classes: int, uniform_rows: Optional[torch.Tensor] = None):
    """(loss, z part) of the loss ``form`` describes, from the statistics (3, rows) of rows whose
    labels are ``target`` (any shape with that many elements) over ``classes`` classes with class
    weights ``weight``; 'none' returns target's shape. Plain differentiable torch on N numbers.

    Rows that count nowhere go through ``where``, not a multiplication by 0: their derivative is
    then exactly 0 even where 'mean' divides by a sum of 0 (every label ignored: the loss is nan
    and the gradient 0, as in PyTorch). A label outside [0, classes) makes its row nan.
    """
    acc = stats.dtype
    labels = Labels(target.reshape(-1), weight, form.ignore_index, classes, acc,
                    None if uniform_rows is None else uniform_rows.reshape(-1))
    lse, label_logit, weighted = stats.unbind(0)
    a, b, c = form.coefficients(classes)
    label_on = labels.row_mask
    counted = label_on != 0.0
    part = a * labels.wy * (lse - label_logit)
    if c:
        part = part + c
    smooth = None
    if b != 0.0:
        smooth = b * (labels.w_sum * lse - weighted)
        if uniform_rows is None:  # the label term's rows and divisor
            part, smooth = part + smooth, None
        else:
            uniform_on = labels.uniform_mask
            smooth = torch.where(uniform_on != 0.0, uniform_on * smooth, 0.0)
    ce = torch.where(counted, label_on * part, 0.0)
    z = torch.where(counted, (form.z_loss * label_on) * lse * lse, 0.0) if form.z_loss else torch.zeros_like(ce)
    loss, z = labels.reduce(ce, z, form.reduction, form.z_loss, smooth)
    if form.reduction == "none":
        loss, z = loss.view(target.shape), z.view(target.shape)
    return loss, z


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------


def _validate(logits, target, weight, uniform_rows, loss_dtype, form: LossForm):
    check_tensors(input=logits, target=target)
    check_dtype("input", logits, FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
    if logits.dim() < 2:
        raise ValueError(f"smoothce: input must have shape (N, C) or (N, C, d1, ...), got {tuple(logits.shape)}")
    check_labels(target, (logits.shape[0],) + tuple(logits.shape[2:]),
                 f"input shape {tuple(logits.shape)} (the class dim is 1)")
    if weight is not None:
        check_per_class("weight", weight, logits.shape[1])
    if uniform_rows is not None:
        check_uniform_rows(uniform_rows, target, form)
    check_same_device("input", input=logits, target=target, weight=weight, uniform_rows=uniform_rows)
    check_loss_dtype(loss_dtype)


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
    process_group=None,
):
    """The loss that LossForm(ignore_index, reduction, label_smoothing, ...) describes: the logits'
    statistics (smoothce::cross_entropy_stats), then :func:`loss_from_stats`.

    uniform_rows (bool, target's shape): the smoothing term counts on exactly those rows, the label
    term and z-loss on rows whose label is not ignore_index; 'mean' then divides each term by its
    own rows (the label term by the sum of w[y] over kept rows, the smoothing term by the number
    of uniform rows). loss_dtype: the returned loss's dtype (default: the logits'). With
    return_z_loss returns (loss, z_term), z_term being the (non-differentiable) z-loss part.

    Logits whose classes are split across processes (kernels/vocab_parallel.py): with
    ``process_group``, each rank passes its equal slice of the classes (rank r the r-th) and of the
    class weights; DTensor logits sharded on the classes need nothing more, and their loss is a
    Replicate DTensor. Either way the loss is that of all the classes, on every rank.
    """
    form = LossForm(ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale)
    _validate(logits, target, weight, uniform_rows, loss_dtype, form)
    if process_group is not None or is_dtensor(logits):
        from smoothce.kernels import vocab_parallel

        if process_group is None:
            loss, z = vocab_parallel.dtensor_cross_entropy(logits, target, weight, form, uniform_rows, loss_dtype)
        else:
            split = vocab_parallel.process_group_split(process_group, logits.shape[1])
            loss, z = vocab_parallel.split_cross_entropy(logits, target, weight, form, uniform_rows, loss_dtype,
                                                         split)
        return (loss, z) if return_z_loss else loss
    classes = logits.shape[1]
    stats = torch.ops.smoothce.cross_entropy_stats(logits, target, weight, ignore_index, classes, 0, form.logit_scale,
                                                   form.softcap, form.coefficients(classes)[1] != 0.0)
    loss, z = loss_from_stats(stats, target, weight, form, classes, uniform_rows)
    dtype = loss_dtype or logits.dtype
    loss = loss.to(dtype)
    return (loss, z.detach().to(dtype)) if return_z_loss else loss


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
    process_group=None,
):
    """F.cross_entropy (same signature and results, class indices or probabilities as the target), plus
    z-loss and softcap (class indices).

    With return_z_loss=True returns (loss, z_term): the loss includes z_loss * lse^2 (reduced like
    the loss), z_term is that part alone for logging. ``process_group`` and DTensor logits: the
    classes split across processes, as fused_cross_entropy takes them.
    """
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    # As F.cross_entropy: label_smoothing above 1 raises, below 0 means none.
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    eps = max(float(label_smoothing), 0.0)
    if isinstance(target, torch.Tensor) and target.dtype.is_floating_point:
        from smoothce.kernels.soft_cross_entropy import probability_cross_entropy

        return probability_cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=eps, z_loss=z_loss, softcap=softcap,
                                         return_z_loss=return_z_loss)
    if isinstance(input, torch.Tensor) and input.dim() == 1:  # unbatched (C,) with a scalar label
        out = cross_entropy(input.unsqueeze(0), target.unsqueeze(0), weight, None, ignore_index, None, reduction,
                            eps, z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss,
                            process_group=process_group)
        if reduction != "none":
            return out
        return tuple(t.squeeze(0) for t in out) if return_z_loss else out.squeeze(0)
    return fused_cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=eps, z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss,
                               process_group=process_group)


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
