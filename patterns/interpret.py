"""Abstract interpretation of a Dynamo torch-IR graph into the values of :mod:`algebra`.

Every node is visited once in graph order. A node gets a symbolic value when its operation and
the values of its inputs have a known meaning; otherwise it is opaque (None). When an opaque node
reads a log-prob value, the reason is kept (``Interpretation.why``) so a near miss can say what
stopped the match.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
from fractions import Fraction
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

from smoothce.patterns.algebra import (
    ColV, CondAtom, CondV, DivisorV, ElemV, LabelV, Q, Reject, RowV, ScalarV, WeightAtV, add, carries_logits,
    elem_class_sum, elem_gather, elem_mul, elem_times_weight, row_times_row, row_times_weight_at,
    scale, with_conds,
)

Node = torch.fx.Node

# ------------------------------------------------------------------------------------------------
# Operation names: torch functions, Tensor methods and operators that mean the same thing
# ------------------------------------------------------------------------------------------------


def _function_table() -> dict:
    names = {
        operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
        operator.neg: "neg", operator.pow: "pow", operator.ne: "ne", operator.eq: "eq",
        operator.invert: "invert", operator.and_: "and", operator.getitem: "getitem",
        F.log_softmax: "log_softmax", F.cross_entropy: "cross_entropy", F.nll_loss: "nll_loss",
        F.kl_div: "kl_div", F.one_hot: "one_hot", F.tanh: "tanh",
    }
    for name, op in (
        ("add", "add"), ("sub", "sub"), ("subtract", "sub"), ("mul", "mul"), ("multiply", "mul"),
        ("div", "div"), ("divide", "div"), ("true_divide", "div"), ("neg", "neg"),
        ("negative", "neg"), ("pow", "pow"), ("square", "square"), ("ne", "ne"), ("eq", "eq"),
        ("logical_not", "invert"), ("logical_and", "and"), ("sum", "sum"), ("mean", "mean"),
        ("gather", "gather"), ("log_softmax", "log_softmax"), ("logsumexp", "logsumexp"),
        ("where", "where"), ("masked_fill", "masked_fill"), ("scatter", "scatter"),
        ("clamp", "clamp"), ("clip", "clamp"), ("clamp_min", "clamp_min"),
        ("full_like", "full_like"), ("ones_like", "ones_like"), ("zeros_like", "zeros_like"),
        ("squeeze", "squeeze"), ("unsqueeze", "unsqueeze"), ("reshape", "reshape"),
        ("flatten", "flatten"), ("tanh", "tanh"), ("index_select", "index_select"),
    ):
        names[getattr(torch, name)] = op
    names[torch.special.log_softmax] = "log_softmax"
    names[torch.special.logsumexp] = "logsumexp"
    return names


_FUNCTIONS = _function_table()
_METHODS = {
    "add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul", "div": "div",
    "divide": "div", "true_divide": "div", "neg": "neg", "negative": "neg", "pow": "pow",
    "square": "square", "ne": "ne", "eq": "eq", "logical_not": "invert", "logical_and": "and",
    "__getitem__": "getitem", "sum": "sum", "mean": "mean", "gather": "gather",
    "log_softmax": "log_softmax", "logsumexp": "logsumexp", "masked_fill": "masked_fill",
    "scatter": "scatter", "clamp": "clamp", "clip": "clamp", "clamp_min": "clamp_min",
    "squeeze": "squeeze", "unsqueeze": "unsqueeze", "reshape": "reshape", "view": "reshape",
    "flatten": "flatten", "tanh": "tanh", "index_select": "index_select", "new_full": "new_full",
    "float": "cast", "double": "cast", "half": "cast", "bfloat16": "cast", "to": "cast",
    "type_as": "cast", "long": "cast", "int": "cast", "bool": "cast", "contiguous": "cast",
    "detach": "detach",
}


# In-place methods understood when they mutate a fresh loss intermediate (HF's LabelSmoother
# masks its per-row terms with masked_fill_): the mutated node takes the new value from then on.
INPLACE = {"masked_fill_": "masked_fill", "mul_": "mul", "div_": "div", "neg_": "neg"}
# Ops whose result never aliases its input, so an in-place change of it affects nothing else.
FRESH = {"gather", "sum", "mean", "mul", "add", "sub", "div", "neg", "log_softmax", "cross_entropy",
         "nll_loss", "masked_fill", "where", "logsumexp", "pow", "square"}


# Calls that are a loss by themselves: their rejection is a near miss even without log-probs.
SEED_OPS = {"cross_entropy", "nll_loss", "kl_div"}


def op_name(node: Node) -> Optional[str]:
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(node.target) or INPLACE.get(node.target)
    return None


# Parameter names after the tensor argument, per operation (Tensor-method order).
_PARAMS = {
    "log_softmax": ("dim", "dtype"),
    "logsumexp": ("dim", "keepdim"),
    "sum": ("dim", "keepdim", "dtype"),
    "mean": ("dim", "keepdim", "dtype"),
    "gather": ("dim", "index"),
    "index_select": ("dim", "index"),
    "scatter": ("dim", "index", "value"),
    "masked_fill": ("mask", "value"),
    "clamp": ("min", "max"),
    "clamp_min": ("min",),
    "one_hot": ("num_classes",),
    "full_like": ("fill_value",),
    "squeeze": ("dim",),
    "unsqueeze": ("dim",),
    "pow": ("exponent",),
    "add": ("other", "alpha"),
    "sub": ("other", "alpha"),
    "mul": ("other",),
    "div": ("other", "rounding_mode"),
    "ne": ("other",),
    "eq": ("other",),
    "and": ("other",),
    "where": ("input", "other"),
    "new_full": ("size", "fill_value"),
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
    "logsumexp": {"keepdim": False},
    "clamp": {"min": None, "max": None},
    "one_hot": {"num_classes": -1},
    "add": {"alpha": 1},
    "sub": {"alpha": 1},
    "div": {"rounding_mode": None},
    "squeeze": {"dim": None},
}
_FIRST = ("input", "self", "tensor", "condition")


def bind(node: Node, op: str) -> tuple[Any, dict]:
    """(first tensor argument, the other arguments by name) with defaults filled in."""
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if node.op == "call_function" and node.target is F.log_softmax:
        if len(args) >= 3:
            del args[2]  # _stacklevel
        kwargs.pop("_stacklevel", None)
    if not args:
        for name in _FIRST:
            if name in kwargs:
                args = [kwargs.pop(name)]
                break
    first = args[0] if args else None
    out = dict(_DEFAULTS.get(op, {}))
    params = _PARAMS.get(op, ())
    rest = args[1:]
    if op in ("reshape",):
        out["shape"] = rest
        return first, out
    for name, value in zip(params, rest):
        out[name] = value
    for name, value in kwargs.items():
        if name == "src" and op == "scatter":
            name = "value"
        out[name] = value
    return first, out


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def fake(node) -> Optional[torch.Tensor]:
    if isinstance(node, Node):
        v = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(v, torch.Tensor):
            return v
    return None


def shape(node) -> Optional[tuple]:
    t = fake(node)
    return tuple(t.shape) if t is not None else None


def static_shape(node) -> Optional[tuple]:
    s = shape(node)
    if s is None or not all(isinstance(d, int) for d in s):
        return None
    return s


def exact(value) -> Optional[Fraction]:
    """A Python number from the graph as an exact rational (floats are dyadic rationals)."""
    if isinstance(value, bool):
        return Q(int(value))
    if isinstance(value, int):
        return Q(value)
    if isinstance(value, float) and math.isfinite(value):
        return Q(value)
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


def describe(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} at {location(node)}"


def norm_dim(dim, ndim: int) -> int:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            raise Reject(f"reduction over dims {dim}")
        dim = dim[0]
    if not isinstance(dim, int):
        raise Reject(f"dim {dim!r} is not a constant")
    if not -ndim <= dim < ndim:
        raise Reject(f"dim {dim} is out of range for {ndim} dims")
    return dim % ndim


def _implicit_softmax_dim(ndim: int) -> int:
    # torch.nn.functional._get_softmax_dim
    return 0 if ndim in (0, 1, 3) else 1


def is_int_tensor(node) -> bool:
    t = fake(node)
    return t is not None and not t.dtype.is_floating_point and t.dtype not in (torch.bool, torch.complex64, torch.complex128)


def is_bool_tensor(node) -> bool:
    t = fake(node)
    return t is not None and t.dtype == torch.bool


# ------------------------------------------------------------------------------------------------
# The interpreter
# ------------------------------------------------------------------------------------------------


class Interpretation:
    """Symbolic values of a graph's nodes (``values``) and why log-prob readers stayed opaque."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.values: dict[Node, Any] = {}
        self.why: dict[Node, str] = {}
        self.inplace: dict[Node, list[Node]] = {}  # mutated node -> the in-place ops on it
        self.changed_by: dict[Node, Node] = {}  # node -> an in-place op the algebra does not follow
        for node in graph.nodes:
            try:
                value = self._eval(node)
            except Reject as err:
                value = None
                if self._reads_logprobs(node) or op_name(node) in SEED_OPS:
                    self.why[node] = str(err)
            except Exception as err:  # an argument form no handler expected: opaque, never fatal
                value = None
                if self._reads_logprobs(node) or op_name(node) in SEED_OPS:
                    self.why[node] = f"{describe(node)} is not understood ({type(err).__name__}: {err})"
            self.values[node] = value

    # -- reading arguments ---------------------------------------------------------------------

    def _reads_logprobs(self, node: Node) -> bool:
        return any(carries_logits(self.values.get(a)) for a in node.all_input_nodes)

    def val(self, arg):
        if isinstance(arg, Node):
            return self.values.get(arg)
        q = exact(arg)
        return q  # Fraction for numbers, None otherwise

    def label(self, arg) -> Optional[LabelV]:
        v = self.val(arg) if isinstance(arg, Node) else None
        if isinstance(v, LabelV):
            return v
        if isinstance(arg, Node) and v is None and is_int_tensor(arg):
            return LabelV(arg)
        return None

    def cond(self, arg) -> Optional[CondV]:
        v = self.val(arg) if isinstance(arg, Node) else None
        if isinstance(v, CondV):
            return v
        if isinstance(arg, Node) and v is None and is_bool_tensor(arg):
            return CondV(frozenset({CondAtom.make(arg, True, None)}))
        return None

    # -- evaluation ------------------------------------------------------------------------------

    def _eval(self, node: Node):
        if node.op not in ("call_function", "call_method"):
            return None
        op = op_name(node)
        if _mutates(node) and not (node.op == "call_method" and node.target in INPLACE):
            # an in-place change the algebra does not follow (t.scatter_, t[m] = v, y.clamp_):
            # later readers of the tensor must not see its old value
            changed = node.args[0]
            old = self.values.get(changed)
            self.values[changed] = None
            self.changed_by[changed] = node
            if carries_logits(old):
                raise Reject(f"a loss value is changed in place by {describe(node)}")
            return None
        if op is None:
            return None
        handler = getattr(self, "_op_" + op, None)
        if handler is None:
            return None
        first, kw = bind(node, op)
        value = handler(node, first, kw)
        if node.op == "call_method" and node.target in INPLACE:
            if not carries_logits(self.values.get(first)):
                self.values[first] = None  # a target, label or mask changed in place: opaque from here
                self.changed_by[first] = node
                return None
            if op_name(first) not in FRESH:
                raise Reject(f"in-place {node.target} on {first.name}, which may alias other tensors")
            if value is None:
                raise Reject(f"in-place {node.target} on a loss value ({describe(node)})")
            # readers after this point see the mutated value
            self.values[first] = value
            self.inplace.setdefault(first, []).append(node)
        return value

    # log-probabilities and their pieces

    def _op_log_softmax(self, node, x, kw):
        if not isinstance(x, Node) or shape(x) is None:
            return None
        ndim = len(shape(x))
        dim = kw["dim"] if kw["dim"] is not None else _implicit_softmax_dim(ndim)
        cd = norm_dim(dim, ndim)
        dtype = kw.get("dtype")
        key = (x, cd, dtype)
        terms = {(("U",), "X"): Q(1), (("U",), "LSE"): Q(-1)}
        return ElemV(key, cd, tuple(terms.items()), seeds=frozenset({node}))

    def _op_logsumexp(self, node, x, kw):
        if not isinstance(x, Node) or shape(x) is None or "dim" not in kw:
            return None
        cd = norm_dim(kw["dim"], len(shape(x)))
        return RowV.make((x, cd, None), {("LSE",): Q(1)})

    def _op_gather(self, node, src, kw):
        v = self.val(src)
        idx = self.label(kw.get("index"))
        if idx is None or not isinstance(src, Node) or shape(src) is None:
            if carries_logits(v):
                raise Reject(f"log-probs gathered at an index that is not built from the labels ({describe(node)})")
            return None
        dim = norm_dim(kw["dim"], len(shape(src)))
        want = list(shape(src))
        want[dim] = 1
        if shape(kw["index"]) != tuple(want):
            raise Reject(f"gather index of shape {shape(kw['index'])} does not pick one class per row")
        if isinstance(v, ElemV) and v.key is not None:
            if dim != v.cd:
                raise Reject(f"log-probs over dim {v.cd} gathered along dim {dim}")
            return elem_gather(v, idx)
        if v is None and fake(src).dtype.is_floating_point and len(want) >= 2:
            # x.gather(cd, y): the logit of the label, meaningful once combined with lse(x)
            return RowV.make((src, dim, None), {("XG", idx): Q(1)})
        if v is None and fake(src).dtype.is_floating_point and len(want) == 1:
            return WeightAtV(src, idx)
        return None

    def _op_index_select(self, node, src, kw):
        idx = self.label(kw.get("index"))
        if idx is not None and self.val(src) is None and shape(src) is not None and len(shape(src)) == 1:
            return WeightAtV(src, idx)
        return None

    def _op_getitem(self, node, src, kw):
        (index,) = node.args[1:2] or (None,)
        v = self.val(src)
        if isinstance(index, Node):
            # weight[y]: a per-class vector read at the labels
            idx = self.label(index)
            if idx is not None and v is None and shape(src) is not None and len(shape(src)) == 1 \
                    and fake(src).dtype.is_floating_point:
                return WeightAtV(src, idx)
            return None
        # indexing with full slices, None, Ellipsis and 0 at size-1 dims only is a relayout
        parts = index if isinstance(index, tuple) else (index,)
        if Ellipsis not in parts and all(p is None or p == slice(None) or isinstance(p, int) for p in parts):
            dims = [p for p in parts if p is not None]
            shp = shape(src)
            if shp is not None and all(not isinstance(p, int) or (p in (0, -1) and shp[i] == 1)
                                       for i, p in enumerate(dims)):
                return self._relayout(node, src)
        elif all(p is None or p is Ellipsis or p == slice(None) for p in parts) and parts.count(Ellipsis) <= 1:
            return self._relayout(node, src)
        return None

    def _op_cross_entropy(self, node, x, kw):
        return self._class_loss(node, x, kw, "cross_entropy")

    def _op_nll_loss(self, node, lp, kw):
        v = self.val(lp)
        if not (isinstance(v, ElemV) and v.key is not None):
            return None
        if not v.is_logprob():
            raise Reject(f"nll_loss reads a value that is not plain log-probs ({describe(node)})")
        ndim = len(shape(lp))
        if ndim >= 2 and v.cd != 1:
            raise Reject(f"log_softmax over dim {v.cd}, but nll_loss reads classes along dim 1")
        x, _, dtype = v.key
        return self._class_loss(node, x, kw, "nll_loss", dtype=dtype, seeds=v.seeds)

    def _class_loss(self, node, x, kw, family, dtype=None, seeds=frozenset()):
        if not isinstance(x, Node) or shape(x) is None:
            return None
        if kw["size_average"] is not None or kw["reduce"] is not None:
            raise Reject(f"{family} uses the legacy size_average/reduce arguments")
        ndim = len(shape(x))
        if ndim < 2:
            raise Reject(f"{family} of an unbatched {ndim}-D input")
        V = shape(x)[1]
        if not isinstance(V, int):
            raise Reject(f"the class count {V} is symbolic")
        eps = exact(kw.get("label_smoothing", 0.0))
        ign = kw["ignore_index"]
        if eps is None or not isinstance(ign, int):
            raise Reject(f"{family} arguments are not constants (label_smoothing="
                         f"{kw.get('label_smoothing')!r}, ignore_index={ign!r})")
        weight = kw["weight"]
        if weight is not None and not isinstance(weight, Node):
            return None
        key = (x, 1, dtype)
        seeds = seeds | {node}
        target = kw["target"]
        reduction = kw["reduction"]
        tv = self.val(target) if isinstance(target, Node) else None
        if isinstance(target, Node) and fake(target) is not None and fake(target).dtype.is_floating_point:
            # class probabilities: loss_i = -sum_j w_j p'_ij L_ij with p' = (1 - eps) p + eps / C
            if not (isinstance(tv, ElemV) and tv.key is None) or family != "cross_entropy":
                raise Reject(f"targets are a dense input ({target.name}), not built from the labels")
            p = add(scale(tv, 1 - eps), ElemV(None, tv.cd, (((("U",), "K"), eps / V),)))
            lp = ElemV(key, 1, ((( ("U",), "X"), Q(1)), ((("U",), "LSE"), Q(-1))), seeds=seeds)
            e = elem_mul(p, lp)
            if weight is not None:
                e = elem_times_weight(e, weight)
            row = scale(elem_class_sum(e, V), Q(-1))
            row = dataclasses.replace(row, seeds=seeds | {node})
            full = static_shape(x)
            return self._reduced(row, reduction, math.prod(full) // V if full else None, {"mean": "mean"})
        lab = self.label(target)
        if lab is None:
            return None
        if lab.altered:
            lab = LabelV(target)
        a, b = 1 - eps, eps / V
        if weight is None:
            atoms = {("XG", lab): -a, ("XS",): -b, ("LSE",): a + b * V}
        else:
            atoms = {("WG", lab, weight): -a, ("WS", weight): -b}
        conds = frozenset({CondAtom(("ne", lab.base, ign))})
        row = RowV.make(key, atoms, conds, seeds)
        rows = math.prod(shape(target)) if static_shape(target) else None
        return self._reduced(row, reduction, rows, {"mean": ("mean_valid", weight)})

    @staticmethod
    def _reduced(row, reduction, rows, kinds):
        if reduction == "none":
            return row
        if reduction == "sum":
            return ScalarV(row, "sum", rows, row.seeds)
        if reduction == "mean":
            return ScalarV(row, kinds["mean"], rows, row.seeds)
        raise Reject(f"reduction={reduction!r} is not a constant 'none', 'sum' or 'mean'")

    def _op_kl_div(self, node, lp, kw):
        v = self.val(lp)
        if not (isinstance(v, ElemV) and v.key is not None):
            return None
        if not v.is_logprob():
            raise Reject(f"kl_div reads a value that is not plain log-probs ({describe(node)})")
        if kw["size_average"] is not None or kw["reduce"] is not None:
            raise Reject("kl_div uses the legacy size_average/reduce arguments")
        if kw["log_target"] is not False:
            raise Reject("kl_div with log_target=True")
        target = kw["target"]
        p = self.val(target) if isinstance(target, Node) else None
        if not (isinstance(p, ElemV) and p.key is None):
            raise Reject(f"targets are a dense input ({getattr(target, 'name', target)}), not built from the labels")
        if p.cd not in (-1, v.cd):
            raise Reject(f"kl_div target has classes along dim {p.cd}, log-probs along dim {v.cd}")
        if shape(target) != shape(lp):
            raise Reject(f"kl_div target of shape {shape(target)} broadcasts against {shape(lp)}")
        A, B = self._target_coefs(p)
        V = shape(lp)[v.cd]
        if B < 0 or A + B < 0:
            raise Reject("kl_div target has negative probabilities")

        def xlogy(t):  # t log t with 0 log 0 = 0, as kl_div computes it
            return float(t) * math.log(float(t)) if t > 0 else 0.0

        # sum_j p_j log p_j: the label's class holds A + B, the other V - 1 classes hold B
        c = xlogy(A + B) + (V - 1) * xlogy(B)
        row = scale(elem_class_sum(elem_mul(p, v), V), Q(-1))
        row = RowV.make(row.key, {**row.adict, ("K",): row.adict.get(("K",), 0) + Q(c)}, row.conds,
                        v.seeds | {node})
        reduction = kw["reduction"]
        full = static_shape(lp)
        rows = math.prod(full) // V if full else None
        if reduction == "sum":
            return ScalarV(row, "sum", rows, row.seeds)
        if reduction == "mean":  # over all N * V elements = mean over rows of row / V
            return ScalarV(scale(row, Q(1, V)), "mean", rows, row.seeds)
        if reduction == "batchmean":  # sum / input.size(0)
            if len(shape(lp)) == 2:
                return ScalarV(row, "mean", rows, row.seeds)
            n0 = shape(lp)[0]
            if not isinstance(n0, int):
                raise Reject("kl_div batchmean with a symbolic batch size")
            return ScalarV(scale(row, Q(1, n0)), "sum", rows, row.seeds)
        if reduction == "none":
            # pointwise p log p - p L; p log p is xlogy(A + B) at the label and xlogy(B) elsewhere
            labels = [tp[1] for (tp, _), _ in p.terms if tp[0] == "OH"]
            plogp = {(("U",), "K"): Q(xlogy(B))}
            if labels:
                plogp[(("OH", labels[0]), "K")] = Q(xlogy(A + B)) - Q(xlogy(B))
            pl = elem_mul(_with_cd(p, v.cd), v)
            out = add(ElemV(None, v.cd, tuple(plogp.items())), pl, Q(-1))
            return dataclasses.replace(out, seeds=v.seeds | {node})
        raise Reject(f"kl_div(reduction={reduction!r}) is not a constant reduction")

    @staticmethod
    def _target_coefs(p: ElemV) -> tuple[Fraction, Fraction]:
        """p = A [j == y] + B for a target distribution, else Reject."""
        A = B = Q(0)
        labels = set()
        for (tp, base), c in p.terms:
            if base != "K" or tp[0] not in ("U", "OH"):
                raise Reject("the target distribution is not a smoothed one-hot of the labels")
            if tp[0] == "U":
                B += c
            else:
                A += c
                labels.add(tp[1])
        if len(labels) > 1 or p.conds:
            raise Reject("the target distribution mixes labels or masks")
        return A, B

    # target distributions built from the labels

    def _op_one_hot(self, node, y, kw):
        lab = self.label(y)
        n = kw["num_classes"]
        if lab is None or not isinstance(n, int) or n < 0 or shape(node) is None:
            return None
        cd = len(shape(node)) - 1
        return ElemV(None, cd, (((("OH", lab), "K"), Q(1)),))

    def _op_full_like(self, node, x, kw):
        c = exact(kw.get("fill_value"))
        if c is None or shape(node) is None or len(shape(node)) < 2:
            return None
        return ElemV(None, -1, (((("U",), "K"), c),) if c else ())

    def _op_new_full(self, node, x, kw):
        return self._op_full_like(node, x, kw)

    def _op_ones_like(self, node, x, kw):
        return self._op_full_like(node, x, {"fill_value": 1})

    def _op_zeros_like(self, node, x, kw):
        return self._op_full_like(node, x, {"fill_value": 0})

    def _op_scatter(self, node, t, kw):
        tv = self.val(t)
        value = exact(kw.get("value"))
        if not (isinstance(tv, ElemV) and tv.key is None) or value is None or kw.get("reduce") is not None:
            return None
        lab = self.label(kw["index"])
        nd = len(shape(node))
        cd = norm_dim(kw["dim"], nd)
        want = list(shape(node))
        want[cd] = 1
        if lab is None or shape(kw["index"]) != tuple(want) or tv.cd not in (-1, cd):
            return None
        # writing `value` at the label: T + (value - T[y]) [j == y]
        A, B = self._target_coefs(_with_cd(tv, cd))
        at_label = A + B
        out = dict(_with_cd(tv, cd).terms)
        for (tp, base) in list(out):
            if tp[0] == "OH" and tp[1] != lab:
                return None
        k = (("OH", lab), "K")
        out[k] = out.get(k, 0) + value - at_label
        return ElemV(None, cd, tuple((kk, vv) for kk, vv in out.items() if vv != 0))

    # arithmetic

    def _op_neg(self, node, a, kw):
        v = self.val(a)
        if isinstance(v, Fraction):
            return -v
        if carries_logits(v) or isinstance(v, ElemV):
            return scale(v, Q(-1))
        return None

    def _op_add(self, node, a, kw):
        return self._add(node, a, kw["other"], Q(1), kw.get("alpha", 1))

    def _op_sub(self, node, a, kw):
        return self._add(node, a, kw["other"], Q(-1), kw.get("alpha", 1))

    def _add(self, node, a, b, sign, alpha):
        alpha = exact(alpha)
        if alpha is None:
            return None
        s = sign * alpha
        va, vb = self.val(a), self.val(b)
        if va is None and vb is None:
            return None
        if isinstance(va, Fraction) and isinstance(vb, Fraction):
            return va + s * vb
        # x - lse(x, keepdim): log-probabilities spelled by hand
        if isinstance(vb, RowV) and vb.is_pure_lse() and va is None and isinstance(a, Node) and vb.key[0] is a:
            x, cd, _ = vb.key
            if shape(b) == _keep(shape(a), cd) and s == -1:
                terms = {(("U",), "X"): Q(1), (("U",), "LSE"): -vb.adict[("LSE",)]}
                return ElemV(vb.key, cd, tuple(terms.items()), seeds=frozenset({node}))
        if isinstance(va, Fraction) or isinstance(vb, Fraction):
            const, v, s_v = (va, vb, s) if isinstance(va, Fraction) else (s * vb, va, Q(1))
            if isinstance(v, (RowV, ElemV)):
                if isinstance(v, ElemV) and v.conds and const != 0:
                    raise Reject("a constant is added to a masked loss")
                v = scale(v, s_v)
                if isinstance(v, RowV):
                    return _plus_atom(v, ("K",), const)
                return add(v, ElemV(None, v.cd, (((("U",), "K"), const),)))
            return None
        if isinstance(va, ElemV) and isinstance(vb, ElemV):
            self._same_shape(node, a, b)
            return add(self._align(va, vb), self._align(vb, va), s)
        if isinstance(va, RowV) and isinstance(vb, RowV):
            self._same_shape(node, a, b)
            return add(va, vb, s)
        if isinstance(va, (ScalarV, ColV)) and type(va) is type(vb):
            if isinstance(va, ColV):
                self._same_shape(node, a, b)
            return add(va, vb, s)
        if isinstance(va, ElemV) and isinstance(vb, RowV) and va.key is not None:
            # a per-row value broadcast over classes (lse or a constant only)
            if shape(b) != _keep(shape(a), va.cd) or set(vb.adict) - {("LSE",), ("K",)} or vb.conds != va.conds:
                raise Reject("a per-row value is broadcast over the classes")
            d = va.tdict
            for atom, c in vb.adict.items():
                k = (("U",), "LSE" if atom == ("LSE",) else "K")
                d[k] = d.get(k, 0) + s * c
            return ElemV(va.key, va.cd, tuple((k, v) for k, v in d.items() if v != 0), va.conds, va.seeds)
        if carries_logits(va) or carries_logits(vb):
            raise Reject(f"a loss term is combined with {_what(va, a)} and {_what(vb, b)} ({describe(node)})")
        return None

    @staticmethod
    def _align(v: ElemV, other: ElemV) -> ElemV:
        return _with_cd(v, other.cd) if v.cd == -1 else v

    @staticmethod
    def _same_shape(node, a, b):
        if not (shape(a) == shape(b) == shape(node)):
            raise Reject(f"terms of shapes {shape(a)} and {shape(b)} broadcast")

    def _op_mul(self, node, a, kw):
        b = kw["other"]
        va, vb = self.val(a), self.val(b)
        if va is None and vb is None:
            return None
        if isinstance(va, Fraction) and isinstance(vb, Fraction):
            return va * vb
        # order so that the "bigger" value comes first
        rank = lambda v: 4 if isinstance(v, (ScalarV, ColV)) else 3 if isinstance(v, RowV) else \
            2 if isinstance(v, ElemV) and v.key is not None else 1 if isinstance(v, ElemV) else 0
        if rank(vb) > rank(va):
            a, b, va, vb = b, a, vb, va
        if isinstance(vb, Fraction):
            if isinstance(va, (RowV, ElemV, ScalarV, ColV)):
                return scale(va, vb)
            if isinstance(va, DivisorV):
                return DivisorV(va.node, va.factor * vb)
            if va is None and _is_scalar_tensor(a):
                return DivisorV(a, vb)
            return None
        if isinstance(va, ElemV):
            if isinstance(vb, ElemV):
                out = elem_mul(self._align(va, vb), self._align(vb, va))
                if not shape(node) == shape(a) == shape(b):
                    raise Reject(f"factors of shapes {shape(a)} and {shape(b)} broadcast")
                return out
            c = self.cond(b)
            if c is not None and va.key is not None:
                # a row mask broadcast over the classes: (N, 1) against (N, V)
                if shape(node) != shape(a) or shape(b) != _keep(shape(a), va.cd):
                    raise Reject(f"a mask of shape {shape(b)} does not select rows of {shape(a)}")
                return with_conds(va, c.atoms)
            if vb is None and isinstance(b, Node) and va.cd == len(shape(a)) - 1 and va.key is not None \
                    and shape(b) == (shape(a)[va.cd],) and fake(b).dtype.is_floating_point:
                return elem_times_weight(va, b)
            if va.key is not None:
                raise Reject(self._dense_reason(b, vb))
            return None
        if isinstance(va, RowV):
            if isinstance(vb, RowV):
                self._same_shape(node, a, b)
                return row_times_row(va, vb)
            if isinstance(vb, WeightAtV):
                self._same_shape(node, a, b)
                return row_times_weight_at(va, vb)
            c = self.cond(b)
            if c is not None:
                self._same_shape(node, a, b)
                return with_conds(va, c.atoms)
            raise Reject(self._dense_reason(b, vb, per_row=True))
        if isinstance(va, CondV) or isinstance(vb, CondV):
            ca, cb = self.cond(a), self.cond(b)
            if ca is not None and cb is not None and shape(a) == shape(b):
                return CondV(ca.atoms | cb.atoms)
            return None
        if carries_logits(va):
            raise Reject(f"the loss is multiplied by {_what(vb, b)} ({describe(node)})")
        return None

    def _dense_reason(self, b, vb, per_row=False):
        name = getattr(b, "name", repr(b))
        if b in self.changed_by:
            return f"{name} is changed in place by {describe(self.changed_by[b])}"
        if per_row:
            return f"the per-row loss is multiplied by {name}, which is not a boolean mask of rows"
        return f"targets are a dense input ({name}), not built from the labels"

    def _op_div(self, node, a, kw):
        b = kw["other"]
        if kw.get("rounding_mode") is not None:
            return None
        va, vb = self.val(a), self.val(b)
        if isinstance(va, Fraction) and isinstance(vb, Fraction) and vb != 0:
            return va / vb
        if isinstance(vb, Fraction) and vb != 0 and isinstance(va, (RowV, ElemV, ScalarV, ColV)):
            return scale(va, 1 / vb)
        if isinstance(va, ScalarV) and (isinstance(vb, DivisorV) or vb is None and _is_scalar_tensor(b)):
            # a sum divided by a count tensor (times a constant): the op's sum, then the same
            # division; terms divided by the same count may still be combined
            d = vb if isinstance(vb, DivisorV) else DivisorV(b, Q(1))
            if d.factor == 0:
                return None
            if va.kind == "mean" and va.rows is not None:
                va = ScalarV(scale(va.row, Q(1, va.rows)), "sum", va.rows, va.seeds)
            if va.kind != "sum":
                raise Reject(f"a {va.kind} reduction is divided by {b.name}")
            return ScalarV(scale(va.row, 1 / d.factor), ("div", d.node), va.rows, va.seeds)
        return None

    def _op_pow(self, node, a, kw):
        v = self.val(a)
        if isinstance(v, RowV) and exact(kw["exponent"]) == 2:
            return row_times_row(v, v)
        return None

    def _op_square(self, node, a, kw):
        v = self.val(a)
        if isinstance(v, RowV):
            return row_times_row(v, v)
        return None

    # reductions

    def _op_sum(self, node, a, kw):
        return self._reduce(node, a, kw, mean=False)

    def _op_mean(self, node, a, kw):
        return self._reduce(node, a, kw, mean=True)

    def _reduce(self, node, a, kw, mean):
        v = self.val(a)
        if isinstance(v, ColV):  # the classes left: sum (or mean) over them
            if kw["keepdim"] or kw["dim"] not in (None, 0, -1, [0], [-1], (0,), (-1,), [], ()):
                raise Reject("a per-class vector is reduced over something other than its classes")
            return scale(v.scalar, Q(1, v.classes)) if mean else v.scalar
        if not (isinstance(v, RowV) or (isinstance(v, ElemV) and v.key is not None)):
            return None
        shp = shape(a)
        nd = len(shp)
        dim = kw["dim"]
        dims = set(range(nd)) if dim is None or dim == [] or dim == () else {
            norm_dim(d, nd) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        keep = bool(kw["keepdim"])
        if isinstance(v, ElemV):
            V = shp[v.cd]
            if not isinstance(V, int):
                raise Reject(f"the class count {V} is symbolic")
            if dims == {v.cd}:
                row = elem_class_sum(v, V)
                return scale(row, Q(1, V)) if mean else row
            if dims == set(range(nd)) and not keep:
                row = elem_class_sum(v, V)
                full = static_shape(a)
                rows = math.prod(full) // V if full else None
                return ScalarV(scale(row, Q(1, V)) if mean else row, "mean" if mean else "sum", rows, row.seeds)
            if dims == set(range(nd)) - {v.cd} and not keep:
                # over the rows first, the classes later: (t * lp).mean(0).sum()
                row = elem_class_sum(v, V)
                full = static_shape(a)
                rows = math.prod(full) // V if full else None
                return ColV(ScalarV(row, "mean" if mean else "sum", rows, row.seeds), V)
            raise Reject(f"log-probs reduced over dims {sorted(dims)} (classes are dim {v.cd})")
        if dims == set(range(nd)) and not keep:
            full = static_shape(a)
            rows = math.prod(full) if full else None
            return ScalarV(v, "mean" if mean else "sum", rows, v.seeds)
        raise Reject(f"the per-row loss is reduced over dims {sorted(dims)} of {nd} only")

    # masks and labels

    def _op_ne(self, node, a, kw):
        return self._compare(node, a, kw["other"], "ne")

    def _op_eq(self, node, a, kw):
        return self._compare(node, a, kw["other"], "eq")

    def _compare(self, node, a, b, how):
        lab = self.label(a)
        k = b if isinstance(b, int) and not isinstance(b, bool) else None
        if lab is None or k is None:
            return None
        base = lab.base if not lab.altered else a
        return CondV(frozenset({CondAtom.make(node, True, (how, base, k))}))

    def _op_invert(self, node, a, kw):
        c = self.cond(a)
        return c.invert() if c is not None else None

    def _op_and(self, node, a, kw):
        ca, cb = self.cond(a), self.cond(kw["other"])
        if ca is not None and cb is not None and shape(a) == shape(kw["other"]):
            return CondV(ca.atoms | cb.atoms)
        return None

    def _op_where(self, node, c, kw):
        cond = self.cond(c)
        a, b = kw.get("input"), kw.get("other")
        va, vb = self.val(a), self.val(b)
        if cond is None:
            if carries_logits(va) or carries_logits(vb):
                raise Reject(f"torch.where on a condition that is not a boolean row mask ({describe(node)})")
            return None
        # where(c, loss, 0) keeps the rows where c holds
        for kept, v, other, vo, c_kept in ((a, va, b, vb, cond), (b, vb, a, va, None)):
            if isinstance(v, (RowV, ElemV)) and v is not None and vo == 0:
                cc = c_kept if c_kept is not None else cond.invert()
                if shape(node) != shape(kept) or shape(c) != _row_mask_shape(v, kept):
                    raise Reject("torch.where with a mask that is not one value per row")
                return with_conds(v, cc.atoms)
        # where(c, y, k): a label changed where c fails
        for kept, other, c_kept in ((a, b, cond), (b, a, None)):
            lab = self.label(kept)
            if lab is not None and isinstance(other, int) and shape(node) == shape(kept):
                cc = c_kept if c_kept is not None else cond.invert()
                if len(cc.atoms) == 1:
                    (atom,) = cc.atoms
                    return LabelV(lab.base, lab.altered | {atom.key})
        if carries_logits(va) or carries_logits(vb):
            raise Reject(f"torch.where fills masked loss rows with something other than 0 ({describe(node)})")
        return None

    def _op_masked_fill(self, node, a, kw):
        v = self.val(a)
        mask = self.cond(kw["mask"])
        value = kw["value"]
        if mask is None:
            if carries_logits(v):
                raise Reject(f"masked_fill with a mask that is not a boolean row mask ({describe(node)})")
            return None
        if isinstance(v, (RowV, ElemV)) and carries_logits(v) or isinstance(v, RowV):
            if exact(value) != 0:
                raise Reject(f"masked_fill fills loss rows with {value!r}, not 0")
            if shape(node) != shape(a) or shape(kw["mask"]) != _row_mask_shape(v, a):
                raise Reject("masked_fill with a mask that is not one value per row")
            return with_conds(v, mask.invert().atoms)
        lab = self.label(a)
        if lab is not None and isinstance(value, int) and shape(node) == shape(a):
            kept = mask.invert()
            (atom,) = kept.atoms
            return LabelV(lab.base, lab.altered | {atom.key})
        return None

    def _op_clamp(self, node, a, kw):
        lab = self.label(a)
        lo = kw.get("min")
        if lab is None or not isinstance(lo, int) or lo != 0:
            return None
        hi = kw.get("max")
        if hi is not None and not isinstance(hi, int):
            return None
        # only labels below 0 (ignored rows) change; labels >= V are invalid for the loss anyway
        return LabelV(lab.base, lab.altered | {("neg",)})

    def _op_clamp_min(self, node, a, kw):
        return self._op_clamp(node, a, {"min": kw.get("min"), "max": None})

    # relayouts and casts

    def _relayout(self, node, a):
        v = self.val(a)
        if isinstance(v, (LabelV, CondV, WeightAtV)):
            return v
        if isinstance(v, RowV):
            sa, sn = static_shape(a), static_shape(node)
            if sa is not None and sn is not None and math.prod(sa) == math.prod(sn):
                return v
            raise Reject("the per-row loss is reshaped to a different number of elements")
        if isinstance(v, ElemV) and v.key is None and shape(a) == shape(node):
            return v
        if carries_logits(v):
            raise Reject(f"log-probs are reshaped ({describe(node)})")
        if v is None and is_int_tensor(a):
            return LabelV(a)
        return None

    def _op_squeeze(self, node, a, kw):
        return self._relayout(node, a)

    def _op_unsqueeze(self, node, a, kw):
        return self._relayout(node, a)

    def _op_reshape(self, node, a, kw):
        return self._relayout(node, a)

    def _op_flatten(self, node, a, kw):
        return self._relayout(node, a)

    def _op_cast(self, node, a, kw):
        v = self.val(a)
        if node.target == "bool":
            if isinstance(v, CondV):
                return v
            return None
        if isinstance(v, (LabelV,)):
            return v if is_int_tensor(node) else None
        if isinstance(v, CondV):
            return v
        if isinstance(v, (RowV, ElemV, ScalarV)):
            # a dtype change (or .contiguous()) of a float value: the same number, rounded
            t = fake(node)
            if t is not None and t.dtype.is_floating_point and shape(node) == shape(a):
                return v
            raise Reject(f"a loss value is converted to {getattr(t, 'dtype', '?')}")
        return None

    def _op_detach(self, node, a, kw):
        v = self.val(a)
        if isinstance(v, ElemV) and v.key is None:
            return v  # a target distribution has no gradient anyway
        if carries_logits(v):
            raise Reject(f"the loss is detached ({describe(node)})")
        return None


def _mutates(node: Node) -> bool:
    """In-place Tensor methods (name ending in '_') and item assignment change their first argument."""
    if not node.args or not isinstance(node.args[0], Node):
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    return node.op == "call_function" and node.target is operator.setitem


def _is_scalar_tensor(node) -> bool:
    t = fake(node)
    return t is not None and t.numel() == 1 and t.dim() <= 1


def _row_mask_shape(v, node):
    """The shape a mask of rows must have to multiply v (per-row: the same; per-class: size 1
    along the classes, so the mask cannot differ between classes of a row)."""
    return _keep(shape(node), v.cd) if isinstance(v, ElemV) else shape(node)


def _keep(shp, cd):
    if shp is None or cd is None or cd < 0:
        return None
    out = list(shp)
    out[cd] = 1
    return tuple(out)


_WHAT = {RowV: "a per-row loss", ScalarV: "a reduced loss", ColV: "a per-class vector",
         LabelV: "labels", CondV: "a mask", WeightAtV: "w[y]", DivisorV: "a count"}


def _what(v, raw) -> str:
    """Words for a value in a near-miss reason."""
    if v is None:
        return getattr(raw, "name", repr(raw))
    if isinstance(v, ElemV):
        return "log-probs" if v.key is not None else "a target distribution"
    if isinstance(v, Fraction):
        return repr(float(v))
    return _WHAT.get(type(v), type(v).__name__)


def _with_cd(v: ElemV, cd: int) -> ElemV:
    """A target built without knowing its class dim (full_like) takes the one it is used with."""
    return dataclasses.replace(v, cd=cd)


def _plus_atom(v: RowV, atom, c) -> RowV:
    return add(v, RowV.make(v.key, {atom: c}))
