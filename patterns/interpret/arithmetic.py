"""The meaning of elementwise arithmetic: neg, add, sub, mul, div, pow, square and matmul.

Sums and constant multiples of log-probs, per-row and reduced losses stay in the algebra; a
product with a target built from the labels, a boolean row mask, a class-weight vector or
``w[y]`` is a term of the form; a division of a reduced loss by a count is a mean
(``loss.sum() / keep.sum()``). ``x - logsumexp(x, keepdim=True)`` is log-probs. A product with
anything else is a near miss that names it.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import TYPE_CHECKING, Optional

import torch.fx

from smoothce.patterns.algebra import (
    U, ColV, CondAtom, CondV, Divisor, DivisorV, ElemV, LabelV, NotCrossEntropy, Q, Reject, RowV, ScalarV, SoftmaxV, WeightAtV, add,
    carries_logits, constant, divide, elem_class_sum, elem_mul, elem_times_weight, kind, log_probs, row_times_row,
    row_times_weight_at, scale, seeds_of, student_probs, target_log_probs, with_conds, with_lam, lam_atom,
)
from smoothce.patterns.interpret.arguments import as_constant, is_scalar_like, keepdim_shape
from smoothce.patterns.nodes import describe, exact, fake, is_float, location, shape, static_shape, words
from smoothce.patterns.ops import bind, op_name

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation

Node = torch.fx.Node


def op_neg(interp: Interpretation, node, a, kw):
    v = interp.val(a)
    if isinstance(v, Fraction):
        return -v
    if isinstance(v, (RowV, ScalarV, ColV, ElemV)):
        return scale(v, Q(-1))
    if carries_logits(v):
        raise Reject(f"negated {kind(v)} ({describe(node)})")
    return None


def op_add(interp: Interpretation, node, a, kw):
    return _add(interp, node, a, kw["other"], Q(1), kw.get("alpha", 1))


def op_sub(interp: Interpretation, node, a, kw):
    return _add(interp, node, a, kw["other"], Q(-1), kw.get("alpha", 1))


def _add(interp: Interpretation, node, a, b, sign, alpha):
    alpha = exact(alpha)
    if alpha is None:
        return None
    s = sign * alpha
    va, vb = interp.val(a), interp.val(b)
    if va is None and vb is None:
        return None
    if isinstance(va, Fraction) and isinstance(vb, Fraction):
        return va + s * vb
    # x - logsumexp(x, keepdim=True): log-probabilities spelled by hand
    if isinstance(vb, RowV) and vb.lse_only() == 1 and s == -1:
        lg = interp.logits(a)
        if lg is not None and dataclasses.replace(vb.key, cd=None) == lg.key \
                and shape(b) == keepdim_shape(shape(a), vb.key.cd):
            return log_probs(vb.key, seeds_of(lg) | vb.seeds | {node})
    ca, cb = as_constant(va), as_constant(vb)
    if ca is not None or cb is not None:
        const, v, s_v = (ca, vb, s) if ca is not None else (s * cb, va, Q(1))
        if isinstance(v, (RowV, ElemV)) and (v.key is not None or isinstance(v, ElemV)):
            v = scale(v, s_v)
            if isinstance(v, RowV):
                return add(v, RowV.make(v.key, {("K",): const}))
            return add(v, constant(const, v.cd))
        if isinstance(v, DivisorV):
            return _count_complement(node, v, const, s_v)
        if carries_logits(v):
            raise Reject(f"a constant is added to {kind(v)} ({describe(node)})")
        return None
    if isinstance(va, ElemV) and isinstance(vb, ElemV):
        if va.key is not None and vb.key is not None:
            _same_shape(node, a, b)
            va, vb = _teacher_apart(va, vb)
        return add(va, vb, s)
    if isinstance(va, RowV) and isinstance(vb, RowV):
        _same_shape(node, a, b)
        return add(va, vb, s)
    if isinstance(va, (ScalarV, ColV)) and type(va) is type(vb):
        if isinstance(va, ColV):
            _same_shape(node, a, b)
        return add(va, vb, s)
    for e, r, er_sign in ((va, vb, s), (vb, va, None)):
        if isinstance(e, ElemV) and isinstance(r, RowV):
            # a per-row value broadcast over the classes (lse or a constant only)
            cd = r.key.cd
            row_node, elem_node = (b, a) if e is va else (a, b)
            if e.key is not None and e.key != r.key or shape(row_node) != keepdim_shape(shape(elem_node), cd) \
                    or any(atom not in (("LSE",), ("K",)) for (atom, _), _ in r.terms):
                raise Reject(f"a per-row value is broadcast over the classes ({describe(node)})")
            terms = {(U, "LSE" if atom == ("LSE",) else "K", conds): c for (atom, conds), c in r.terms}
            rv = ElemV(r.key, cd, tuple(terms.items()), r.seeds)
            return add(e, rv, s) if er_sign is not None else add(scale(e, s), rv)
    if carries_logits(va) or carries_logits(vb):
        raise Reject(f"{kind(va) if va is not None else words(a)} and {kind(vb) if vb is not None else words(b)} "
                     f"are added ({describe(node)})")
    return None


def _teacher_apart(va: ElemV, vb: ElemV) -> tuple:
    """log q - log p of two networks' log-probs (a KL divergence written by hand): the log-probs
    of the logits that do not require grad (a teacher's) become the target's, the others stay the
    loss's. Which is which matters only to being found: the op differentiates its target too."""
    if va.key.source is vb.key.source or not (va.is_logprob() and vb.is_logprob()):
        return va, vb
    grads = [fake(v.key.source) is not None and fake(v.key.source).requires_grad for v in (va, vb)]
    if grads == [True, False]:
        return va, target_log_probs(vb)
    if grads == [False, True]:
        return target_log_probs(va), vb
    return va, vb


def _count_complement(node, v: DivisorV, const, sign):
    """numel - mask.sum(): the count of the rows the mask does not hold on (HF's LabelSmoother);
    any other constant offset makes an opaque count."""
    d = v.divisor
    counted = d.node.args[0] if d.node is not None and d.node.args else None
    if d.key[0] == "count" and len(d.key[1]) == 1 and v.factor == 1 and sign == -1 \
            and static_shape(counted) is not None and const == math.prod(static_shape(counted)):
        (atom,) = d.key[1]
        return DivisorV(Divisor(("count", frozenset({atom.negated()})), node))
    return None


def _same_shape(node, a, b):
    if not (shape(a) == shape(b) == shape(node)):
        raise Reject(f"terms of shapes {shape(a)} and {shape(b)} broadcast ({describe(node)})")


def op_mul(interp: Interpretation, node, a, kw):
    b = kw["other"]
    va, vb = interp.val(a), interp.val(b)
    if va is None and vb is None:
        return None
    if isinstance(va, Fraction) and isinstance(vb, Fraction):
        return va * vb
    # order so that the "bigger" value comes first
    if _rank(vb) > _rank(va):
        a, b, va, vb = b, a, vb, va
    c = as_constant(vb)
    if c is not None and (isinstance(vb, Fraction) or isinstance(va, (RowV, ScalarV, ColV))
                          or isinstance(va, ElemV) and shape(node) == shape(a)):
        return _times_constant(interp, node, a, va, c)
    lam = _lam(interp, node, a, b, va)
    if lam is not None:
        return with_lam(va, lam)
    if isinstance(va, ElemV):
        if isinstance(vb, ElemV):
            if va.key is not None and shape(node) != shape(a):
                raise Reject(f"factors of shapes {shape(a)} and {shape(b)} broadcast ({describe(node)})")
            return elem_mul(va, vb)
        m = interp.cond(b)
        if m is not None:
            # a row mask broadcast over the classes: (N, 1) against (N, V)
            if shape(node) != shape(a) or shape(b) != keepdim_shape(shape(a), va.cd if va.cd is not None else -1):
                raise Reject(f"a mask of shape {shape(b)} does not select rows of {shape(a)} ({describe(node)})")
            return with_conds(va, m.atoms)
        w = _class_vector(interp, b, shape(a), va.cd) if vb is None and va.key is not None else None
        if w is not None:
            return elem_times_weight(va, w)
        if isinstance(vb, SoftmaxV) and va.key is not None and shape(a) == shape(b) == shape(node) \
                and _reverse_weights(va, vb):
            return student_probs(vb, va)
        q = interp.dense(b, va, "the log-probs are multiplied by") if shape(a) == shape(b) == shape(node) else None
        if q is not None:
            return elem_mul(va, q)
        if va.key is not None:
            raise Reject(_dense_reason(interp, b, vb, source=va.key.source))
        return None
    if isinstance(va, RowV):
        if isinstance(vb, RowV):
            _same_shape(node, a, b)
            return row_times_row(va, vb)
        if isinstance(vb, WeightAtV):
            _same_shape(node, a, b)
            return row_times_weight_at(va, vb)
        m = interp.cond(b)
        if m is not None:
            _same_shape(node, a, b)
            return with_conds(va, m.atoms)
        raise Reject(_dense_reason(interp, b, vb, per_row=True))
    if isinstance(va, CondV) or isinstance(vb, CondV):
        ca, cb = interp.cond(a), interp.cond(b)
        if ca is not None and cb is not None and shape(a) == shape(b):
            return CondV(ca.atoms | cb.atoms)
        return None
    if isinstance(va, DivisorV) and isinstance(vb, Fraction):
        return DivisorV(va.divisor, va.factor * vb)
    if carries_logits(va):
        raise Reject(f"{kind(va)} is multiplied by {kind(vb) if vb is not None else words(b)} ({describe(node)})")
    return None


def _reverse_weights(lp: ElemV, p: SoftmaxV) -> bool:
    """Whether softmax probabilities times log-probs are a reverse KL's terms: the probabilities
    are the student's (its logits require grad, no softcap) and the log-probs its own (minus a
    teacher's: log p - log q), or those of a teacher (another tensor, without grad, no softcap,
    classes along the same dim). The other
    way round, a teacher's softmax times the student's log-probs, is a target given as data."""
    student = fake(p.logits.source)
    if p.logits.cap is not None or lp.key.cap is not None or p.logits.cd != lp.cd \
            or student is None or not student.requires_grad:
        return False
    if lp.key == p.logits:  # log p, or log p - log q
        return ("X" in {base for (_, base, _), _ in lp.terms}) and all(
            part == U and not conds and (base in ("X", "LSE") or isinstance(base, tuple))
            for (part, base, conds), _ in lp.terms)
    if not lp.is_logprob():
        return False
    teacher = fake(lp.key.source)
    return lp.key.source is not p.logits.source and teacher is not None and not teacher.requires_grad


def _lam(interp: Interpretation, node, a, b, va) -> Optional[CondAtom]:
    """The lam factor (``algebra.lam_atom``) of a loss times ``b``, when b is a float tensor the
    algebra has no value for, not computed from the logits, that does not change the loss's shape:
    one number for a reduced loss or a target built from the labels, one number or one per row for
    a per-row loss (mixup's lam). ``1 - lam`` is lam's factor where it does not hold. None: b is
    no such tensor. Whether lam is mixup's is for ``normal_form`` to say (a loss weighted by lam
    alone stays as written, outside the op)."""
    if not isinstance(va, (ScalarV, RowV)) and not (isinstance(va, ElemV) and va.key is None and va.terms):
        return None
    if not _opaque_float(interp, b, va) or shape(node) != shape(a):
        return None
    if shape(b) != () and not (isinstance(va, RowV) and shape(b) == shape(a)):
        return None
    if op_name(b) == "sub":  # 1 - lam
        first, kw = bind(b, "sub")
        other = kw.get("other")
        if exact(first) == 1 and exact(kw.get("alpha", 1)) == 1 and _opaque_float(interp, other, va) \
                and shape(other) == shape(b):
            return lam_atom(other, holds=False)
    return lam_atom(b)


def _opaque_float(interp: Interpretation, b, va) -> bool:
    """A float tensor with no value in the algebra that is not computed from va's logits."""
    if not isinstance(b, Node) or interp.val(b) is not None or not is_float(b) or shape(b) is None:
        return False
    return va.key is None or not interp.computed_from(b, va.key.source)


def _times_constant(interp: Interpretation, node, a, va, c: Fraction):
    if isinstance(va, (RowV, ElemV, ScalarV, ColV)):
        return scale(va, c)
    if isinstance(va, DivisorV):
        return DivisorV(va.divisor, va.factor * c)
    if isinstance(va, CondV):
        return None
    if va is None and isinstance(a, Node) and is_scalar_like(a):  # a token count times a constant
        return DivisorV(Divisor(("expr", interp.structure.key(a)), a), c)
    if carries_logits(va):
        raise Reject(f"{kind(va)} multiplied by {float(c)!r} ({describe(node)})")
    return None


def _class_vector(interp: Interpretation, b, shp, cd) -> Optional[Node]:
    """The 1-D class-weight tensor behind b when b broadcasts along the class dim only
    (w, or w[:, None] against classes at dim 1)."""
    if not isinstance(b, Node) or not is_float(b) or shp is None or cd is None:
        return None
    sb = shape(b)
    want = tuple(1 if i != len(shp) + cd else shp[i] for i in range(len(shp)))
    if sb is None or len(sb) > len(shp) or sb != want[len(want) - len(sb):]:
        return None
    while len(shape(b)) > 1:  # back through the views that added the size-1 dims
        if op_name(b) not in ("getitem", "unsqueeze", "reshape") or not isinstance(b.args[0], Node) \
                or interp.values.get(b.args[0]) is not None or math.prod(shape(b.args[0])) != shp[cd]:
            return None
        b = b.args[0]
    return b


def _dense_reason(interp: Interpretation, b, vb, per_row=False, source=None):
    name = words(b)
    if source is not None and isinstance(b, Node) and vb is None and interp.computed_from(b, source):
        return (f"the log-probs are multiplied by {name}, which is computed from the same logits (an entropy-like "
                "term, not a cross-entropy against a target)")
    if isinstance(b, Node) and b in interp.changed_by:
        return f"{name} is changed in place by {describe(interp.changed_by[b])}"
    lost = interp.lost_reason(b, "the log-probs are multiplied by")
    if not per_row and lost is not None:
        return lost
    if per_row:
        return (f"the per-row loss is multiplied by {name} ({kind(vb) if vb is not None else 'a tensor'}), "
                "which is not a boolean mask of rows")
    foreign = interp.foreign_reason(b)
    if foreign is not None:
        return foreign
    return f"the log-probs are multiplied by {name}, which is not built from the labels"


def op_div(interp: Interpretation, node, a, kw):
    b = kw["other"]
    if kw.get("rounding_mode") is not None:
        return None
    va, vb = interp.val(a), interp.val(b)
    if isinstance(va, Fraction) and isinstance(vb, Fraction):
        return va / vb if vb != 0 else None
    cb = as_constant(vb)
    if cb is not None and cb != 0 and (isinstance(vb, Fraction) or not isinstance(va, ElemV)
                                       or shape(node) == shape(a)):
        return _times_constant(interp, node, a, va, 1 / cb)
    if isinstance(va, ScalarV):
        if isinstance(vb, DivisorV):
            return divide(va, vb)
        if vb is None and is_scalar_like(b):
            return divide(va, DivisorV(Divisor(("expr", interp.structure.key(b)), b)))
    if carries_logits(va):
        raise Reject(f"{kind(va)} is divided by {kind(vb) if vb is not None else words(b)} "
                     f"({describe(node)})")
    return None


def op_pow(interp: Interpretation, node, a, kw):
    v = interp.val(a)
    if isinstance(v, RowV) and exact(kw["exponent"]) == 2:
        return row_times_row(v, v)
    if carries_logits(v):
        raise NotCrossEntropy(f"{kind(v)} raised to the power {kw['exponent']!r} at {location(node)}: a "
                              "focal or poly term, not a cross-entropy; left as written")
    return None


def op_square(interp: Interpretation, node, a, kw):
    v = interp.val(a)
    if isinstance(v, RowV):
        return row_times_row(v, v)
    return None


def op_matmul(interp: Interpretation, node, a, kw):
    b = kw["other"]
    va, vb = interp.val(a), interp.val(b)
    if isinstance(va, ElemV) and va.key is not None:
        # lp @ v with a constant per-class vector v: sum_j v_j lp_ij
        if isinstance(vb, ElemV) and vb.key is None and shape(b) in ((shape(a)[-1],), (shape(a)[-1], 1)) \
                and va.cd == -1:
            V = shape(a)[-1]
            return elem_class_sum(elem_mul(va, dataclasses.replace(vb, cd=-1)), V)
        raise Reject(f"log-probs in a matrix product ({describe(node)})")
    if carries_logits(va) or carries_logits(vb):
        raise Reject(f"{kind(va if carries_logits(va) else vb)} in a matrix product ({describe(node)})")
    return None


def _rank(v) -> int:
    """How much a value holds, for ordering a product's factors (a reduced loss before a per-row one, ...)."""
    if isinstance(v, (ScalarV, ColV)):
        return 5
    if isinstance(v, RowV):
        return 4
    if isinstance(v, ElemV) and v.key is not None:
        return 3
    if isinstance(v, ElemV):
        return 2
    if isinstance(v, (CondV, DivisorV, WeightAtV, LabelV)):
        return 1
    return 0
