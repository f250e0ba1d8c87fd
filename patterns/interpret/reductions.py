"""The meaning of reductions: sum (and nansum), mean and count_nonzero.

Over the classes, a per-class value becomes a per-row one; over every row, a per-row value becomes
a reduced loss (a mean divides by all rows); a boolean mask summed is a count, which a reduced
loss may be divided by. Rows first and the classes later is a per-class vector (``ColV``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smoothce.patterns.algebra import (
    ColV, Divisor, DivisorV, ElemV, Q, Reject, RowV, ScalarV, carries_logits, elem_class_sum, kind, scale,
    static_classes,
)
from smoothce.patterns.interpret.arguments import norm_dim
from smoothce.patterns.nodes import describe, shape

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation


def op_sum(interp: Interpretation, node, a, kw):
    return _reduce(interp, node, a, kw, mean=False)


def op_mean(interp: Interpretation, node, a, kw):
    return _reduce(interp, node, a, kw, mean=True)


def op_count_nonzero(interp: Interpretation, node, a, kw):
    m = interp.cond(a)
    if m is not None and kw.get("dim") is None:
        return DivisorV(Divisor(("count", m.atoms), node))
    return None


def _reduce(interp: Interpretation, node, a, kw, mean):
    v = interp.val(a)
    dim, keep = kw["dim"], bool(kw["keepdim"])
    all_dims = dim is None or dim == [] or dim == () or _every_dim(a, dim)
    if isinstance(v, ColV):  # the classes left: sum (or mean) over them
        if keep or not (all_dims or dim in (0, -1, [0], [-1], (0,), (-1,))):
            raise Reject("a per-class vector is reduced over something other than its classes")
        return scale(v.scalar, Q(1, v.classes)) if mean else v.scalar
    m = interp.cond(a) if not carries_logits(v) else None
    if m is not None and not mean and all_dims and not keep:
        return DivisorV(Divisor(("count", m.atoms), node))
    if isinstance(v, DivisorV):
        return v if all_dims else None
    if not (isinstance(v, RowV) or (isinstance(v, ElemV) and v.key is not None)):
        if carries_logits(v):
            raise Reject(f"{kind(v)} reduced ({describe(node)})")
        return None
    shp = shape(a)
    nd = len(shp)
    dims = set(range(nd)) if all_dims else {
        norm_dim(d, nd) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    if isinstance(v, ElemV):
        cd = v.cd + nd
        V = static_classes(shp[cd])
        row = elem_class_sum(v, V)
        row = scale(row, Q(1, V)) if mean else row
        if dims == {cd}:
            return row
        if dims == set(range(nd)) and not keep:
            return _all_rows(row, mean)
        if dims == set(range(nd)) - {cd} and not keep:  # over the rows first, the classes later
            return ColV(_all_rows(elem_class_sum(v, V), mean), V)
        raise Reject(f"log-probs reduced over dims {sorted(dims)} (classes are dim {cd})")
    if dims == set(range(nd)) and not keep:
        return _all_rows(v, mean)
    raise Reject(f"the per-row loss is reduced over dims {sorted(dims)} of {nd} only ({describe(node)})")


def _every_dim(a, dim) -> bool:
    """Whether ``dim`` names every dim of a (mask.sum(0) of a 1-D mask)."""
    shp = shape(a)
    if shp is None or not shp:
        return False
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    try:
        return {norm_dim(d, len(shp)) for d in dims} == set(range(len(shp)))
    except Reject:  # not a constant dim
        return False


def _all_rows(row: RowV, mean) -> ScalarV:
    """The sum, or the mean over all rows (a divisor of its own: it differs from PyTorch's
    mean over kept rows, and a form reads better with it than with 1 / N in its constants)."""
    return ScalarV.of(row, Divisor(("rows",)) if mean else None)
