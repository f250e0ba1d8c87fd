"""Operation names: the torch functions, Tensor methods and operators that mean the same thing.

Dynamo records ``torch.log_softmax(x, -1)``, ``x.log_softmax(-1)`` and ``F.log_softmax(x, -1)``
as three different call nodes; ``op_name`` maps all three to "log_softmax", and ``bind`` gives
their arguments by name with PyTorch's defaults, so the interpreter has one handler per meaning.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

from smoothce.compat import OPERATOR_METHODS

Node = torch.fx.Node

# torch.<name> functions and Tensor.<name> methods that share a meaning.
_SHARED = {
    "add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul", "div": "div",
    "divide": "div", "true_divide": "div", "neg": "neg", "negative": "neg", "pow": "pow",
    "square": "square", "ne": "ne", "not_equal": "ne", "eq": "eq", "lt": "lt", "less": "lt", "le": "le",
    "less_equal": "le", "gt": "gt", "greater": "gt", "ge": "ge", "greater_equal": "ge",
    "logical_not": "invert", "bitwise_not": "invert", "logical_and": "and", "bitwise_and": "and",
    "sum": "sum", "mean": "mean", "nansum": "sum", "gather": "gather", "take_along_dim": "take_along_dim",
    "log_softmax": "log_softmax", "softmax": "softmax", "log": "log", "logsumexp": "logsumexp",
    "where": "where", "masked_fill": "masked_fill", "scatter": "scatter", "clamp": "clamp",
    "clip": "clamp", "clamp_min": "clamp_min", "squeeze": "squeeze", "unsqueeze": "unsqueeze",
    "reshape": "reshape", "flatten": "flatten", "tanh": "tanh", "index_select": "index_select",
    "select": "select", "matmul": "matmul", "mv": "matmul", "count_nonzero": "count_nonzero",
    "full_like": "full_like", "ones_like": "ones_like", "zeros_like": "zeros_like", "clone": "clone",
    "detach": "detach", "index_fill": "index_fill", "numel": "numel", "broadcast_to": "expand",
    "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose", "permute": "permute",
}
_FUNCTION_ONLY = {"full": "full", "zeros": "zeros", "ones": "ones", "arange": "arange", "empty": "empty",
                  "empty_like": "empty_like", "tensor": "tensor", "scalar_tensor": "tensor"}
_METHOD_ONLY = {
    "__getitem__": "getitem", "view": "reshape", "view_as": "reshape_as", "reshape_as": "reshape_as",
    "new_full": "new_full", "new_zeros": "new_zeros", "new_ones": "new_ones", "new_empty": "new_empty",
    "float": "cast", "double": "cast", "half": "cast", "bfloat16": "cast", "to": "cast",
    "type_as": "cast", "type": "cast", "long": "cast", "int": "cast", "bool": "cast",
    "contiguous": "contiguous", "size": "size", "exp": "exp", "expand": "expand", "expand_as": "expand",
    "new_tensor": "new_tensor",
}


def _function_table() -> dict:
    names = {
        operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
        operator.neg: "neg", operator.pow: "pow", operator.ne: "ne", operator.eq: "eq",
        operator.lt: "lt", operator.le: "le", operator.gt: "gt", operator.ge: "ge",
        operator.invert: "invert", operator.and_: "and", operator.getitem: "getitem",
        operator.setitem: "setitem", operator.matmul: "matmul",
        F.log_softmax: "log_softmax", F.softmax: "softmax", F.cross_entropy: "cross_entropy",
        F.nll_loss: "nll_loss", F.kl_div: "kl_div", F.one_hot: "one_hot", F.tanh: "tanh",
        torch.special.log_softmax: "log_softmax", torch.special.softmax: "softmax",
        torch.special.logsumexp: "logsumexp", torch.exp: "exp",
    }
    for name, op in {**_SHARED, **_FUNCTION_ONLY}.items():
        if hasattr(torch, name):
            names[getattr(torch, name)] = op
    return names


_FUNCTIONS = _function_table()
_METHODS = {**_SHARED, **_METHOD_ONLY}
for _name in ("full", "zeros", "ones", "arange"):
    _METHODS.pop(_name, None)
_METHODS.pop("full_like", None)
_METHODS.pop("ones_like", None)
_METHODS.pop("zeros_like", None)

# In-place methods the interpreter follows (on a fresh loss term or a fresh target tensor): the
# mutated node takes the new value from then on.
INPLACE = {"masked_fill_": "masked_fill", "mul_": "mul", "div_": "div", "neg_": "neg", "add_": "add",
           "sub_": "sub", "scatter_": "scatter", "fill_": "fill", "index_fill_": "index_fill"}
# The augmented assignments on a tensor (t *= c, t += d): in place, like the methods above; Dynamo
# records them as these operator functions.
INPLACE_OPERATORS = {operator.iadd: "add", operator.isub: "sub", operator.imul: "mul", operator.itruediv: "div"}
# Operations whose result is a new tensor that aliases nothing: an in-place change of it affects no
# other tensor.
FRESH = {"gather", "sum", "mean", "mul", "add", "sub", "div", "neg", "log_softmax", "cross_entropy",
         "nll_loss", "masked_fill", "where", "logsumexp", "pow", "square", "full", "zeros", "ones",
         "full_like", "zeros_like", "ones_like", "new_full", "new_zeros", "new_ones", "one_hot", "scatter",
         "clone", "take_along_dim", "log", "softmax", "index_fill", "matmul", "kl_div", "empty", "new_empty",
         "empty_like", "tensor", "new_tensor"}
# Fresh tensors whose contents are unspecified until written: two calls are not one value.
UNINITIALIZED = {"empty", "new_empty", "empty_like"}

# Calls that are a loss by themselves: their rejection is a near miss even without log-probs.
SEED_OPS = {"cross_entropy", "nll_loss", "kl_div"}


def op_name(node: Node) -> Optional[str]:
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target) or INPLACE_OPERATORS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        if node.target in OPERATOR_METHODS:  # torch 2.11's a.__eq__(b) for a == b
            return _FUNCTIONS[OPERATOR_METHODS[node.target]]
        return _METHODS.get(node.target) or INPLACE.get(node.target)
    return None


# Parameter names after the tensor argument, per operation (Tensor-method order).
_PARAMS = {
    "log_softmax": ("dim", "dtype"),
    "softmax": ("dim", "dtype"),
    "logsumexp": ("dim", "keepdim"),
    "sum": ("dim", "keepdim", "dtype"),
    "mean": ("dim", "keepdim", "dtype"),
    "gather": ("dim", "index"),
    "take_along_dim": ("indices", "dim"),
    "index_select": ("dim", "index"),
    "index_fill": ("dim", "index", "value"),
    "select": ("dim", "index"),
    "scatter": ("dim", "index", "value"),
    "masked_fill": ("mask", "value"),
    "fill": ("value",),
    "clamp": ("min", "max"),
    "clamp_min": ("min",),
    "one_hot": ("num_classes",),
    "full_like": ("fill_value",),
    "squeeze": ("dim",),
    "transpose": ("dim0", "dim1"),
    "unsqueeze": ("dim",),
    "flatten": ("start_dim", "end_dim"),
    "pow": ("exponent",),
    "add": ("other", "alpha"),
    "sub": ("other", "alpha"),
    "mul": ("other",),
    "div": ("other", "rounding_mode"),
    "matmul": ("other",),
    "ne": ("other",), "eq": ("other",), "lt": ("other",), "le": ("other",), "gt": ("other",),
    "ge": ("other",), "and": ("other",),
    "where": ("input", "other"),
    "new_full": ("size", "fill_value"),
    "full": ("fill_value",),
    "new_tensor": ("data",),
    "count_nonzero": ("dim",),
    "cross_entropy": ("target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                      "label_smoothing"),
    "nll_loss": ("target", "weight", "size_average", "ignore_index", "reduce", "reduction"),
    "kl_div": ("target", "size_average", "reduce", "reduction", "log_target"),
}
_DEFAULTS = {
    "cross_entropy": {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
                      "reduction": "mean", "label_smoothing": 0.0},
    "nll_loss": {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
                 "reduction": "mean"},
    "kl_div": {"size_average": None, "reduce": None, "reduction": "mean", "log_target": False},
    "sum": {"dim": None, "keepdim": False, "dtype": None},
    "mean": {"dim": None, "keepdim": False, "dtype": None},
    "log_softmax": {"dim": None, "dtype": None},
    "softmax": {"dim": None, "dtype": None},
    "logsumexp": {"keepdim": False},
    "clamp": {"min": None, "max": None},
    "one_hot": {"num_classes": -1},
    "add": {"alpha": 1},
    "sub": {"alpha": 1},
    "div": {"rounding_mode": None},
    "squeeze": {"dim": None},
    "flatten": {"start_dim": 0, "end_dim": -1},
    "count_nonzero": {"dim": None},
    "take_along_dim": {"dim": None},
}
_FIRST = ("input", "self", "tensor", "condition", "x")
# Operations whose arguments after the first are a shape, or that take no tensor argument.
_SHAPE_ARGS = {"reshape", "full", "zeros", "ones", "new_zeros", "new_ones", "arange", "size", "permute"}


def bind(node: Node, op: str) -> tuple[Any, dict]:
    """(first tensor argument, the other arguments by name) with PyTorch's defaults filled in.

    Shape-taking operations (reshape, view, zeros, full, ...) get their shape as ``kw['shape']``.
    """
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if node.op == "call_function" and node.target is F.log_softmax or node.target is F.softmax:
        if len(args) >= 3:
            del args[2]  # _stacklevel
        kwargs.pop("_stacklevel", None)
    if op in ("full", "zeros", "ones", "arange"):  # torch.full(size, fill_value), torch.zeros(*size)
        out = dict(kwargs)
        if op == "full":
            out["shape"] = args[0] if args else kwargs.get("size")
            if len(args) > 1:
                out["fill_value"] = args[1]
        else:
            out["shape"] = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else tuple(args)
        return None, out
    if not args:
        for name in _FIRST:
            if name in kwargs:
                args = [kwargs.pop(name)]
                break
    first = args[0] if args else None
    out = dict(_DEFAULTS.get(op, {}))
    rest = args[1:]
    if op in _SHAPE_ARGS:
        out["shape"] = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)
        out.update(kwargs)
        return first, out
    for name, value in zip(_PARAMS.get(op, ()), rest):
        out[name] = value
    for name, value in kwargs.items():
        if name == "src" and op == "scatter":
            name = "value"
        out[name] = value
    return first, out
