"""The logits a loss reads, seen through what commutes with the loss's row structure.

Walking back from a tensor that a log_softmax (or cross_entropy, logsumexp, ...) reads: upcasts,
positive constant factors (a temperature), a softcap ``c * tanh(u / c)``, and views and slices that
keep the last dim whole. They become part of the logits' identity (:class:`algebra.Logits`), so
``x.float() / 2`` and ``x`` are the same logits at scale 1/2 and the op reads ``x`` itself.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx

from smoothce.patterns.algebra import Logits, Q
from smoothce.patterns.nodes import exact, fake, shape
from smoothce.patterns.ops import op_name

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation

Node = torch.fx.Node

WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


def trace_logits(interp: Interpretation, x: Node) -> Logits:
    """Walk back from x through what commutes with the loss's row structure: upcasts, positive
    constant factors, a softcap c * tanh(u / c), and views and slices that keep the last dim.
    Walking outward in: factors seen before a tanh scale its cap, factors after it (inside
    the tanh) scale the logits."""
    layout: list = []
    outer, inner, cap, wide = Q(1), Q(1), None, None
    n = x
    while True:
        step = _step(interp, n)
        if step is None:
            break
        kind_, arg, inp = step
        if kind_ == "cast":
            wide = arg or wide
        elif kind_ == "layout":
            layout.insert(0, n)
        elif kind_ == "scale":
            if cap is None:
                outer *= arg
            else:
                inner *= arg
        elif kind_ == "softcap":
            if cap is not None:
                break  # tanh of tanh: the op has one softcap
            cap = outer * arg
        n = inp
    scale_ = outer if cap is None else inner * cap
    return Logits(n, tuple(layout), None, scale_, cap, wide)


def _step(interp: Interpretation, n: Node):
    """(kind, argument, input) of one step of trace_logits, or None where the logits start."""
    if n.op not in ("call_function", "call_method") or n in interp.changed_by or n in interp.inplace \
            or interp.values.get(n) is not None or not n.args:
        return None
    op = op_name(n)
    inp = n.args[0]
    if op in ("mul", "div") and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        if op == "mul" and isinstance(a, (int, float)) and isinstance(b, Node):
            a, b = b, a
        c = exact(b)
        if not isinstance(a, Node) or c is None or c <= 0:
            return None
        c = c if op == "mul" else 1 / c
        t = a
        if op == "mul" and op_name(t) == "tanh" and len(t.args) == 1 and isinstance(t.args[0], Node) \
                and t not in interp.changed_by and interp.values.get(t) is None:
            return "softcap", c, t.args[0]  # c * tanh(u): a softcap with cap c
        return "scale", c, a
    if not isinstance(inp, Node):
        return None
    if op in ("cast", "contiguous", "clone"):
        fi, fo = fake(inp), fake(n)
        if fi is None or fo is None or fi.device != fo.device or fi.shape != fo.shape:
            return None
        if fi.dtype == fo.dtype:
            return "cast", None, inp
        if fi.dtype not in WIDTH or fo.dtype not in WIDTH or WIDTH[fo.dtype] < WIDTH[fi.dtype]:
            return None  # a rounding cast: the rounded tensor is what the loss reads
        # the op computes in float32 (float64 for float64 logits): a float64 upcast must be read
        return "cast", (torch.float64 if fo.dtype == torch.float64 else None), inp
    if op in ("reshape", "flatten", "squeeze", "unsqueeze", "getitem"):
        si, so = shape(inp), shape(n)
        if not si or not so or si[-1] != so[-1]:
            return None
        if op == "getitem" and not _basic_rows_index(n.args[1], si):
            return None
        return "layout", None, inp
    return None


def _basic_rows_index(index, shp) -> bool:
    """Basic indexing that keeps the last dim whole: x[..., :-1, :], x[:, 1:], x[None]."""
    parts = index if isinstance(index, tuple) else (index,)
    if not all(p is None or p is Ellipsis or isinstance(p, slice)
               or isinstance(p, int) and not isinstance(p, bool) for p in parts):
        return False
    dims = [p for p in parts if p is not None]
    if Ellipsis in dims:
        after = dims[dims.index(Ellipsis) + 1:]
        return not after or after[-1] == slice(None)
    # without an Ellipsis the last dim is either not indexed or indexed by a full slice
    return len(dims) < len(shp) or dims[len(shp) - 1] == slice(None)


def upcast(logits: Logits, have, to) -> Optional[Logits]:
    """The logits (in dtype ``have``) read in dtype ``to``: the same logits when that widens
    them, None when it rounds them."""
    if to is None or to == have:
        return logits
    if to not in WIDTH or have not in WIDTH or WIDTH[to] < WIDTH[have]:
        return None
    # the op computes in float32 (float64 for float64 logits): a float64 upcast must be read
    return dataclasses.replace(logits, dtype=torch.float64) if to == torch.float64 else logits
