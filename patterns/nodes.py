"""Facts about FX nodes the detector reads: fake tensors, shapes, source lines, structural equality.

Nothing here knows about losses. ``Structure`` gives every node a key such that two nodes with
equal keys compute the same value (common subexpressions: ``keep.sum()`` written twice), which
is what lets two terms divided by "the same" token count be added.
"""

from __future__ import annotations

import math
import operator
import os
import re
from fractions import Fraction
from typing import Any, Optional

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

from smoothce.patterns.ops import INPLACE_OPERATORS, UNINITIALIZED, bind, op_name

Node = torch.fx.Node


def fake(node) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo recorded for a node, or None (not a node, or not a tensor)."""
    if isinstance(node, Node):
        v = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(v, torch.Tensor):
            return v
    return None


def subclass(node) -> Optional[str]:
    """The name of the tensor subclass a node's value is (DTensor, a quantized weight, ...); None
    for a plain tensor (a fake one, as the graph holds it) and for anything that is no tensor."""
    t = fake(node)
    if t is None or isinstance(t, FakeTensor) or type(t) in (torch.Tensor, torch.nn.Parameter):
        return None
    return type(t).__name__


def shape(node) -> Optional[tuple]:
    t = fake(node)
    return tuple(t.shape) if t is not None else None


def static_shape(node) -> Optional[tuple]:
    s = shape(node)
    if s is None or not all(isinstance(d, int) for d in s):
        return None
    return s


def dtype(node) -> Optional[torch.dtype]:
    t = fake(node)
    return t.dtype if t is not None else None


def is_float(node) -> bool:
    t = fake(node)
    return t is not None and t.dtype.is_floating_point


def is_int(node) -> bool:
    t = fake(node)
    return t is not None and not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def is_bool(node) -> bool:
    t = fake(node)
    return t is not None and t.dtype == torch.bool


def exact(value) -> Optional[Fraction]:
    """A Python number from the graph as an exact rational (floats are dyadic rationals)."""
    if isinstance(value, bool):
        return Fraction(int(value))
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float) and math.isfinite(value):
        return Fraction(value)
    return None


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def location(node: Optional[Node]) -> str:
    """'file.py:LINE' of the innermost user frame in the node's stack trace."""
    if node is None:
        return "<unknown>"
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return "<unknown>"
    path, line = frames[-1]
    return f"{os.path.basename(path)}:{line}"


_MODULE_DICT = re.compile(r"\._(?:buffers|parameters|modules)\['([^']+)'\]")
_FRAME_LOCAL = re.compile(r"^[LG]\['([^']+)'\]")


def user_name(node: Node) -> str:
    """The name the user's code gives a graph input: ``class_w`` for an argument, ``self.weight``
    for a module's buffer, ``W`` for a global; the node's own name for anything computed."""
    from smoothce.compat import graph_input_source

    source = graph_input_source(node) if node.op == "placeholder" else None
    if source is None:
        return node.target if node.op == "get_attr" else node.name
    return _MODULE_DICT.sub(r".\1", _FRAME_LOCAL.sub(r"\1", source))


def is_module_state(node: Node) -> bool:
    """A graph input that is a module's buffer or parameter (self.one_hot): its values are set
    outside the graph, in __init__ or by the optimizer, and the graph does not show them."""
    from smoothce.compat import graph_input_source

    if node.op == "get_attr":
        return True
    source = graph_input_source(node) if node.op == "placeholder" else None
    return source is not None and ("._buffers[" in source or "._parameters[" in source)


def words(node) -> str:
    """A tensor in a near-miss reason: the user's name of a graph input (``y``, ``self.weight``),
    else what computes it and where ("neg at loss.py:7"), never a graph node's name."""
    if not isinstance(node, Node):
        return repr(node)
    if node.op in ("placeholder", "get_attr"):
        return user_name(node)
    return describe(node)


def target_name(node: Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", str(t))
    return {"getitem": "indexing", "setitem": "item assignment"}.get(name, name)


def describe(node: Node) -> str:
    """'exp at loss.py:12': what a node does and where, for near-miss reasons."""
    return f"{target_name(node)} at {location(node)}"


def mutates(node: Node) -> bool:
    """In-place Tensor methods (name ending in '_'), item assignment and the augmented assignments
    on a tensor (t *= c) change their first argument."""
    if not node.args or not isinstance(node.args[0], Node):
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    return node.target is operator.setitem or _is_inplace_operator(node.target) and fake(node.args[0]) is not None


def _is_inplace_operator(target) -> bool:
    try:
        return target in INPLACE_OPERATORS
    except TypeError:  # unhashable target
        return False


_SHAPE_READS = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default)


def reads_shape_only(node: Node) -> bool:
    """A node that reads only the size of its input (Dynamo binds a data-dependent size with
    sym_size): it does not need the input's values, only a tensor of the same shape."""
    return node.op == "call_function" and node.target in _SHAPE_READS


def reads_mesh_only(node: Node) -> bool:
    """``getattr(t, "device_mesh")`` of a DTensor (code that places its labels on the logits'
    mesh): it needs no values, only a DTensor on the same mesh, which every DTensor an op read or
    made is."""
    return (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] == "device_mesh")


def reads_metadata_only(node: Node) -> bool:
    """A node that reads only the size or the device mesh of its input."""
    return reads_shape_only(node) or reads_mesh_only(node)


def mutations(graph: torch.fx.Graph) -> dict:
    """node -> the in-place ops that change it."""
    out: dict = {}
    for n in graph.nodes:
        if mutates(n):
            out.setdefault(n.args[0], []).append(n)
    return out


# Deterministic operations whose results depend only on their arguments: two calls with equal
# arguments are one value. Anything else (random ops, in-place ops, unknown callables) is only
# equal to itself.
_PURE_METHODS = {
    "sum", "mean", "ne", "eq", "lt", "le", "gt", "ge", "float", "double", "half", "bfloat16", "long",
    "int", "bool", "to", "type_as", "view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous",
    "clamp", "clamp_min", "clip", "masked_fill", "logical_not", "logical_and", "logical_or", "abs",
    "numel", "size", "count_nonzero", "neg", "add", "sub", "mul", "div", "detach", "__getitem__",
}
_PURE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
    operator.ne, operator.eq, operator.lt, operator.le, operator.gt, operator.ge, operator.invert,
    operator.and_, operator.or_, operator.getitem, torch.sum, torch.mean, torch.ne, torch.eq,
    torch.lt, torch.le, torch.gt, torch.ge, torch.where, torch.clamp, torch.clip, torch.logical_not,
    torch.logical_and, torch.logical_or, torch.count_nonzero, torch.numel, torch.arange,
}
_PURE_FUNCTIONS.update(_SHAPE_READS)


class Structure:
    """Structural keys: equal keys mean equal values (at the point the node runs).

    A key is ("node", node) for a node equal only to itself, or ("value", i) where i numbers
    the distinct computations: each is (operation, the keys of its arguments), so keys stay flat
    however deep the graph is.
    """

    def __init__(self, graph: torch.fx.Graph):
        self._keys: dict[Node, Any] = {}
        self._ids: dict[tuple, int] = {}
        mutated = mutations(graph)
        touched = set()  # nodes whose value depends on something changed in place
        for n in graph.nodes:
            if n in mutated or mutates(n) or any(a in touched for a in n.all_input_nodes):
                touched.add(n)
            op = op_name(n)
            pure = op is not None and op not in UNINITIALIZED or (
                n.op == "call_method" and n.target in _PURE_METHODS) or (
                n.op == "call_function" and _is_pure_function(n.target))
            if not pure or n in touched:
                self._keys[n] = ("node", n)
                continue
            if op is not None:  # by meaning: torch.clamp(t, min=1) is t.clamp(1)
                first, kw = bind(n, op)
                computation = ("op", op, self._arg(first), tuple(sorted((k, self._arg(v)) for k, v in kw.items())))
            else:
                args = tuple(self._arg(a) for a in n.args)
                kwargs = tuple(sorted((k, self._arg(v)) for k, v in n.kwargs.items()))
                computation = (n.op, n.target if n.op == "call_method" else id(n.target), args, kwargs)
            self._keys[n] = ("value", self._ids.setdefault(computation, len(self._ids)))

    def key(self, node) -> Any:
        if isinstance(node, Node):
            return self._keys[node]
        return ("const", type(node).__name__, node) if _hashable(node) else ("object", id(node))

    def _arg(self, a):
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(self._arg(x) for x in a))
        if isinstance(a, slice):
            return ("slice", self._arg(a.start), self._arg(a.stop), self._arg(a.step))
        return self.key(a)


def _is_pure_function(target) -> bool:
    try:
        return target in _PURE_FUNCTIONS
    except TypeError:  # unhashable target
        return False


def _hashable(v) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True
