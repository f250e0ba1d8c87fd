"""The meaning of comparisons, boolean masks and selections: ne, eq, lt, le, gt, ge, invert
(``~``, logical_not), and (``&``, logical_and), where, masked_fill, clamp and clamp_min.

A label compared with a constant is a row condition (``y != -100``); ``arange(V) == y[:, None]``
is a one-hot; ``torch.where`` and ``masked_fill`` with a row mask keep a loss's rows or make its
labels safe to read (``where(keep, y, 0)``, ``y.clamp(min=0)``); with a one-hot condition they
build a target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch.fx

from smoothce.patterns.algebra import (
    ArangeV, CondAtom, CondV, ElemV, LabelV, Q, Reject, RowV, add, carries_logits, constant, elem_mul, kind,
    with_conds,
)
from smoothce.patterns.interpret.arguments import as_constant, keepdim_shape, padded
from smoothce.patterns.nodes import describe, shape

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation

Node = torch.fx.Node


def _compare(interp: Interpretation, node, a, b, how):
    """Label comparisons with constants, and arange == labels (a one-hot)."""
    va, vb = interp.val(a), interp.val(b) if isinstance(b, Node) else None
    if isinstance(va, ArangeV) or isinstance(vb, ArangeV):
        # arange == arange: the classes along the last dim first, where log-probs have them
        pairs = sorted(((r, other) for r, other in ((va, b), (vb, a)) if isinstance(r, ArangeV)),
                       key=lambda p: p[0].axis != -1)
        out = shape(node)
        for r, other in pairs:
            lab, cd = interp.label(other), r.axis
            if how in ("eq", "ne") and lab is not None and not lab.wrap and out is not None \
                    and len(out) >= 2 and isinstance(r.n, int) and out[cd] == r.n \
                    and padded(shape(other), len(out)) == keepdim_shape(out, cd):
                # [j == y_i] with j along the arange's dim and one label per row; a label outside
                # [0, V) matches no class
                inrange = CondAtom(("inrange", lab.base if lab.plain else lab.node, r.n))
                oh = ElemV(None, cd, (((("OH", lab), "K", frozenset({inrange})), Q(1)),))
                return oh if how == "eq" else add(constant(Q(1), cd), oh, Q(-1))
        return None
    lab = interp.label(a)
    k = b if isinstance(b, int) and not isinstance(b, bool) else None
    if lab is None or k is None:
        return None
    base = lab.base if lab.plain else lab.node
    atom = {"ne": (("ne", base, k), True), "eq": (("ne", base, k), False),
            "lt": (("lt", base, k), True), "ge": (("lt", base, k), False),
            "le": (("lt", base, k + 1), True), "gt": (("lt", base, k + 1), False)}[how]
    return CondV(frozenset({CondAtom(atom[0], atom[1], node)}))


def op_ne(interp: Interpretation, node, a, kw):
    return _compare(interp, node, a, kw["other"], "ne")


def op_eq(interp: Interpretation, node, a, kw):
    return _compare(interp, node, a, kw["other"], "eq")


def op_lt(interp: Interpretation, node, a, kw):
    return _compare(interp, node, a, kw["other"], "lt")


def op_le(interp: Interpretation, node, a, kw):
    return _compare(interp, node, a, kw["other"], "le")


def op_gt(interp: Interpretation, node, a, kw):
    return _compare(interp, node, a, kw["other"], "gt")


def op_ge(interp: Interpretation, node, a, kw):
    return _compare(interp, node, a, kw["other"], "ge")


def op_invert(interp: Interpretation, node, a, kw):
    v = interp.val(a)
    if isinstance(v, ElemV) and v.key is None:  # ~one_hot: 1 - one_hot
        return add(constant(Q(1), v.cd), v, Q(-1))
    c = interp.cond(a)
    return c.invert() if c is not None else None


def op_and(interp: Interpretation, node, a, kw):
    b = kw["other"]
    va, vb = interp.val(a), interp.val(b)
    if isinstance(va, ElemV) and isinstance(vb, ElemV) and va.key is None and vb.key is None:
        return elem_mul(va, vb)
    ca, cb = interp.cond(a), interp.cond(b)
    if ca is not None and cb is not None and shape(a) == shape(b):
        return CondV(ca.atoms | cb.atoms)
    return None


def op_where(interp: Interpretation, node, c, kw):
    return _select(interp, node, c, kw.get("input"), kw.get("other"))


def _infinite_logits(c) -> bool:
    """Whether a mask is torch.isinf of tensors, or of several joined by | (torchtune's KL losses
    zero their products there)."""
    if not isinstance(c, Node) or c.op not in ("call_function", "call_method"):
        return False
    name = c.target if c.op == "call_method" else getattr(c.target, "__name__", "")
    if name == "isinf":
        return True
    if name in ("or_", "__or__", "logical_or", "bitwise_or"):
        return all(_infinite_logits(a) for a in c.args[:2])
    return False


def op_masked_fill(interp: Interpretation, node, a, kw):
    return _select(interp, node, kw["mask"], kw["value"], a)


def _select(interp: Interpretation, node, c, a, b):
    """torch.where(c, a, b): a where c holds, b elsewhere."""
    va, vb = interp.val(a), interp.val(b)
    vc = interp.val(c) if isinstance(c, Node) else None
    if isinstance(vc, ElemV) and vc.key is None:
        # an elementwise 0/1 target (arange == y): b + (a - b) c
        ea, eb = _as_elem(va, vc.cd), _as_elem(vb, vc.cd)
        if ea is None or eb is None:
            return None
        return add(eb, elem_mul(add(ea, eb, Q(-1)), vc))
    if (carries_logits(va) or carries_logits(vb)) and _infinite_logits(c):
        raise Reject(f"the products are zeroed where a logit is infinite ({describe(node)}): the op keeps infinite "
                     "logits in its sums, so the loss is left as written; with finite logits this masked_fill "
                     "changes nothing, and without it the loss is rewritten")
    cond = interp.cond(c)
    if cond is None:
        if carries_logits(va) or carries_logits(vb):
            raise Reject(f"torch.where on a condition that is not a boolean row mask ({describe(node)})")
        return None
    # labels changed where the mask fails: where(keep, y, k)
    for kept, fill, keep in ((a, b, cond), (b, a, None)):
        lab = interp.label(kept) if isinstance(kept, Node) else None
        k = fill if isinstance(fill, int) and not isinstance(fill, bool) else None
        if k is None and isinstance(fill, Node) and as_constant(interp.val(fill)) is not None:
            k = int(as_constant(interp.val(fill))) if as_constant(interp.val(fill)).denominator == 1 else None
        if lab is not None and k is not None and shape(node) == shape(kept) and not carries_logits(interp.val(kept)):
            keep = keep if keep is not None else cond.invert()
            if lab.wrap or (lab.altered and lab.altered != keep.atoms):
                return LabelV(node, node=node)
            return LabelV(lab.base, lab.altered | keep.atoms, node=node)
    if not (carries_logits(va) or carries_logits(vb) or isinstance(va, ElemV) or isinstance(vb, ElemV)):
        return None
    loss = va if carries_logits(va) or isinstance(va, ElemV) else vb
    loss_node = a if loss is va else b
    if not isinstance(loss, (RowV, ElemV)):
        raise Reject(f"torch.where picks between {kind(va)} and {kind(vb)} ({describe(node)})")
    # where(c, loss, 0): c selects rows when it has one value per row (size 1 along the classes)
    rows = shape(loss_node) if isinstance(loss, RowV) else \
        keepdim_shape(shape(loss_node), loss.cd if isinstance(loss, ElemV) and loss.cd is not None else -1)
    if shape(c) != rows or shape(node) != shape(loss_node):
        raise Reject(f"a mask of shape {shape(c)} that is not one value per row ({describe(node)})")
    ta, tb = _as_like(va, loss), _as_like(vb, loss)
    if ta is None or tb is None:
        other = vb if ta is not None else va
        raise Reject(f"masked rows are filled with {kind(other) if other is not None else 'a tensor'}, "
                     f"not a constant ({describe(node)})")
    return add(with_conds(ta, cond.atoms), with_conds(tb, cond.invert().atoms))


def _as_elem(v, cd) -> Optional[ElemV]:
    if isinstance(v, ElemV):
        return v
    c = as_constant(v)
    return constant(c, cd) if c is not None else None


def _as_like(v, like):
    """v as a value of like's kind (a constant becomes a constant row or per-class value)."""
    if type(v) is type(like):
        return v
    c = as_constant(v)
    if c is None:
        return None
    if isinstance(like, RowV):
        return RowV.make(like.key, {("K",): c})
    return constant(c, like.cd)


def op_clamp(interp: Interpretation, node, a, kw):
    lo, hi = kw.get("min"), kw.get("max")
    lab = interp.label(a)
    if lab is not None and not carries_logits(interp.val(a)):
        if lo == 0 and hi is None and lab.plain:
            # y.clamp(min=0): y where y >= 0, 0 elsewhere
            return LabelV(lab.base, frozenset({CondAtom(("lt", lab.base, 0), False)}), node=node)
        return None
    v = interp.val(a)
    if carries_logits(v):
        raise Reject(f"{kind(v)} clamped ({describe(node)})")
    return None


def op_clamp_min(interp: Interpretation, node, a, kw):
    return op_clamp(interp, node, a, {"min": kw.get("min"), "max": None})
