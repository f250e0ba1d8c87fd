"""smoothce::cross_entropy: the loss LossForm describes and its gradient, in one pass over the logits.

Every way people write cross-entropy reduces to a cross-entropy against a target distribution
built from the labels (kernels/form.py). For a row i with label y_i, class weights w (all ones
without weight), x = softcap(logit_scale * logits) and (a, b, c) = LossForm.coefficients(V):

    q_ij   = a * w[y_i] * [j == y_i] + b * w_j                     (target distribution)
    loss_i = sum_j q_ij * (lse_i - x_ij) + c + z * lse_i^2
           = Q_i * lse_i - a * w[y_i] * x_iy - b * sum_j w_j x_ij + c + z * lse_i^2,
    Q_i    = a * w[y_i] + b * sum_j w_j.

Since d lse_i / d x_ij = softmax_ij = p_ij,

    d loss_i / d x_ij = (Q_i + 2 z lse_i) * p_ij - a * w[y_i] * [j == y_i] - b * w_j,

times 1 - (x_ij / cap)^2 under a softcap and logit_scale. Rows whose label is ignore_index
contribute 0 (with uniform_rows, the b term counts on those rows instead). 'mean' divides the
cross-entropy part by sum of w[y_i] over non-ignored rows (PyTorch's rule, which keeps smoothing
and weights consistent) and the z part by the count of non-ignored rows; with uniform_rows the b
term is divided by the number of its own rows instead (a hand-written smoothing term averaged
over every row next to nll_loss's mean over the rows it keeps). Those divisors depend
only on the labels, so they are computed before the logits are read and the kernel writes the
finished gradient in the same launch: backward only scales it by grad_output. Nothing here
synchronises with the device.

Layout, low to high: kernels/inputs.py (checks, labels, kernel choice) -> the Triton kernel
(kernels/cross_entropy_triton.py, tuned by kernels/cross_entropy_tuning.py) and the torch path
(kernels/cross_entropy_torch.py) -> here: the custom op, its fake and autograd -> functionals.
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

__all__ = ["CrossEntropyLoss", "cross_entropy", "fused_cross_entropy"]


def _runner(logits: torch.Tensor):
    """The launcher for these logits; the Triton module is imported only when it runs."""
    if kernel_choice(logits) == "triton":
        from smoothce.kernels.cross_entropy_triton import launch_cross_entropy

        return launch_cross_entropy
    from smoothce.kernels.cross_entropy_torch import torch_cross_entropy

    return torch_cross_entropy


# --------------------------------------------------------------------------------------------
# The custom op
# --------------------------------------------------------------------------------------------


def _as_rows(logits, target):
    """(N, C, d1, ...) -> an (N, C, S) view and (N, S) labels; C is dim 1 as in F.cross_entropy."""
    N, C = logits.shape[0], logits.shape[1]
    S = math.prod(logits.shape[2:])  # not -1: ambiguous when N = 0
    return logits.reshape(N, C, S), target.reshape(N, S)


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
    x3, y2 = _as_rows(logits, target)
    u2 = uniform_rows.reshape(y2.shape) if uniform_rows is not None else None
    N, C, S = x3.shape
    a, b, c = form.coefficients(C)
    if logits.device.type == "cpu":
        check_labels_on_cpu(y2, C, ignore_index)
    # Per-row results and scales in the accumulation dtype: fp32, or fp64 for fp64 input.
    acc = acc_dtype(logits.dtype)
    labels = Labels(y2, weight, ignore_index, C, acc, u2)
    ce_rows = torch.empty(N * S, device=logits.device, dtype=acc)
    z_rows = torch.zeros(N * S, device=logits.device, dtype=acc)
    smooth_rows = torch.empty(N * S, device=logits.device, dtype=acc) if u2 is not None else None
    grad = torch.empty_like(logits) if compute_grad else None
    grad3 = grad.view(N, C, S) if grad is not None else None
    _runner(logits)(x3, y2, weight, labels.scales(reduction), ce_rows, z_rows, grad3, ignore_index=ignore_index,
                    a=a, b=b, c=c, z_loss=form.z_loss, softcap=form.softcap, logit_scale=form.logit_scale,
                    uniform_rows=u2, smooth_rows=smooth_rows)
    loss, z = labels.reduce(ce_rows.view(y2.shape), z_rows.view(y2.shape), reduction, form.z_loss,
                            None if smooth_rows is None else smooth_rows.view(y2.shape))
    if reduction == "none":
        loss, z = loss.view(target.shape), z.view(target.shape)
    dtype = loss_dtype or logits.dtype
    return loss.to(dtype), z.to(dtype), grad if grad is not None else logits.new_empty(0)


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
    # loss.backward() scales by 1: a whole pass over the gradient for nothing, so it is skipped
    # (on CPU reading the scale is no device sync; on CUDA the kernel reads it on the device).
    if ctx.reduction != "none" and grad.device.type == "cuda":
        from smoothce.kernels.cross_entropy_triton import scale_in_place

        torch.autograd.graph.increment_version(scale_in_place(grad, grad_loss))  # as mul_ would
        return (grad,) + rest
    if ctx.reduction != "none" and grad.device.type == "cpu" and grad_loss.item() == 1.0:
        torch.autograd.graph.increment_version(grad)
        return (grad,) + rest
    return (grad.mul_(scale),) + rest


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


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
    """The loss that LossForm(ignore_index, reduction, label_smoothing, ...) describes, through
    smoothce::cross_entropy.

    uniform_rows (bool, target's shape): the smoothing term counts on exactly those rows, the label
    term and z-loss on rows whose label is not ignore_index; 'mean' then divides each term by its
    own rows (the label term by the sum of w[y] over kept rows, the smoothing term by the number
    of uniform rows). loss_dtype: the
    returned loss's dtype (default: the logits'). The gradient is computed in the forward launch
    only when autograd will need it.

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
