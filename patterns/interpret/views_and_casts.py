"""The meaning of views, reshapes and casts: reshape (view), reshape_as (view_as), squeeze,
unsqueeze, flatten, transpose, permute, contiguous, the dtype casts (float, to, long, ...) and detach.

A view keeps every value in its order, so a value passes through unchanged while the classes stay
the last dim; a transpose that keeps the rows in order only moves the class dim; a cast keeps a float value (rounded) and a label, mask or arange while the new dtype
holds its numbers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx

from smoothce.patterns.algebra import (
    ArangeV, ColV, CondV, DivisorV, ElemV, LabelV, Reject, RowV, ScalarV, WeightAtV, carries_logits, kind,
)
from smoothce.patterns.interpret.arguments import EXACT_UP_TO, norm_dim
from smoothce.patterns.nodes import describe, dtype, is_int, shape

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation

Node = torch.fx.Node


def relayout(interp: Interpretation, node, a):
    """A view or reshape: the same values in the same order."""
    v = interp.val(a)
    if isinstance(v, (LabelV, CondV, WeightAtV, RowV, ScalarV, DivisorV)):
        return v
    if isinstance(v, ElemV) and v.key is not None:
        sa, sn = shape(a), shape(node)
        if v.cd == -1 and sa and sn and sa[-1] == sn[-1]:
            return v
        raise Reject(f"log-probs are reshaped across their classes ({describe(node)})")
    if isinstance(v, ElemV):
        sa, sn = shape(a), shape(node)
        return v if sa and sn and sa[-1] == sn[-1] and v.cd in (None, -1) else None
    if isinstance(v, ArangeV):
        return _arange_view(v, shape(a), shape(node))
    if carries_logits(v):
        raise Reject(f"{kind(v)} are reshaped ({describe(node)})")
    if v is None and isinstance(a, Node):  # the user's labels or mask, seen through a view
        return interp.label(a) or interp.cond(a)
    return None


def op_reshape(interp: Interpretation, node, a, kw):
    return relayout(interp, node, a)


def op_reshape_as(interp: Interpretation, node, a, kw):
    return relayout(interp, node, a)


def op_squeeze(interp: Interpretation, node, a, kw):
    return relayout(interp, node, a)


def op_unsqueeze(interp: Interpretation, node, a, kw):
    return relayout(interp, node, a)


def op_flatten(interp: Interpretation, node, a, kw):
    return relayout(interp, node, a)


def op_transpose(interp: Interpretation, node, a, kw):
    shp = shape(a)
    if shp is None or not all(isinstance(d, int) and not isinstance(d, bool) for d in (kw.get("dim0"), kw.get("dim1"))):
        return _moved(interp, node, a, None)
    order = list(range(len(shp)))
    i, j = norm_dim(kw["dim0"], len(shp)), norm_dim(kw["dim1"], len(shp))
    order[i], order[j] = order[j], order[i]
    return _moved(interp, node, a, order)


def op_permute(interp: Interpretation, node, a, kw):
    shp, dims = shape(a), kw.get("dims", kw.get("shape"))
    if shp is None or not isinstance(dims, (list, tuple)) or len(dims) != len(shp) \
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return _moved(interp, node, a, None)
    return _moved(interp, node, a, [norm_dim(d, len(shp)) for d in dims])


def _moved(interp: Interpretation, node, a, order: Optional[list]):
    """A transpose or permute (output dim k is input dim order[k]) of a per-class value: the same
    value with its classes at another dim, when the rows keep their order (lp.transpose(1, 2) of
    (B, V, T) log-probs: the same log-probs, classes last). Anything else moves rows."""
    v = interp.val(a)
    if isinstance(v, ElemV) and order is not None and (v.cd is not None or v.key is None):
        nd = len(order)
        if v.cd is None:  # a constant target: no class dim to move
            return v
        cd = v.cd + nd
        rows = [d for d in order if d != cd]
        if rows == sorted(rows):
            return dataclasses.replace(v, cd=order.index(cd) - nd)
    if carries_logits(v):
        raise Reject(f"{kind(v)} are transposed so that their rows change order ({describe(node)})")
    return None


def op_contiguous(interp: Interpretation, node, a, kw):
    return interp.val(a) if isinstance(a, Node) else None


def op_cast(interp: Interpretation, node, a, kw):
    v = interp.val(a)
    to = dtype(node)
    if isinstance(v, CondV):
        return v  # a 0/1 tensor multiplies like the mask itself
    if isinstance(v, ArangeV):  # the same numbers while the new dtype holds them
        fits = to == torch.int64 or to in EXACT_UP_TO and isinstance(v.n, int) and v.n <= EXACT_UP_TO[to]
        return v if fits else None
    if isinstance(v, LabelV):
        return v if is_int(node) and to in (torch.int64, torch.int32) else None
    if isinstance(v, DivisorV):
        return v
    if isinstance(v, (RowV, ElemV, ScalarV, ColV)):
        # a float value in another float dtype: the same number, rounded
        if to is not None and to.is_floating_point and shape(node) == shape(a):
            return v
        raise Reject(f"{kind(v)} converted to {to} ({describe(node)})")
    if carries_logits(v):
        raise Reject(f"{kind(v)} converted ({describe(node)})")
    return None


def op_detach(interp: Interpretation, node, a, kw):
    v = interp.val(a)
    if isinstance(v, ElemV) and v.key is None or isinstance(v, (LabelV, CondV, DivisorV)):
        return v  # no gradient anyway
    if carries_logits(v):
        raise Reject(f"the loss is detached ({describe(node)})")
    return None


def _static_one(d) -> bool:
    return isinstance(d, int) and d == 1


def _arange_view(v: ArangeV, before, after) -> Optional[ArangeV]:
    """A view of an arange that is 1 outside its axis (not expanded): the n values in order, so
    the arange of the view's one dim of size n (any dim when n is 1)."""
    if before is None or after is None or not after \
            or not all(_static_one(d) for i, d in enumerate(before) if i != len(before) + v.axis):
        return None
    dims = [i for i, d in enumerate(after) if not _static_one(d)]
    if len(dims) > 1:
        return None
    return ArangeV(v.n, dims[0] - len(after) if dims else -1)


def relayout_index(parts: tuple, shp) -> bool:
    """Whether basic indexing only adds dims (None) or drops dims of size 1 (0 or -1 there)."""
    if shp is None or parts.count(Ellipsis) > 1:
        return False
    if not all(p is None or p is Ellipsis or p == slice(None) or isinstance(p, int) and not isinstance(p, bool)
               for p in parts):
        return False
    dims = [p for p in parts if p is not None]
    if Ellipsis in dims:
        i = dims.index(Ellipsis)
        dims = dims[:i] + [slice(None)] * (len(shp) - len(dims) + 1) + dims[i + 1:]
    return len(dims) <= len(shp) and all(not isinstance(p, int) or p in (0, -1) and shp[i] == 1
                                         for i, p in enumerate(dims))
