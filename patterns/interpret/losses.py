"""The meaning of the loss functionals: F.cross_entropy, F.nll_loss and F.kl_div (and their
nn.Module forms, which Dynamo traces into the same calls).

Each call becomes the per-row loss it computes (``-sum_j q_ij lp_ij`` with its target q, class
weights and ignored rows) followed by its reduction, with PyTorch's own divisor for 'mean'; the
arguments must be constants (``reduction``, ``ignore_index``, ``label_smoothing``) or the labels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional

import torch.fx

from smoothce.patterns.algebra import (
    U, CondAtom, Dense, Divisor, ElemV, LabelV, Logits, Q, Reject, RowV, ScalarV, SoftmaxV, WeightAtV, add,
    carries_logits, constant, dense_target, elem_class_sum, elem_gather, elem_mul, elem_times_weight, kind,
    log_probs, row_times_weight_at, scale, seeds_of, static_classes, student_probs, target_log_probs, two_labels,
    with_conds,
)
from smoothce.patterns.interpret.arguments import from_end
from smoothce.patterns.interpret.targets import one_hot
from smoothce.patterns.nodes import describe, exact, fake, is_float, shape, words

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation

Node = torch.fx.Node


def op_nll_loss(interp: Interpretation, node, lp, kw):
    v = interp.val(lp)
    if not (isinstance(v, ElemV) and v.key is not None):
        return None
    _legacy(kw, "nll_loss")
    ndim = len(shape(lp))
    if ndim < 1:
        raise Reject("nll_loss of a 0-D input")
    cd = _class_dim(ndim)
    if v.cd is not None and v.cd != cd:
        raise Reject(f"log_softmax over dim {v.cd + ndim}, but nll_loss reads classes along dim {cd + ndim}")
    lab = _target_label(interp, kw["target"], "nll_loss")
    ignore, weight = _ignore(kw, "nll_loss"), _weight(kw)
    row = scale(elem_gather(v, lab), Q(-1))
    if weight is not None:
        row = row_times_weight_at(row, WeightAtV(weight, lab))
    conds = frozenset({_label_ne(lab, ignore)})
    row = dataclasses.replace(with_conds(row, conds), seeds=v.seeds | {node})
    return _reduced(row, kw["reduction"], _mean_divisor(lab, weight, conds))


def op_cross_entropy(interp: Interpretation, node, x, kw):
    lg = interp.logits(x)
    if lg is None:
        v = interp.val(x)
        if carries_logits(v):
            raise Reject(f"cross_entropy of {kind(v)} ({describe(node)})")
        return None
    _legacy(kw, "cross_entropy")
    ndim = len(shape(x))
    if ndim < 1:
        raise Reject("cross_entropy of a 0-D input")
    V = static_classes(shape(x)[_class_dim(ndim) + ndim])
    eps = exact(kw.get("label_smoothing", 0.0))
    if eps is None:
        raise Reject(f"label_smoothing={kw.get('label_smoothing')!r} is not a constant")
    if eps > 1:
        raise Reject(f"label_smoothing={float(eps)!r} is above 1: F.cross_entropy raises for it")
    eps = max(eps, Q(0))  # PyTorch smooths only for label_smoothing > 0
    key = dataclasses.replace(lg.key, cd=_class_dim(ndim))
    lp = log_probs(key, seeds_of(lg) | {node})
    weight, target = _weight(kw), kw["target"]
    if isinstance(target, Node) and is_float(target):
        # class probabilities: loss_i = -sum_j w_j p'_ij L_ij with p' = (1 - eps) p + eps / V
        p = interp.val(target)
        if not (isinstance(p, ElemV) and p.key is None):
            lost = interp.lost_reason(target, "cross_entropy reads")
            if lost is not None:
                raise Reject(lost)
            p = interp.dense(target, lp, "cross_entropy reads")
            if p is None or shape(target) != shape(x):
                raise Reject(interp.foreign_reason(target)
                             or f"the cross_entropy target {words(target)} is not built from the labels")
        q = add(scale(p, 1 - eps), constant(eps / V, key.cd))
        e = elem_mul(q, lp)
        if weight is not None:
            e = elem_times_weight(e, weight)
        row = dataclasses.replace(scale(elem_class_sum(e, V), Q(-1)), seeds=lp.seeds)
        return _reduced(row, kw["reduction"], Divisor(("rows",)))  # PyTorch's mean over rows
    lab = _target_label(interp, target, "cross_entropy")
    ignore = _ignore(kw, "cross_entropy")
    q = add(scale(one_hot(lab, key.cd), 1 - eps), constant(eps / V, key.cd))
    e = elem_mul(q, lp)
    if weight is not None:
        e = elem_times_weight(e, weight)
    conds = frozenset({_label_ne(lab, ignore)})
    row = with_conds(scale(elem_class_sum(e, V), Q(-1)), conds)
    row = dataclasses.replace(row, seeds=lp.seeds)
    return _reduced(row, kw["reduction"], _mean_divisor(lab, weight, conds))


def _class_dim(ndim: int) -> int:
    """The class dim (from the end) of the loss functionals' input: dim 1, or 0 for one unbatched
    row of shape (C,)."""
    return from_end(1 if ndim > 1 else 0, ndim)


def _legacy(kw, name):
    if kw["size_average"] is not None or kw["reduce"] is not None:
        raise Reject(f"{name} uses the legacy size_average/reduce arguments")


def _target_label(interp: Interpretation, target, name) -> LabelV:
    lab = interp.label(target)
    if lab is None:
        raise Reject(f"the {name} target {words(target)} is not a label tensor")
    return lab


def _ignore(kw, name) -> int:
    ign = kw["ignore_index"]
    if isinstance(ign, bool) or not isinstance(ign, int):
        raise Reject(f"{name}(ignore_index={ign!r}) is not a constant")
    return ign


def _weight(kw) -> Optional[Node]:
    w = kw.get("weight")
    if w is not None and not isinstance(w, Node):
        raise Reject(f"weight={w!r} is not a tensor")
    return w


def _label_ne(lab: LabelV, k: int) -> CondAtom:
    """The row condition 'target != k' for a target tensor that may have been changed."""
    if lab.plain:
        return CondAtom(("ne", lab.base, k))
    return CondAtom(("ne", lab.node, k))


def _mean_divisor(lab: LabelV, weight, conds) -> Divisor:
    """PyTorch's mean for class-index targets: divided by the sum of w[y] over kept rows."""
    if weight is None:
        return Divisor(("count", conds))
    return Divisor(("wsum", weight, lab, conds))


def _reduced(row: RowV, reduction, divisor: Divisor):
    if reduction == "none":
        return row
    if reduction == "sum":
        return ScalarV.of(row)
    if reduction == "mean":
        return ScalarV.of(row, divisor)
    raise Reject(f"reduction={reduction!r} is not a constant 'none', 'sum' or 'mean'")


def op_kl_div(interp: Interpretation, node, lp, kw):
    v = interp.val(lp)
    if not (isinstance(v, ElemV) and v.key is not None):
        return None
    if not v.is_logprob():
        raise Reject(f"kl_div reads a value that is not plain log-probs ({describe(node)})")
    _legacy(kw, "kl_div")
    target = kw["target"]
    log_target = kw["log_target"]
    if not isinstance(log_target, bool):
        raise Reject(f"kl_div(log_target={log_target!r}) is not a constant")
    p = interp.val(target) if isinstance(target, Node) else None
    if log_target or not (isinstance(p, ElemV) and p.key is None):
        lost = interp.lost_reason(target, "kl_div reads")
        if lost is not None:
            raise Reject(lost)
        return _kl_div_dense(interp, node, v, target, log_target, kw["reduction"])
    if p.cd is not None and p.cd != v.cd:
        raise Reject(f"kl_div target has classes along dim {p.cd}, log-probs along dim {v.cd} (from the end)")
    if shape(target) != shape(lp):
        raise Reject(f"kl_div target of shape {shape(target)} broadcasts against {shape(lp)}")
    A, B, lab = _target_coefs(p)
    V = static_classes(shape(lp)[v.cd])
    if B < 0 or A + B < 0:
        raise Reject("kl_div target has negative probabilities")

    def xlogx(t):  # t log t with 0 log 0 = 0, as kl_div computes it
        return Q(float(t) * math.log(float(t))) if t > 0 else Q(0)

    seeds = v.seeds | {node}
    reduction = kw["reduction"]
    if reduction == "none":
        # pointwise p log p - p L; p log p is xlogx(A + B) at the label and xlogx(B) elsewhere
        plogp = constant(xlogx(B), v.cd)
        if lab is not None:
            plogp = add(plogp, scale(one_hot(lab, v.cd), xlogx(A + B) - xlogx(B)))
        out = add(plogp, elem_mul(dataclasses.replace(p, cd=v.cd), v), Q(-1))
        return dataclasses.replace(out, seeds=seeds)
    # per row: sum_j p_j log p_j - p_j L_j
    c = xlogx(A + B) + (V - 1) * xlogx(B) if lab is not None else V * xlogx(B)
    row = scale(elem_class_sum(elem_mul(dataclasses.replace(p, cd=v.cd), v), V), Q(-1))
    row = dataclasses.replace(add(row, RowV.make(row.key, {("K",): c})), seeds=seeds)
    return _kl_reduced(row, reduction, shape(lp), V)


def _reverse(target: ElemV, lp: ElemV) -> bool:
    """kl_div(log q, log p, log_target=True) with p the student's (its logits require grad, q's do
    not): the reverse KL, whose weights are the student's probabilities."""
    student, teacher = fake(target.key.source), fake(lp.key.source)
    return student is not None and teacher is not None and student.requires_grad and not teacher.requires_grad


def _kl_reduced(row: RowV, reduction, shp: tuple, V: int):
    """kl_div's reductions of a per-row KL over input of shape ``shp``."""
    if reduction == "sum":
        return ScalarV.of(row)
    if reduction == "mean":  # over all N * V elements
        return ScalarV.of(scale(row, Q(1, V)), Divisor(("rows",)))
    if reduction == "batchmean":  # sum / input.size(0)
        n0 = shp[0]
        if len(shp) == 2:
            return ScalarV.of(row, Divisor(("rows",)))
        if not isinstance(n0, int) or n0 == 0:
            raise Reject(f"kl_div batchmean over a batch of {n0} (not a static positive size)")
        return ScalarV.of(scale(row, Q(1, n0)))
    raise Reject(f"kl_div(reduction={reduction!r}) is not a constant reduction")


def _target_coefs(p: ElemV):
    """p = A [j == y] + B for a target distribution: (A, B, label or None), else Reject."""
    A = B = Q(0)
    labels = set()
    for (tp, base, conds), c in p.terms:
        if base != "K" or tp[0] not in ("U", "OH") or conds:
            raise Reject("the kl_div target is not a smoothed one-hot of the labels")
        if tp == U:
            B += c
        else:
            A += c
            labels.add(tp[1])
    if len(labels) > 1:
        raise Reject(two_labels(labels))
    return A, B, next(iter(labels), None)


def _kl_div_dense(interp: Interpretation, node, lp: ElemV, target, log_target: bool, reduction):
    """kl_div against a target given as data: sum_j q_j log q_j - q_j lp_j per row (DE - DS), q
    the target's probabilities, a teacher's softmax, or with log_target the exp of log-probs (a
    teacher's log_softmax or a tensor)."""
    if not isinstance(target, Node) or shape(target) != shape(node.args[0]):
        raise Reject(f"kl_div target of shape {shape(target) if isinstance(target, Node) else None} is not "
                     "the log-probs' shape")
    v = interp.val(target)
    if log_target and isinstance(v, ElemV) and v.key is not None:
        if not v.is_logprob() or v.key.source is lp.key.source:
            raise Reject("kl_div(log_target=True) reads log-probs of the very logits it is computed from, or "
                         "a value that is not plain log-probs")
        if v.key.cap is not None:
            raise Reject("kl_div(log_target=True) reads log-probs of softcapped teacher logits; the op takes "
                         "a temperature only")
        if v.cd != lp.cd:
            raise Reject("kl_div(log_target=True) reads log-probs over another dim than the input's classes")
        if _reverse(v, lp):  # KL(p_student || p_teacher), the student's log-probs as kl_div's target
            V = static_classes(shape(target)[lp.cd])
            e = student_probs(SoftmaxV(v.key, v.seeds), add(v, target_log_probs(lp), Q(-1)))
            row = dataclasses.replace(elem_class_sum(e, V), seeds=lp.seeds | v.seeds | {node})
            if reduction == "none":
                raise Reject("kl_div(reduction='none') (the op returns a loss per row, not per class)")
            return _kl_reduced(row, reduction, shape(target), V)
        q = dense_target(Dense("logits", v.key), lp.cd)
    elif log_target:
        if v is not None or not is_float(target) or target in interp.changed_by:
            raise Reject(f"kl_div(log_target=True) reads {kind(v) if v is not None else words(target)}")
        q = dense_target(Dense("log_probs", Logits(target, cd=lp.cd)), lp.cd)
    else:
        q = interp.dense(target, lp, "kl_div reads")
        if q is None:
            raise Reject(interp.foreign_reason(target) or f"the kl_div target {words(target)} is not built from the "
                         "labels")
    (((_, dense, _), _, _), _), = q.terms
    V = static_classes(shape(target)[lp.cd])
    row = scale(elem_class_sum(elem_mul(q, lp), V), Q(-1))
    row = add(row, RowV.make(row.key, {("DE", dense): Q(1)}))
    row = dataclasses.replace(row, seeds=lp.seeds | {node})
    if reduction == "none":
        raise Reject("kl_div(reduction='none') against a target given as a tensor (the op returns a loss "
                     "per row, not per class)")
    return _kl_reduced(row, reduction, shape(target), V)
