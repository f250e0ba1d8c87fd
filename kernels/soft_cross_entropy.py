"""smoothce::soft_cross_entropy: a loss against a distribution per row, fused like the label losses.

Probability-target cross-entropy, knowledge distillation (a KL divergence against a teacher's
softmax at a temperature, with the T**2 factor, next to a cross-entropy on the labels or not),
reverse and symmetric KL, and mixup's two labels are one op: SoftTargetForm describes the term
against the target tensor, LossForm the term on the labels (kernels/form.py), and
kernels/soft_inputs.py turns the labels into per-row coefficients so that one kernel body serves
every combination and reduction. One launch per forward on GPU (kernels/soft_cross_entropy_triton.py),
a torch implementation on CPU (kernels/soft_cross_entropy_torch.py); no host sync.

Where the gradient is computed is chosen per call by the bytes a training step moves over the
N x V tensors (``gradient_in_forward``): in forward, the kernel reads the logits and the target
and writes the gradient in the same pass, and backward scales it by grad_output; in backward,
forward keeps five statistics per row and backward reads the logits and the target again and
writes the gradient already scaled. The target's own gradient, when it requires grad, is
computed in backward (torch ops on any device: a rare case, kept simple).

Layout, low to high: the kernels -> here: where the gradient goes -> the custom ops (with fakes)
-> autograd -> the public functionals.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from smoothce.kernels.form import LossForm, SoftTargetForm
from smoothce.kernels.gradients import scale_stored, traced
from smoothce.kernels.inputs import (
    FLOAT_DTYPES,
    acc_dtype,
    check_dtype,
    check_labels_on_cpu,
    check_loss_dtype,
    check_per_class,
    check_same_device,
    check_tensors,
    kernel_choice,
)
from smoothce.kernels.soft_inputs import (
    STATISTICS, RowCoefficients, Terms, check_mixup_labels, check_soft_target, check_target_rows,
)

__all__ = ["fused_soft_cross_entropy", "gradient_in_forward", "probability_cross_entropy"]

GRADIENTS = ("none", "forward", "backward")


def _runner(logits: Tensor):
    """The launcher for these logits; the Triton module is imported only when it runs."""
    if kernel_choice(logits) == "triton":
        from smoothce.kernels.soft_cross_entropy_triton import launch_soft_cross_entropy

        return launch_soft_cross_entropy
    from smoothce.kernels.soft_cross_entropy_torch import torch_soft_cross_entropy

    return torch_soft_cross_entropy


# --------------------------------------------------------------------------------------------
# Where the gradient is computed
# --------------------------------------------------------------------------------------------


def gradient_in_forward(logits: Tensor, target: Optional[Tensor], reduction: str, scaled: bool) -> bool:
    """Whether the logits' gradient is written in forward (else in backward), by bytes moved.

    With R the bytes of the N x V inputs (the logits, and the target when there is one) and G
    those of the gradient (the logits' dtype):

        in forward:   forward reads R and writes G; backward scales G by grad_output: 2 G more
                      when that pass runs.                                   R + G (+ 2 G)
        in backward:  forward reads R; backward reads R again and writes G.   2 R + G

    The scaling pass runs (``scaled``) under torch.compile (the traced backward multiplies out of
    place) and for 'none' (a grad_output per row); in eager a scalar loss's backward from
    loss.backward() skips it. So forward wins when 2 G <= R or when nothing is scaled: always in
    eager, and traced when the target is at least as wide as the logits (bf16 student and bf16
    teacher: 5 N V either way, and forward holds one gradient until backward instead of the
    logits and the target). A call without a target reads only the logits (R = G): traced, it
    moves 3 N V with the gradient in backward against 4 in forward.
    """
    if not scaled and reduction != "none":
        return True
    read = logits.element_size() + (target.element_size() if target is not None else 0)
    return 2 * logits.element_size() <= read


# --------------------------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------------------------


def _rows(logits: Tensor) -> tuple:
    """The rows of (N, C, d1, ...) logits: (N, d1, ...); the class dim is 1."""
    return (logits.shape[0],) + tuple(logits.shape[2:])


def _as_rows(t: Optional[Tensor], logits: Tensor) -> Optional[Tensor]:
    """(N, C, d1, ...) -> an (N, C, S) view."""
    if t is None:
        return None
    return t.reshape(logits.shape[0], logits.shape[1], math.prod(logits.shape[2:]))  # not -1: N may be 0


class _Call:
    """One call's forms, terms and per-row coefficients."""

    def __init__(self, logits, target, labels, labels_b, lam, weight, target_rows, form_args, soft_args):
        self.form = LossForm(*form_args)
        self.soft = SoftTargetForm(*soft_args)
        self.rows = _rows(logits)
        self.classes = logits.shape[1]
        self.acc = acc_dtype(logits.dtype)
        self.terms = Terms.of(self.form, self.soft, self.classes, labels is not None, target is not None,
                              labels_b is not None)
        self.coefficients = RowCoefficients(self.form, self.soft, self.terms, self.rows, self.classes, labels,
                                            labels_b, lam, weight, self.acc, logits.device, target_rows)
        if logits.device.type == "cpu" and (self.terms.label or self.terms.uniform or self.terms.z):
            for y in (labels, labels_b):
                if y is not None:
                    check_labels_on_cpu(y, self.classes, self.form.ignore_index)

    def run(self, logits, target, labels, labels_b, weight, coef, loss_rows, grad, stats, from_stats=False):
        x3 = _as_rows(logits, logits)
        S = x3.shape[2]
        _runner(logits)(x3, _as_rows(target, logits),
                        None if labels is None else labels.reshape(-1, S),
                        None if labels_b is None else labels_b.reshape(-1, S),
                        coef, weight, loss_rows, _as_rows(grad, logits), stats, terms=self.terms,
                        from_stats=from_stats)


@torch.library.custom_op("smoothce::soft_cross_entropy", mutates_args=())
def soft_cross_entropy_op(
    logits: Tensor,  # (N, C, d1, ...)
    target: Optional[Tensor],  # (N, C, d1, ...) float: probabilities, log-probabilities or logits
    labels: Optional[Tensor],  # (N, d1, ...) int
    labels_b: Optional[Tensor],  # (N, d1, ...) int: mixup's second labels
    lam: Optional[Tensor],  # broadcastable to (N, d1, ...): mixup's weight of labels
    weight: Optional[Tensor],  # (C,)
    target_rows: Optional[Tensor],  # (N, d1, ...) bool: the rows the target part counts
    # LossForm: the label part
    ignore_index: Optional[int],
    reduction: str,
    label_smoothing: float,
    smoothing: str,
    scale: float,
    kl: bool,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    # SoftTargetForm: the target part
    target_kind: str,
    target_logit_scale: float,
    soft_logit_scale: float,
    soft_label_smoothing: float,
    soft_scale: float,
    soft_kl: bool,
    reverse_kl: float,
    loss_dtype: Optional[torch.dtype],
    gradient: str,  # "none", "forward" (written here) or "backward" (statistics kept for it)
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, the logits' gradient for grad_output = 1 or empty, per-row statistics or empty)."""
    call = _Call(logits, target, labels, labels_b, lam, weight, target_rows,
                 (ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale),
                 (target_kind, target_logit_scale, soft_logit_scale, soft_label_smoothing, soft_scale, soft_kl,
                  reverse_kl))
    n = math.prod(call.rows)
    loss_rows = torch.empty(n, dtype=call.acc, device=logits.device)
    grad = torch.empty_like(logits) if gradient == "forward" else None
    stats = torch.empty(n, STATISTICS, dtype=call.acc, device=logits.device) if gradient == "backward" else None
    call.run(logits, target, labels, labels_b, weight, call.coefficients.coefficients(), loss_rows, grad, stats)
    loss = call.coefficients.reduce(loss_rows).to(loss_dtype or logits.dtype)
    return (loss, grad if grad is not None else logits.new_empty(0),
            stats if stats is not None else logits.new_empty(0, dtype=call.acc))


@soft_cross_entropy_op.register_fake
def _(logits, target, labels, labels_b, lam, weight, target_rows, ignore_index, reduction, *rest):
    loss_dtype, gradient = rest[-2], rest[-1]
    shape = _rows(logits) if reduction == "none" else ()
    acc = acc_dtype(logits.dtype)
    grad = torch.empty_like(logits) if gradient == "forward" else logits.new_empty(0)
    stats = (logits.new_empty(math.prod(_rows(logits)), STATISTICS, dtype=acc) if gradient == "backward"
             else logits.new_empty(0, dtype=acc))
    return logits.new_empty(shape, dtype=loss_dtype or logits.dtype), grad, stats


@torch.library.custom_op("smoothce::soft_cross_entropy_backward", mutates_args=())
def soft_cross_entropy_backward_op(
    grad_loss: Tensor,  # () or (N, d1, ...) for 'none'
    logits: Tensor,
    target: Optional[Tensor],
    labels: Optional[Tensor],
    labels_b: Optional[Tensor],
    lam: Optional[Tensor],
    weight: Optional[Tensor],
    target_rows: Optional[Tensor],
    stats: Tensor,  # (rows, 5): what forward kept
    ignore_index: Optional[int],
    reduction: str,
    label_smoothing: float,
    smoothing: str,
    scale: float,
    kl: bool,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    target_kind: str,
    target_logit_scale: float,
    soft_logit_scale: float,
    soft_label_smoothing: float,
    soft_scale: float,
    soft_kl: bool,
    reverse_kl: float,
    logits_grad: bool,
    target_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(the logits' gradient, the target's gradient), each empty when not asked for, already
    multiplied by grad_loss: one more read of the logits and the target, one write."""
    call = _Call(logits, target, labels, labels_b, lam, weight, target_rows,
                 (ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale),
                 (target_kind, target_logit_scale, soft_logit_scale, soft_label_smoothing, soft_scale, soft_kl,
                  reverse_kl))
    go = grad_loss.to(call.acc)
    coef = call.coefficients.coefficients() * (go.reshape(-1, 1) if reduction == "none" else go)
    grad_x = grad_t = logits.new_empty(0)
    if logits_grad:
        grad_x = torch.empty_like(logits)
        call.run(logits, target, labels, labels_b, weight, coef, None, grad_x, stats, from_stats=True)
    if target_grad:
        from smoothce.kernels.soft_cross_entropy_torch import torch_target_gradient

        g = torch_target_gradient(_as_rows(logits, logits), _as_rows(target, logits), coef, weight, stats,
                                  terms=call.terms)
        grad_t = g.reshape(target.shape).to(target.dtype)
    return grad_x, grad_t


@soft_cross_entropy_backward_op.register_fake
def _(grad_loss, logits, target, *rest):
    logits_grad, target_grad = rest[-2], rest[-1]
    return (torch.empty_like(logits) if logits_grad else logits.new_empty(0),
            torch.empty_like(target) if target_grad else logits.new_empty(0))


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------

_OP_ARGS = 25  # inputs of smoothce::soft_cross_entropy
_TENSORS = 7  # logits, target, labels, labels_b, lam, weight, target_rows
_FORMS = slice(7, 23)  # LossForm's and SoftTargetForm's fields


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[8]
    ctx.gradient = inputs[-1]
    ctx.needs = (inputs[0].requires_grad, inputs[1] is not None and inputs[1].requires_grad)
    ctx.rows = _rows(inputs[0])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zeros((N, C)) for the unused gradient outputs
    if ctx.gradient == "forward":
        ctx.save_for_backward(output[1])
    else:
        ctx.save_for_backward(*inputs[:_TENSORS], output[2])
        ctx.forms = inputs[_FORMS]


def _backward(ctx, grad_loss, _grad, _stats):
    rest = (None,) * (_OP_ARGS - 2)
    if grad_loss is None:
        return (None, None) + rest
    if ctx.gradient == "none":
        raise RuntimeError("smoothce::soft_cross_entropy ran with gradient='none' (nothing was kept for "
                           "backward); call it with gradient='forward' or 'backward' to differentiate it")
    if ctx.gradient == "forward":
        (grad,) = ctx.saved_tensors
        go = grad_loss.reshape(ctx.rows[:1] + (1,) + ctx.rows[1:]) if ctx.reduction == "none" else grad_loss
        return (scale_stored(grad, go), None) + rest
    grad_x, grad_t = torch.ops.smoothce.soft_cross_entropy_backward(grad_loss, *ctx.saved_tensors[:_TENSORS],
                                                                    ctx.saved_tensors[-1], *ctx.forms, *ctx.needs)
    return (grad_x if ctx.needs[0] else None, grad_t if ctx.needs[1] else None) + rest


soft_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------


def _validate(logits, target, labels, labels_b, lam, weight, target_rows, loss_dtype, soft: SoftTargetForm):
    check_tensors(input=logits)
    check_dtype("input", logits, FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
    if logits.dim() < 2:
        raise ValueError(f"smoothce: input must have shape (N, C) or (N, C, d1, ...), got {tuple(logits.shape)}")
    if target is not None:
        check_tensors(target=target)
        check_soft_target(target, logits)
    check_mixup_labels(labels, labels_b, lam, _rows(logits))
    if target_rows is not None:
        check_target_rows(target_rows, _rows(logits))
    if weight is not None:
        check_per_class("weight", weight, logits.shape[1])
        if soft.soft_kl or soft.reverse_kl:
            raise ValueError("smoothce: class weights with a KL divergence to the target are not supported "
                             "(kl_div takes none)")
    check_same_device("input", input=logits, target=target, labels=labels, labels_b=labels_b, weight=weight,
                      target_rows=target_rows)
    check_loss_dtype(loss_dtype)


def fused_soft_cross_entropy(
    logits: Tensor,
    target: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    *,
    labels_b: Optional[Tensor] = None,
    lam: Optional[Tensor | float] = None,
    target_rows: Optional[Tensor] = None,
    ignore_index: Optional[int] = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    smoothing: str = "all",
    scale: float = 0.0,
    kl: bool = False,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    target_kind: str = "probs",
    target_logit_scale: float = 1.0,
    soft_logit_scale: float = 1.0,
    soft_label_smoothing: float = 0.0,
    soft_scale: float = 1.0,
    soft_kl: bool = False,
    reverse_kl: float = 0.0,
    loss_dtype: Optional[torch.dtype] = None,
):
    """The loss SoftTargetForm (the target part) and LossForm (the label part) describe, through
    smoothce::soft_cross_entropy.

    logits (N, C, d1, ...) with classes at dim 1; target of the same shape or None; labels (N, d1,
    ...) or None: they carry the label part, whose ``scale`` is 0 unless given, and mask the target
    part's rows (those equal to ignore_index count nowhere) unless target_rows (bool, the rows'
    shape) says which rows it counts. labels_b
    and lam (a number, or a tensor broadcastable to the rows): mixup, lam * label part(labels) +
    (1 - lam) * label part(labels_b), each part reduced as its own loss. ``reduction``
    reduces both parts, each as PyTorch does ('mean': the target part by its rows, the label part
    by the sum of w[y] over kept rows). ``loss_dtype``: the returned loss's dtype (default: the
    logits'). Gradients flow to the logits and to a target that requires grad.
    """
    form = LossForm(ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale)
    soft = SoftTargetForm(target_kind, target_logit_scale, soft_logit_scale, soft_label_smoothing, soft_scale,
                          soft_kl, reverse_kl)
    if isinstance(lam, (int, float)) and not isinstance(lam, bool) and isinstance(logits, Tensor):
        lam = torch.full((), float(lam), dtype=torch.float64, device=logits.device)  # one lam for every row
    _validate(logits, target, labels, labels_b, lam, weight, target_rows, loss_dtype, soft)
    if isinstance(lam, Tensor) and lam.device != logits.device and lam.dim() > 0:
        raise ValueError(f"smoothce: lam is on {lam.device} but input is on {logits.device}")
    lam = None if lam is None else lam.to(logits.device)
    grads = torch.is_grad_enabled() and (logits.requires_grad or (target is not None and target.requires_grad))
    if not grads:
        gradient = "none"
    elif (target is not None and target.requires_grad) or not gradient_in_forward(
            logits, target, reduction, scaled=traced(logits)):
        gradient = "backward"  # a target's gradient needs both read again: the logits' comes along
    else:
        gradient = "forward"
    loss, _, _ = torch.ops.smoothce.soft_cross_entropy(
        logits, target, labels, labels_b, lam, weight, target_rows, *form.as_args(), *soft.as_args(), loss_dtype,
        gradient)
    return loss


def probability_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, *,
                              ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                              z_loss: float = 0.0, softcap: Optional[float] = None, return_z_loss: bool = False):
    """F.cross_entropy with a probability target (same results): smoothce.cross_entropy's float-target
    case. 'mean' divides by the number of rows; an unbatched (C,) input takes a (C,) target."""
    if ignore_index >= 0:  # as eager
        raise RuntimeError("ignore_index is not supported for floating point target")
    if z_loss or return_z_loss:
        raise ValueError("smoothce: z_loss needs class-index targets (its rows are the labels')")
    if isinstance(input, Tensor) and input.dim() == 1:
        out = probability_cross_entropy(input.unsqueeze(0), target.unsqueeze(0), weight, reduction=reduction,
                                        label_smoothing=label_smoothing, softcap=softcap)
        return out.squeeze(0) if reduction == "none" else out
    return fused_soft_cross_entropy(input, target, weight=weight, reduction=reduction, softcap=softcap,
                                    soft_label_smoothing=label_smoothing)
