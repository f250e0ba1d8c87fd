"""The meaning of target building: one_hot, tensors full of one number (full, zeros, ones, their
_like and new_ forms, fill_; a 0-dim one, and torch.tensor(c), is the number c), arange, expand,
scatter, item assignment, index_fill and clone.

A target distribution built from the labels is a per-class value with no logits in it
(``ElemV`` with key None): ``full_like(lp, eps / V).scatter_(1, y[:, None], 1 - eps)`` is
``eps / V + (1 - eps - eps / V) [j == y_i]``, whatever the order of the writes.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
import torch.fx

from smoothce.patterns.algebra import (
    ArangeV, ElemV, Q, Reject, add, carries_logits, constant, elem_mul, kind, scale, with_conds,
)
from smoothce.patterns.interpret.arguments import EXACT_UP_TO, as_constant, from_end, norm_dim
from smoothce.patterns.interpret.indexing import label_index
from smoothce.patterns.nodes import describe, dtype, exact, shape

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation

Node = torch.fx.Node


def one_hot(lab, cd) -> ElemV:
    """[j == y_i] with the classes at dim cd (from the end)."""
    return ElemV(None, cd, (((("OH", lab), "K", frozenset()), Q(1)),))


def op_one_hot(interp: Interpretation, node, y, kw):
    lab = interp.label(y)
    n = kw["num_classes"]
    if lab is None or isinstance(n, bool) or not isinstance(n, int) or n <= 0 or shape(node) is None:
        return None
    return one_hot(lab, -1)


def _filled(value, like: bool):
    """The meaning of a tensor full of one number (torch.full, zeros_like, new_ones, t.fill_, ...):
    a constant, with the class dim of the tensor it is like. ``value``: the number, or the name of
    the argument holding it."""

    def op(interp: Interpretation, node, first, kw):
        c = exact(kw.get(value)) if isinstance(value, str) else Q(value)
        if c is None or shape(node) is None:
            return None
        if not shape(node):  # a 0-dim tensor: the number itself
            return c if holds_exactly(c, dtype(node)) else None
        v = interp.val(first) if like and isinstance(first, Node) else None
        return constant(c, v.cd if isinstance(v, ElemV) else -1)

    return op


# tensors full of one number: the number or the argument holding it, like another tensor or not
op_full = _filled("fill_value", like=False)
op_new_full = _filled("fill_value", like=False)
op_full_like = _filled("fill_value", like=True)
op_zeros = _filled(0, like=False)
op_new_zeros = _filled(0, like=False)
op_zeros_like = _filled(0, like=True)
op_ones = _filled(1, like=False)
op_new_ones = _filled(1, like=False)
op_ones_like = _filled(1, like=True)
op_fill = _filled("value", like=True)


def op_tensor(interp: Interpretation, node, data, kw):
    """torch.tensor(c), torch.scalar_tensor(c), t.new_tensor(c) of a Python number: the number, when
    the tensor's dtype holds it exactly (torch.where(keep, t, torch.tensor(0)))."""
    c = exact(kw.get("data") if data is None or isinstance(data, Node) else data)
    if c is None or shape(node) != () or not holds_exactly(c, dtype(node)):
        return None
    return c


def holds_exactly(c: Fraction, dt) -> bool:
    """Whether a tensor of dtype dt holds the number c exactly (0, 1, 0.5, ... in any float dtype)."""
    if dt in (torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        return c.denominator == 1 and (dt != torch.bool or c in (0, 1))
    bits = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}.get(dt)
    if bits is None:
        return False
    if c == 0:
        return True
    # a dyadic rational with at most `bits` significant bits (exponent ranges are no concern for
    # the constants of a loss)
    num, den = abs(c.numerator), c.denominator
    if den & (den - 1):
        return False
    while num % 2 == 0:
        num //= 2
    return num.bit_length() <= bits


def op_arange(interp: Interpretation, node, _, kw):
    # arange(n), arange(0, n), arange(0, n, 1) in a dtype that holds 0, ..., n - 1 exactly
    args = kw.get("shape", ())
    start = args[0] if len(args) > 1 else kw.get("start", 0)
    step = args[2] if len(args) > 2 else kw.get("step", 1)
    shp = shape(node)
    if not (args or "end" in kw) or not _is_number(start, 0) or not _is_number(step, 1) \
            or shp is None or len(shp) != 1 or dtype(node) not in EXACT_UP_TO:
        return None
    n = shp[0]
    if dtype(node) not in (torch.int64, torch.int32) and not (isinstance(n, int) and n <= EXACT_UP_TO[dtype(node)]):
        return None
    return ArangeV(n)


def _is_number(v, k) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v == k


def op_expand(interp: Interpretation, node, a, kw):
    # expand aligns the trailing dims: the arange stays at its dim from the end
    v = interp.val(a)
    if isinstance(v, ArangeV):
        return v
    if carries_logits(v):
        raise Reject(f"{kind(v)} are expanded ({describe(node)})")
    return None


def op_scatter(interp: Interpretation, node, t, kw):
    tv = interp.val(t)
    value = exact(kw.get("value"))
    if kw.get("reduce") is not None or value is None or shape(node) is None:
        return None
    base = tv if isinstance(tv, ElemV) and tv.key is None else None
    if base is None:
        return None
    lab = interp.label(kw.get("index"))
    nd = len(shape(node))
    cd = from_end(norm_dim(kw["dim"], nd), nd)
    want = list(shape(node))
    want[cd] = 1
    if lab is None or shape(kw["index"]) != tuple(want) or base.cd not in (None, cd):
        return None
    return _write_at(dataclasses.replace(base, cd=cd), one_hot(lab, cd), value)


def _write_at(t: ElemV, where: ElemV, value: Fraction) -> ElemV:
    """t with ``value`` written where the 0/1 tensor ``where`` is 1: t - t * where + value * where."""
    return add(add(t, elem_mul(t, where), Q(-1)), scale(where, value))


def op_setitem(interp: Interpretation, node, t, kw):
    if len(node.args) != 3:
        return None
    _, index, value = node.args
    tv, c = interp.val(t), exact(value)
    if not (isinstance(tv, ElemV) and tv.key is None) or c is None or shape(t) is None:
        return None
    parts = index if isinstance(index, tuple) else (index,)
    shp = shape(t)
    # t[:, p] = c, t[..., p] = c: one class column of the target
    if parts and isinstance(parts[-1], int) and not isinstance(parts[-1], bool) and tv.cd in (None, -1) \
            and all(p == slice(None) or p is Ellipsis for p in parts[:-1]) \
            and (Ellipsis in parts[:-1] or len(parts) == len(shp)):
        V = shp[-1]
        if isinstance(V, int) and -V <= parts[-1] < V:
            col = ElemV(None, -1, (((("COL", parts[-1] % V), "K", frozenset()), Q(1)),))
            return _write_at(dataclasses.replace(tv, cd=-1), col, c)
    # t[arange(n), y] = c: the label's entry of each row
    at = label_index(interp, parts, shp)
    if at is not None:
        cd = at[0] - len(shp)
        if tv.cd in (None, cd) or as_constant(tv) is not None:
            return _write_at(dataclasses.replace(tv, cd=cd), one_hot(at[1], cd), c)
    # t[mask] = c with a row mask
    if isinstance(index, Node):
        m = interp.cond(index)
        if m is not None and shape(index) == shp[:-1]:
            return add(with_conds(tv, m.invert().atoms), with_conds(constant(c, tv.cd), m.atoms))
    return None


def op_index_fill(interp: Interpretation, node, t, kw):
    return None


def op_clone(interp: Interpretation, node, a, kw):
    return interp.val(a) if isinstance(a, Node) else None
