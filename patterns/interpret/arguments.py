"""What the meaning of an op reads off its arguments, whatever its family: dims, shapes, constants.

Pure functions of shapes and symbolic values; the interpretation's own readers (a node's value,
its labels, mask or logits) are methods of :class:`Interpretation`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

import torch
import torch.fx

from smoothce.patterns.algebra import U, ElemV, Q, Reject
from smoothce.patterns.nodes import fake

Node = torch.fx.Node

# the integers a dtype holds exactly from 0 on
EXACT_UP_TO = {torch.int64: 2 ** 63, torch.int32: 2 ** 31, torch.int16: 2 ** 15, torch.int8: 2 ** 7,
               torch.uint8: 2 ** 8, torch.float64: 2 ** 53, torch.float32: 2 ** 24, torch.float16: 2 ** 11,
               torch.bfloat16: 2 ** 8}


def norm_dim(dim, ndim: int) -> int:
    """A dim as a non-negative index."""
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            raise Reject(f"a reduction over dims {list(dim)}")
        dim = dim[0]
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise Reject(f"dim {dim!r} is not a constant")
    if not -ndim <= dim < ndim:
        raise Reject(f"dim {dim} is out of range for {ndim} dims")
    return dim % ndim


def from_end(dim: int, ndim: int) -> int:
    return dim - ndim


def as_constant(v) -> Optional[Fraction]:
    """The number a value is everywhere (a Python number, or a full tensor such as zeros_like)."""
    if isinstance(v, Fraction):
        return v
    if isinstance(v, ElemV) and v.key is None:
        d = v.tdict
        if not d:
            return Q(0)
        if len(d) == 1:
            ((part, base, conds), c), = d.items()
            if part == U and base == "K" and not conds:
                return c
    return None


def is_scalar_like(node) -> bool:
    """A one-element tensor or a symbolic size: something a loss can be divided by."""
    if not isinstance(node, Node):
        return False
    t = fake(node)
    if t is not None:
        return t.numel() == 1 and t.dim() <= 1
    v = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(v, (torch.SymInt, torch.SymFloat, int, float)) and not isinstance(v, bool)


def labels_of(target: ElemV) -> frozenset:
    """The label tensors a target distribution's one-hots read."""
    return frozenset(part[1].base for (part, _, _), _ in target.terms if part[0] in ("OH", "OHW"))


def numel(shp):
    return None if shp is None else math.prod(shp)


def padded(shp, ndim: int):
    """shp broadcast to ndim dims (size-1 dims in front), None when it has more."""
    if shp is None or len(shp) > ndim:
        return None
    return (1,) * (ndim - len(shp)) + tuple(shp)


def keepdim_shape(shp, cd):
    """shp with size 1 at the class dim (cd counted from the end): a keepdim reduction over the classes."""
    if shp is None or cd is None:
        return None
    out = list(shp)
    out[len(out) + cd] = 1
    return tuple(out)
