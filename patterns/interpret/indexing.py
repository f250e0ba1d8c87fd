"""The meaning of indexing and gathers: gather, take_along_dim, index_select, select and ``[]``.

What they read is the label's entry of each row (``lp.gather(1, y[:, None])``,
``lp[arange(n), y]``), a class weight at the labels (``w[y]``), one class column (``lp[:, p]``),
the rows a boolean mask selects (``lp[keep]``: the log-probs of ``x[keep]``) or the same values
seen through basic indexing. Any other index into log-probs is a near miss.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx

from smoothce.patterns.algebra import (
    ArangeV, ElemV, LabelV, Q, Reject, RowV, WeightAtV, carries_logits, elem_column, elem_gather, kind, log_probs,
    seeds_of,
)
from smoothce.patterns.interpret.arguments import from_end, norm_dim
from smoothce.patterns.interpret.views_and_casts import relayout, relayout_index
from smoothce.patterns.nodes import describe, dtype, is_bool, is_float, shape

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation

Node = torch.fx.Node


def at_label(interp: Interpretation, node, src, dim, label: LabelV):
    """src gathered at the labels along dim (shape checked by the caller)."""
    v = interp.val(src)
    if not isinstance(src, Node) or shape(src) is None:
        return None
    ndim = len(shape(src))
    cd = from_end(norm_dim(dim, ndim), ndim)
    if isinstance(v, ElemV) and v.key is not None:
        if cd != v.cd:
            raise Reject(f"log-probs over dim {v.cd + ndim} are read along dim {cd + ndim}")
        return elem_gather(v, label)
    lg = interp.logits(src)
    if lg is not None and ndim >= 2:
        key = dataclasses.replace(lg.key, cd=cd)
        return RowV.make(key, {("XG", label): Q(1)}, seeds=seeds_of(lg))
    if v is None and is_float(src) and ndim == 1:
        return WeightAtV(src, label)
    if carries_logits(v):
        raise Reject(f"{kind(v)} are read at the labels ({describe(node)})")
    return None


def op_gather(interp: Interpretation, node, src, kw, wrap=None):
    idx = interp.label(kw.get("index"))
    if idx is not None and wrap is not None:
        idx = dataclasses.replace(idx, wrap=wrap) if idx.wrap is None else None
    if idx is None or not isinstance(src, Node) or shape(src) is None:
        if carries_logits(interp.val(src)):
            raise Reject(f"log-probs gathered at an index that is not built from the labels ({describe(node)})")
        return None
    dim = norm_dim(kw["dim"], len(shape(src)))
    want = list(shape(src))
    want[dim] = 1
    if shape(kw["index"]) != tuple(want) and len(want) > 1:
        raise Reject(f"gather index of shape {shape(kw['index'])} does not pick one class per row")
    return at_label(interp, node, src, dim, idx)


def op_take_along_dim(interp: Interpretation, node, src, kw):
    # torch.take_along_dim is gather at indices.remainder(size): no label is out of range
    if kw.get("dim") is None:
        return None
    return op_gather(interp, node, src, {"dim": kw["dim"], "index": kw.get("indices")}, wrap="mod")


def op_index_select(interp: Interpretation, node, src, kw):
    idx = interp.label(kw.get("index"))
    if idx is not None and interp.val(src) is None and shape(src) is not None and len(shape(src)) == 1 \
            and is_float(src):
        return WeightAtV(src, idx)
    return None


def _column(interp: Interpretation, node, src, dim, p):
    """src[..., p] along its class dim: one class column."""
    v = interp.val(src)
    shp = shape(src)
    if shp is None or isinstance(p, bool) or not isinstance(p, int):
        return None
    ndim = len(shp)
    cd = from_end(norm_dim(dim, ndim), ndim)
    V = shp[cd]
    if not isinstance(V, int) or not -V <= p < V:
        return None
    p %= V
    if isinstance(v, ElemV) and v.key is not None and v.cd == cd:
        return elem_column(v, p)
    return None


def op_select(interp: Interpretation, node, src, kw):
    v = interp.val(src)
    out = _column(interp, node, src, kw.get("dim"), kw.get("index"))
    if out is None and carries_logits(v):
        raise Reject(f"{kind(v)} are indexed ({describe(node)})")
    return out


def op_getitem(interp: Interpretation, node, src, kw):
    if len(node.args) != 2:
        return None
    index = node.args[1]
    v = interp.val(src)
    parts = index if isinstance(index, tuple) else (index,)
    shp = shape(src)
    # weight[y]: a per-class vector read at the labels (advanced indexing: -1 is the last class)
    if isinstance(index, Node) and shp is not None and len(shp) == 1 and v is None and is_float(src):
        idx = interp.label(index)
        return WeightAtV(src, idx) if idx is not None else None  # (-1 reads the last class: checked apart)
    # lp[torch.arange(n), y], lp[arange(B)[:, None], arange(T)[None, :], y]: the label's entry of each row
    at = label_index(interp, parts, shp)
    if at is not None and shape(node) == shape(parts[at[0]]):
        return at_label(interp, node, src, *at)
    # lp[keep] with a boolean mask of the rows: the log-probs of the logits' rows it selects
    selected = _selected_rows(node, v, index, shp)
    if selected is not None:
        return selected
    if any(isinstance(p, Node) for p in parts):
        if not carries_logits(v):
            return None
        if any(is_bool(p) for p in parts if isinstance(p, Node)):
            raise Reject(f"{kind(v)} are indexed by a boolean mask ({describe(node)}); it selects rows "
                         "with a data-dependent count")
        raise Reject(f"{kind(v)} are indexed by tensors that are not the labels at the class dim and "
                     f"torch.arange at each other dim ({describe(node)})")
    # x[:, p], x[..., p]: one class column
    if shp is not None and parts and isinstance(parts[-1], int) and not isinstance(parts[-1], bool) \
            and all(p == slice(None) or p is Ellipsis for p in parts[:-1]) \
            and (Ellipsis in parts[:-1] or len(parts) == len(shp)):
        if isinstance(v, ElemV):
            out = _column(interp, node, src, len(shp) - 1, parts[-1])
            if out is not None:
                return out
    return _slice(interp, node, src, parts)


def _selected_rows(node, v, index, shp) -> Optional[ElemV]:
    """log_softmax(x)[keep] is log_softmax(x[keep]): a softmax is computed row by row, so selecting
    rows of the log-probs (keep: a boolean mask of every dim but the classes) selects rows of the
    logits. The op then reads x[keep], as many rows as the mask holds (a data-dependent count)."""
    if not (isinstance(v, ElemV) and v.is_logprob() and v.cd == -1 and isinstance(index, Node) and is_bool(index)
            and shp is not None and shape(index) == shp[:-1]):
        return None
    if v.key.cd != -1:  # x[keep] would not select these rows: x has its classes elsewhere
        raise Reject(f"rows of log-probs whose classes a transpose moved last are selected ({describe(node)}); "
                     "select the rows of the logits with their classes last instead (x.transpose(1, 2)[keep])")
    key = dataclasses.replace(v.key, layout=(*v.key.layout, node))
    return dataclasses.replace(log_probs(key, v.seeds | {node}), cd=-1)


def label_index(interp: Interpretation, parts: tuple, shp) -> Optional[tuple]:
    """(class dim, labels) of an advanced index that reads one label per row: labels of the
    rows' shape at one dim, and at each other dim torch.arange along that dim's place among
    the rows (lp[arange(n), y], lp[arange(B)[:, None], arange(T)[None, :], y])."""
    if shp is None or len(shp) < 2 or len(parts) != len(shp) or not all(isinstance(p, Node) for p in parts):
        return None
    others = [i for i, p in enumerate(parts) if not isinstance(interp.values.get(p), ArangeV)]
    if len(others) > 1:
        return None
    # aranges only (lp[arange(n), arange(n)]): the labels at the last dim first
    for c in others or reversed(range(len(shp))):
        row_dims = [i for i in range(len(shp)) if i != c]
        rows = [(j, interp.values[parts[i]], parts[i], shp[i]) for j, i in enumerate(row_dims)]
        lab = interp.label(parts[c])
        if lab is None or lab.wrap or shape(parts[c]) != tuple(shp[i] for i in row_dims):
            continue
        if all(len(shape(p)) <= len(rows) and len(rows) + r.axis == j and r.n == n
               and dtype(p) in (torch.int64, torch.int32) for j, r, p, n in rows):  # eager's index dtypes
            return c, dataclasses.replace(lab, wrap="neg")
    return None


def _slice(interp: Interpretation, node, src, parts):
    """Basic indexing: None, Ellipsis, full slices and 0 at a dim of size 1 keep the values."""
    v = interp.val(src)
    if relayout_index(parts, shape(src)):
        return relayout(interp, node, src)
    if carries_logits(v):
        raise Reject(f"{kind(v)} are sliced ({describe(node)})")
    return None
