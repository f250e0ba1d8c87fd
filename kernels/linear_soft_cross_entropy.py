"""Fused linear loss against a distribution: a student's head (hidden @ weight.T + bias) and the loss
of smoothce::soft_cross_entropy in one op that never holds the student's N x V logits; given the
teacher's head as well (teacher_hidden @ teacher_weight.T + teacher_bias, no gradient), it never
holds the teacher's either.

Loss semantics are those of ``fused_soft_cross_entropy`` (kernels/soft_cross_entropy.py) applied
to ``x = hidden @ weight.T + bias``: a term against the target (probabilities, log-probabilities,
or a teacher's logits at a temperature: Hinton distillation's KL with its T**2), next to a term on
the labels or not, rows masked by the labels or by target_rows, every reduction with PyTorch's
divisors. kernels/soft_inputs.py turns the labels into per-row coefficients once, for all rows;
then rows go in chunks (the fused cross-entropy head's rule, :func:`chunk_rows`, counting every
(rows, V) buffer a chunk holds). Per chunk of R rows:

    x_c    = hidden_c @ weight.T (+ bias)            in hidden's dtype, as F.linear rounds
    t_c    = target rows, or teacher_hidden_c @ teacher_weight.T (+ teacher_bias)
    kernel : the soft op's own kernel on (x_c, t_c) with the chunk's coefficients: loss rows,
             and g = d(sum_i loss_i)/d(x_c)
    grad_hidden_c  = g @ weight,   grad_weight += g.T @ hidden_c,   grad_bias += sum of g's rows

The kernel is kernels/soft_cross_entropy_triton.py's on CUDA and kernels/soft_cross_entropy_torch.py
on CPU, unchanged: the chunk is just fewer rows of its (N, V) problem. The gradient goes into its
own chunk buffer (the soft kernels read the logits after writing part of the gradient, so it
cannot overwrite them): in the accumulation dtype on the torch path, with grad_weight accumulated
in fp32 and rounded once; in the input dtype on the Triton path, with grad_weight accumulated in
its own dtype (the fused cross-entropy head's bound, kernels/linear_cross_entropy_triton.py).

For 'sum' / 'mean' the gradients are computed in forward and backward scales them by grad_output.
'none' has a grad_output per row: forward computes the loss only, and backward runs the chunks
again with the coefficients times grad_output (one more pass of head GEMMs, still no N x V).

Layout, low to high: the chunk loop -> ``smoothce::`` custom ops (with fakes) -> autograd -> the
public functional.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from smoothce.kernels.form import LossForm, SoftTargetForm
from smoothce.kernels.gradients import scale_stored
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
from smoothce.kernels.linear_cross_entropy import chunk_rows
from smoothce.kernels.soft_inputs import RowCoefficients, Terms, check_mixup_labels, check_target_rows

__all__ = ["fused_linear_soft_cross_entropy"]


# ------------------------------------------------------------------------------------------------
# the chunk loop
# ------------------------------------------------------------------------------------------------
def _kernel(hidden: Tensor):
    """The soft op's kernel for these tensors, and the dtype its gradient buffer takes."""
    if kernel_choice(hidden) == "triton":
        from smoothce.kernels.soft_cross_entropy_triton import launch_soft_cross_entropy

        return launch_soft_cross_entropy, hidden.dtype
    from smoothce.kernels.soft_cross_entropy_torch import torch_soft_cross_entropy

    return torch_soft_cross_entropy, acc_dtype(hidden.dtype)


def _linear(h: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor) -> Tensor:
    """F.linear(h, w, b) into ``out``."""
    return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)


class _Call:
    """One call's forms, terms and per-row coefficients (for all N rows)."""

    def __init__(self, hidden, weight, has_target, labels, labels_b, lam, class_weight, target_rows, form_args,
                 soft_args):
        self.form = LossForm(*form_args)
        self.soft = SoftTargetForm(*soft_args)
        n, v = hidden.shape[0], weight.shape[0]
        self.acc = acc_dtype(hidden.dtype)
        self.terms = Terms.of(self.form, self.soft, v, labels is not None, has_target, labels_b is not None)
        self.coefficients = RowCoefficients(self.form, self.soft, self.terms, (n,), v, labels, labels_b, lam,
                                            class_weight, self.acc, hidden.device, target_rows)
        if hidden.device.type == "cpu" and (self.terms.label or self.terms.uniform or self.terms.z):
            for y in (labels, labels_b):
                if y is not None:
                    check_labels_on_cpu(y, v, self.form.ignore_index)

    def chunks(self, hidden, weight, bias, target, teacher, labels, labels_b, class_weight, coef, grads, rows):
        """Per-row loss (acc) over chunks of ``rows`` rows, and with ``grads`` the gradients of
        sum_i loss_i (coefficients ``coef`` (N, 6)) to hidden, weight and bias, in their dtypes.
        ``teacher``: (teacher_hidden, teacher_weight, teacher_bias) or None (``target`` given, or
        neither: the label part alone)."""
        n, d = hidden.shape
        v = weight.shape[0]
        dev = hidden.device
        kernel, g_dtype = _kernel(hidden)
        r = min(rows, n)
        loss_rows = torch.empty(n, dtype=self.acc, device=dev)
        x_buf = torch.empty(r, v, dtype=hidden.dtype, device=dev)
        t_buf = None if teacher is None else torch.empty(r, v, dtype=teacher[0].dtype, device=dev)
        grad_h = grad_w = grad_b = g_buf = None
        if grads:
            g_buf = torch.empty(r, v, dtype=g_dtype, device=dev)
            grad_h = torch.empty(n, d, dtype=hidden.dtype, device=dev)
            grad_w = torch.zeros(v, d, dtype=g_dtype, device=dev)  # accumulated chunk by chunk
            grad_b = None if bias is None else torch.zeros(v, dtype=self.acc, device=dev)
            w_g = weight.to(g_dtype)  # no copy unless a 16-bit head on the torch path
        for start in range(0, n, rows):
            end = min(start + rows, n)
            c = end - start
            x = _linear(hidden[start:end], weight, bias, x_buf[:c])
            if teacher is not None:
                t = _linear(teacher[0][start:end], teacher[1], teacher[2], t_buf[:c]).view(c, v, 1)
            else:
                t = None if target is None else target[start:end].view(c, v, 1)
            g = None if g_buf is None else g_buf[:c]
            kernel(x.view(c, v, 1), t,
                   None if labels is None else labels[start:end].view(c, 1),
                   None if labels_b is None else labels_b[start:end].view(c, 1),
                   coef[start:end], class_weight, loss_rows[start:end],
                   None if g is None else g.view(c, v, 1), None, terms=self.terms)
            if g is None:
                continue
            h = hidden[start:end].to(g_dtype)
            if grad_h.dtype == g_dtype:
                torch.mm(g, w_g, out=grad_h[start:end])
            else:
                grad_h[start:end] = torch.mm(g, w_g)
            grad_w.addmm_(g.t(), h)
            if grad_b is not None:
                grad_b += g.sum(dim=0, dtype=self.acc)
        if not grads:
            return loss_rows, None, None, None
        return (loss_rows, grad_h, grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype))


def _chunk_size(hidden, weight, teacher, chunk_size) -> int:
    """Rows per chunk: chunk_rows with every (rows, V) buffer a chunk holds counted (the student's
    logits, their gradient, the teacher's logits)."""
    if chunk_size:
        return chunk_size
    _, g_dtype = _kernel(hidden)
    itemsize = hidden.element_size() + g_dtype.itemsize + (0 if teacher is None else teacher[0].element_size())
    return chunk_rows(hidden.shape[0], weight.shape[0], weight.shape[1], itemsize)


def _teacher(teacher_hidden, teacher_weight, teacher_bias):
    return None if teacher_hidden is None else (teacher_hidden, teacher_weight, teacher_bias)


# ------------------------------------------------------------------------------------------------
# smoothce:: custom ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("smoothce::linear_soft_cross_entropy", mutates_args=())
def linear_soft_cross_entropy_op(
    hidden: Tensor,  # (N, D)
    weight: Tensor,  # (V, D)
    bias: Optional[Tensor],  # (V,)
    target: Optional[Tensor],  # (N, V) float: probabilities, log-probabilities or logits; None: the teacher's head, or none
    teacher_hidden: Optional[Tensor],  # (N, Dt)
    teacher_weight: Optional[Tensor],  # (V, Dt)
    teacher_bias: Optional[Tensor],  # (V,)
    labels: Optional[Tensor],  # (N,) int
    labels_b: Optional[Tensor],  # (N,) int: mixup's second labels
    lam: Optional[Tensor],  # broadcastable to (N,)
    class_weight: Optional[Tensor],  # (V,)
    target_rows: Optional[Tensor],  # (N,) bool
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
    compute_grad: bool,
    chunk_size: int,  # rows per chunk; 0: the chunk rule
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) with gradients for grad_output = 1, empty when
    compute_grad is False or reduction is 'none' (its backward recomputes), grad_bias empty without
    bias."""
    call = _Call(hidden, weight, target is not None or teacher_hidden is not None, labels, labels_b, lam,
                 class_weight, target_rows,
                 (ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale),
                 (target_kind, target_logit_scale, soft_logit_scale, soft_label_smoothing, soft_scale, soft_kl,
                  reverse_kl))
    teacher = _teacher(teacher_hidden, teacher_weight, teacher_bias)
    grads = compute_grad and reduction != "none"
    loss_rows, gh, gw, gb = call.chunks(hidden, weight, bias, target, teacher, labels, labels_b, class_weight,
                                        call.coefficients.coefficients(), grads,
                                        _chunk_size(hidden, weight, teacher, chunk_size))
    loss = call.coefficients.reduce(loss_rows).to(loss_dtype or hidden.dtype)
    if not grads:
        return loss, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    return loss, gh, gw, weight.new_empty(0) if gb is None else gb


@linear_soft_cross_entropy_op.register_fake
def _(hidden, weight, bias, target, teacher_hidden, teacher_weight, teacher_bias, labels, labels_b, lam,
      class_weight, target_rows, ignore_index, reduction, *rest):
    loss_dtype, compute_grad = rest[-3], rest[-2]
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=loss_dtype or hidden.dtype)
    if not compute_grad or reduction == "none":
        return loss, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    gb = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), gb


@torch.library.custom_op("smoothce::linear_soft_cross_entropy_backward", mutates_args=())
def linear_soft_cross_entropy_backward_op(
    grad_loss: Tensor,  # (N,) per-row grad_output of reduction 'none'
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Optional[Tensor],
    teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor],
    labels: Optional[Tensor],
    labels_b: Optional[Tensor],
    lam: Optional[Tensor],
    class_weight: Optional[Tensor],
    target_rows: Optional[Tensor],
    ignore_index: Optional[int],
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
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) of sum_i grad_loss_i loss_i, the chunks run again."""
    call = _Call(hidden, weight, target is not None or teacher_hidden is not None, labels, labels_b, lam,
                 class_weight, target_rows,
                 (ignore_index, "none", label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale),
                 (target_kind, target_logit_scale, soft_logit_scale, soft_label_smoothing, soft_scale, soft_kl,
                  reverse_kl))
    teacher = _teacher(teacher_hidden, teacher_weight, teacher_bias)
    coef = call.coefficients.coefficients() * grad_loss.to(call.acc).reshape(-1, 1)
    _, gh, gw, gb = call.chunks(hidden, weight, bias, target, teacher, labels, labels_b, class_weight, coef, True,
                                _chunk_size(hidden, weight, teacher, chunk_size))
    return gh, gw, weight.new_empty(0) if gb is None else gb


@linear_soft_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, *rest):
    gb = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
_OP_ARGS = 31  # inputs of smoothce::linear_soft_cross_entropy
_TENSORS = 12  # hidden ... target_rows
_FORMS = slice(12, 28)  # LossForm's and SoftTargetForm's fields


def _setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.reduction = inputs[13]
    ctx.compute_grad = inputs[-2]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no (V, D) and (N, D) zeros for the gradient outputs
    if ctx.reduction == "none":
        ctx.save_for_backward(*inputs[:_TENSORS])
        forms = inputs[_FORMS]
        ctx.forms = forms[:1] + forms[2:]  # the backward op takes no reduction
        ctx.chunk_size = inputs[-1]
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * _OP_ARGS
    if ctx.reduction == "none":
        grads = torch.ops.smoothce.linear_soft_cross_entropy_backward(grad_loss, *ctx.saved_tensors, *ctx.forms,
                                                                     ctx.chunk_size)
    elif not ctx.compute_grad:
        raise RuntimeError("smoothce::linear_soft_cross_entropy was called with compute_grad=False; "
                           "call it with compute_grad=True to differentiate it")
    else:
        grads = tuple(scale_stored(t, grad_loss) for t in ctx.saved_tensors)
    grad_h, grad_w, grad_b = grads
    return (grad_h, grad_w, grad_b if ctx.has_bias else None) + (None,) * (_OP_ARGS - 3)


linear_soft_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# public functional
# ------------------------------------------------------------------------------------------------
def _check_head(name: str, h: Tensor, w: Tensor, b: Optional[Tensor], v: Optional[int] = None) -> None:
    """h (..., D), w (V, D) of h's dtype, b (V,) of h's dtype or None."""
    check_tensors(**{f"{name}hidden": h, f"{name}weight": w})
    check_dtype(f"{name}hidden", h, FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
    if h.dim() < 1 or w.dim() != 2 or h.shape[-1] != w.shape[1] or (v is not None and w.shape[0] != v):
        raise ValueError(f"smoothce: {name}hidden (..., D) and {name}weight ({'V' if v is None else v}, D) do not "
                         f"fit: {name}hidden {tuple(h.shape)}, {name}weight {tuple(w.shape)}")
    for t, what in ((w, "weight"), (b, "bias")):
        if t is not None and t.dtype != h.dtype:
            raise TypeError(f"smoothce: {name}{what} dtype {t.dtype} must equal {name}hidden dtype {h.dtype}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"smoothce: {name}bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")


def fused_linear_soft_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    class_weight: Optional[Tensor] = None,
    *,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
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
    chunk_size: Optional[int] = None,
):
    """``fused_soft_cross_entropy(hidden @ weight.T + bias, target, labels, class_weight, ...)``
    (same keywords, same results) without materialising the student's logits.

    hidden (..., D), weight (V, D), bias (V,) or None. The target: a tensor (..., V) as
    ``target_kind`` says, or the teacher's head, ``teacher_hidden @ teacher_weight.T +
    teacher_bias`` (teacher_hidden (..., Dt), teacher_weight (V, Dt); target_kind 'logits', at
    ``target_logit_scale``), whose logits are computed chunk by chunk too and never whole; or
    neither, for the label part alone (mixup's two labels on a classifier's head). labels
    (...) carry the label part (``scale``, 0 unless given) and mask the target part's rows, as the
    soft op's do; labels_b and lam: mixup. ``reduction='none'`` returns a loss of the rows' shape.
    Gradients flow to hidden, weight and bias; the target (or the teacher's head) takes none, so it
    must not require grad. ``chunk_size`` overrides the rows per chunk.
    """
    form = LossForm(ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale)
    soft = SoftTargetForm(target_kind, target_logit_scale, soft_logit_scale, soft_label_smoothing, soft_scale,
                          soft_kl, reverse_kl)
    _check_head("", hidden, weight, bias)
    v, d = weight.shape
    rows = tuple(hidden.shape[:-1])
    teacher = (teacher_hidden, teacher_weight, teacher_bias)
    if target is not None and (teacher_hidden is not None or teacher_weight is not None):
        raise ValueError("smoothce: give the target either as a tensor (target) or as the teacher's head "
                         "(teacher_hidden and teacher_weight), not both")
    if target is None and (teacher_hidden is not None or teacher_weight is not None):
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("smoothce: the teacher's head needs both teacher_hidden and teacher_weight")
        _check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias, v)
        if tuple(teacher_hidden.shape[:-1]) != rows:
            raise ValueError(f"smoothce: teacher_hidden's rows {tuple(teacher_hidden.shape[:-1])} must equal "
                             f"hidden's {rows}")
        if soft.target_kind != "logits":
            raise ValueError(f"smoothce: the teacher's head gives logits: target_kind must be 'logits', "
                             f"got {soft.target_kind!r}")
    elif teacher_bias is not None:
        raise ValueError("smoothce: teacher_bias needs teacher_hidden and teacher_weight")
    if target is not None:
        check_tensors(target=target)
        if not target.dtype.is_floating_point or tuple(target.shape) != rows + (v,):
            raise ValueError(f"smoothce: target must be a floating-point tensor of shape {rows + (v,)}, got "
                             f"{target.dtype} {tuple(target.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (target, *teacher)):
        raise ValueError("smoothce: fused_linear_soft_cross_entropy gives the target (or the teacher's head) no "
                         "gradient: pass it detached, or use fused_soft_cross_entropy on the logits")
    if isinstance(lam, (int, float)) and not isinstance(lam, bool):
        lam = torch.full((), float(lam), dtype=torch.float64, device=hidden.device)  # one lam for every row
    check_mixup_labels(labels, labels_b, lam, rows)
    if target_rows is not None:
        check_target_rows(target_rows, rows)
    if class_weight is not None:
        check_per_class("class_weight", class_weight, v)
        if soft.soft_kl or soft.reverse_kl:
            raise ValueError("smoothce: class weights with a KL divergence to the target are not supported "
                             "(kl_div takes none)")
    check_same_device("hidden", hidden=hidden, weight=weight, bias=bias, target=target, teacher_hidden=teacher_hidden,
                      teacher_weight=teacher_weight, teacher_bias=teacher_bias, labels=labels, labels_b=labels_b,
                      class_weight=class_weight, target_rows=target_rows)
    check_loss_dtype(loss_dtype)
    if chunk_size is None:
        chunk_size = 0
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"smoothce: chunk_size={chunk_size!r} must be a positive int or None")
    if lam is not None and lam.device != hidden.device and lam.dim() > 0:
        raise ValueError(f"smoothce: lam is on {lam.device} but hidden is on {hidden.device}")

    n = math.prod(rows)
    flat = lambda t, *tail: None if t is None else t.reshape(n, *tail)  # noqa: E731 - not -1: n may be 0
    lam = None if lam is None else torch.broadcast_to(lam.to(hidden.device), rows).reshape(n)
    compute_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, *_ = torch.ops.smoothce.linear_soft_cross_entropy(
        flat(hidden, d), weight, bias, flat(target, v),
        None if teacher_hidden is None else flat(teacher_hidden, teacher_hidden.shape[-1]), teacher_weight,
        teacher_bias, flat(labels), flat(labels_b), lam, class_weight, flat(target_rows), *form.as_args(),
        *soft.as_args(), loss_dtype, compute_grad, chunk_size)
    return loss.view(rows) if reduction == "none" else loss
