"""Find cross-entropy losses in a Dynamo torch-IR graph and replace them with smoothce op calls.

``rewrite_cross_entropy(gm)`` is the entry point, ``analyze_cross_entropy(gm)`` its read-only
twin. The stages, one module each:

  interpret    every node's value as algebra (``algebra``): log-probs, per-row and reduced losses
               (a package: one file per op family)
  analysis     the sinks whose values are losses, their cones, near misses (``normal_form``
               decides whether a value is an instance of the op's form)
  head         the linear layer that produces the logits, fused into the loss when nothing else
               reads them
  emit         the op calls that replace a loss
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional

import torch
import torch.fx

from smoothce.kernels.form import LossForm, shortest
from smoothce.patterns.algebra import Reject
from smoothce.patterns.analysis import Plan, analyze
from smoothce.patterns.emit import emit
from smoothce.patterns.head import Head, find_head, find_teacher_head
from smoothce.patterns.nodes import dtype, fake, location, user_name
from smoothce.patterns.ops import op_name
from smoothce.patterns.report import Match, NearMiss, RewriteResult

Node = torch.fx.Node

__all__ = ["rewrite_cross_entropy", "analyze_cross_entropy", "Plan"]


def analyze_cross_entropy(gm: torch.fx.GraphModule) -> tuple[list[Plan], list[NearMiss]]:
    """Plans for the losses that can be rewritten, near misses for the rest. Changes nothing."""
    plans, misses, _ = analyze(gm)
    return plans, misses


def rewrite_cross_entropy(gm: torch.fx.GraphModule, *, fuse_linear: bool = True) -> RewriteResult:
    """Rewrite every provable cross-entropy loss in ``gm`` into fused op calls (in place).

    With ``fuse_linear``, a loss whose logits come only from a linear layer (F.linear or
    hidden @ W.t(), through upcasts, slicing, views, constant factors and a softcap) becomes
    ``fused_linear_cross_entropy`` calls that never materialise the logits (a loss against a
    distribution: ``fused_linear_soft_cross_entropy``, with a teacher's head in the same graph and
    without grad fused too); a head whose logits are also read elsewhere keeps the plain op and gets
    a near miss saying where.
    """
    plans, near_misses, _ = analyze(gm)
    result = RewriteResult(near_misses=list(near_misses))
    if not plans:
        return result
    fake_mode = _fake_mode(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    names = [(_seed(plan, order).name, location(plan.sink)) for plan in plans]  # before any node goes
    for plan, (seed, where) in zip(plans, names):
        head, why_not = find_head(plan, plan.dead) if fuse_linear else (None, None)
        soft = next((c.soft for c in plan.calls if c.soft is not None), None)
        # read before the rewrite erases the teacher's head (emit finds it the same way)
        teacher = None if head is None or soft is None else find_teacher_head(soft.dense, plan.classes, plan.dead)
        try:
            emit(gm, plan, head, fake_mode)
        except Reject as err:
            result.near_misses.append(NearMiss(seed, where, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - never worse than the graph as written
            # An op that cannot take these inputs (found while its call runs on the fake values)
            # or a fault of the rewrite: this loss stays as the user wrote it, the rest goes on.
            result.near_misses.append(NearMiss(seed, where, f"the rewrite raised {type(err).__name__} "
                                                            f"({_first_line(err)}): the loss is left as written"))
            continue
        match = _match(plan, head, teacher, _erase_dead(gm, plan))
        result.matches.append(match)
        if why_not:
            result.near_misses.append(NearMiss(seed, where, why_not))
    gm.graph.lint()
    gm.recompile()
    return result


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _seed(plan: Plan, order: dict) -> Node:
    return min(plan.seeds, key=order.__getitem__) if plan.seeds else plan.sink


def _fake_mode(gm):
    for n in gm.graph.nodes:
        t = fake(n)
        if t is not None and hasattr(t, "fake_mode"):
            return t.fake_mode
    return None


def _erase_dead(gm: torch.fx.GraphModule, plan: Plan) -> tuple[str, ...]:
    """Erase the plan's dead nodes that nothing reads any more, latest first."""
    erased = []
    for n in reversed(list(gm.graph.nodes)):
        if n in plan.dead and not n.users and n.op in ("call_function", "call_method"):
            erased.append(n.name)
            gm.graph.erase_node(n)
    return tuple(reversed(erased))


# ------------------------------------------------------------------------------------------------
# The record
# ------------------------------------------------------------------------------------------------

def _family(plan: Plan, form: LossForm) -> str:
    if form.scale < 0:  # the user's value is minus a cross-entropy: a log-likelihood
        return "log-prob of the label" if not form.label_smoothing else "negated cross-entropy"
    kinds = {op_name(s) for s in plan.seeds}
    if "kl_div" in kinds:
        return "kl_div"
    if "cross_entropy" in kinds:
        return "cross_entropy"
    if "nll_loss" in kinds:
        return "log_softmax+nll"
    if plan.builds_target:
        return "smoothed-target"
    if not form.label_smoothing:
        return "hand-written nll"
    return "hand-written " + {"all": "eps/V", "others": "eps/(V-1)"}[form.smoothing]


def _soft_family(plan: Plan, soft) -> str:
    """A loss against a target given as data: what the target is (a teacher's softmax, or data),
    the divergence, and whether a label term goes with it."""
    labels = " + labels" if any(c.a for c in plan.calls) else ""
    divergence = "KL" if soft.form.soft_kl else "cross-entropy"
    if soft.form.reverse_kl:  # torchtune's names: its symmetric KL mixes the forward term and the reverse KL
        divergence = "symmetric KL" if soft.form.soft_scale else "reverse KL"
    return ("distillation " if soft.dense.kind == "logits" else "soft-target ") + divergence + labels


def _soft_words(soft) -> dict:
    """The target term's parameters as the user wrote them: temperatures rather than scales."""
    words = {"tensor": user_name(soft.dense.logits.source), **soft.form.describe(), "reduction": soft.reduction}
    for scale, temperature in (("target_logit_scale", "temperature"), ("soft_logit_scale", "student_temperature")):
        if scale in words:
            words[temperature] = 1 / words.pop(scale)
    return words


def _mix_words(call) -> dict:
    """Mixup as the user wrote it: lam * loss(labels) + (1 - lam) * loss(labels_b), lam a tensor's
    name or a number."""
    lam = call.mix.lam
    return {"labels": _label_name(call.label), "labels_b": _label_name(call.mix.label),
            "lam": user_name(lam) if isinstance(lam, Node) else shortest(lam)}


def _label_name(label) -> str:
    return user_name(label.node if label.node is not None else label.base)


def _combined_form(plan: Plan) -> LossForm:
    """The user's parameters: one form for all calls (they differ in what divides them), when
    their summed coefficients are one; else the form of the call with the label term."""
    calls = plan.calls
    first = next((c for c in calls if c.a), calls[0]).words
    if len(calls) == 1:
        return first
    a, b = sum((c.a for c in calls), Fraction(0)), sum((c.b for c in calls), Fraction(0))
    c, z = sum((c.c for c in calls), Fraction(0)), sum((c.z for c in calls), Fraction(0))
    try:
        return LossForm.from_coefficients(a, b, float(c), plan.classes, ignore_index=first.ignore_index,
                                          reduction=first.reduction, z_loss=float(z), softcap=first.softcap,
                                          logit_scale=first.logit_scale)
    except ValueError:  # LossForm's "no form has these coefficients"
        return first


def _match(plan: Plan, head: Optional[Head], teacher: Optional[Head], erased: tuple) -> Match:
    form = _combined_form(plan)
    calls = plan.calls
    weights = [user_name(c.weight) if c.weight is not None else None for c in calls]
    # calls with different class weights: their summed coefficients describe no loss
    call_forms = tuple(zip((c.words for c in calls), weights)) if len(set(weights)) > 1 else ()
    coefficients = {name: float(sum((getattr(c, name) for c in calls), Fraction(0))) for name in "abcz"}
    params = {
        "eps": form.label_smoothing,
        "convention": {"all": "eps/V", "others": "eps/(V-1)"}[form.smoothing] if form.label_smoothing else None,
        "target_coef": coefficients["a"], "uniform_coef": coefficients["b"], "constant": coefficients["c"],
        "z_loss": form.z_loss, "softcap": form.softcap,
        **({"logit_scale": form.logit_scale} if form.logit_scale != 1.0 or head is not None else {}),
        "ignore_index": form.ignore_index, "reduction": form.reduction,
        "weight": weights[0] if not call_forms else weights,
        "classes": plan.classes, "dtype": str(dtype(plan.logits.source)).removeprefix("torch."),
    }
    if plan.loss_dtype is not None and plan.loss_dtype != dtype(plan.logits.source):
        params["loss_dtype"] = str(plan.loss_dtype).removeprefix("torch.")
    if len(calls) > 1:
        params["calls"] = len(calls)  # terms divided by different counts: one op call each
    if any(c.uniform_rows is not None for c in calls):
        params["uniform_rows"] = "masked apart from the label term"
    if any(c.columns for c in calls):
        params["padding_columns"] = [p for c in calls for p, _ in c.columns]
    if head is not None:
        params["head"] = location(head.node)
    family = _family(plan, form)
    soft = next((c.soft for c in calls if c.soft is not None), None)
    if soft is not None:
        family, params["target"] = _soft_family(plan, soft), _soft_words(soft)
        if teacher is not None:
            params["teacher_head"] = location(teacher.node)
    mix = next((c for c in calls if c.mix is not None), None)
    if mix is not None:
        family, params["mixup"] = "mixup " + family, _mix_words(mix)
    family = ("linear+" if head is not None else "") + family
    return Match(family, location(plan.sink), params, erased, form, coefficients, call_forms)
