"""Abstract interpretation of a Dynamo torch-IR graph into the values of :mod:`algebra`.

Every node is visited once, in graph order. A node gets a symbolic value when its operation and
the values of its inputs have a known meaning; otherwise it is opaque (None). When an opaque node
reads a value computed from the logits, the reason is kept (``Interpretation.why``) so a near miss
can say what stopped the match and where.

In-place operations are followed where they change a fresh tensor that nothing else aliases (a
loss term masked with ``masked_fill_``, a target built with ``zeros_like(...).scatter_``): the
mutated node, and the in-place calls that returned it (``empty(...).fill_(c).scatter_(...)``),
take the new value for the readers after it. Any other in-place change makes the tensor opaque
from there on, so no value from before the change is ever used after it.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any, Optional

import torch
import torch.fx

from smoothce.patterns.algebra import (
    TWO_LABELS, U, ArangeV, ColV, CondAtom, CondV, Divisor, DivisorV, ElemV, LabelV, Logits, NotCrossEntropy, Q,
    Reject, RowV, ScalarV, SoftmaxV, WeightAtV, add, carries_logits, constant, divide, elem_class_sum,
    elem_column, elem_gather, elem_mul, elem_times_weight, kind, log_probs, pure_logits, row_times_row,
    row_times_weight_at, scale, seeds_of, static_classes, with_conds,
)
from smoothce.patterns.nodes import (
    Structure, describe, dtype, exact, fake, is_bool, is_float, is_int, location, mutates, shape,
    static_shape, words,
)
from smoothce.patterns.ops import FRESH, INPLACE, SEED_OPS, bind, op_name

Node = torch.fx.Node

_WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


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


def _from_end(dim: int, ndim: int) -> int:
    return dim - ndim


def _implicit_softmax_dim(ndim: int) -> int:
    # torch.nn.functional._get_softmax_dim
    return 0 if ndim in (0, 1, 3) else 1


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


def _is_scalar_like(node) -> bool:
    """A one-element tensor or a symbolic size: something a loss can be divided by."""
    if not isinstance(node, Node):
        return False
    t = fake(node)
    if t is not None:
        return t.numel() == 1 and t.dim() <= 1
    v = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(v, (torch.SymInt, torch.SymFloat, int, float)) and not isinstance(v, bool)


def _labels_of(target: ElemV) -> frozenset:
    """The label tensors a target distribution's one-hots read."""
    return frozenset(part[1].base for (part, _, _), _ in target.terms if part[0] in ("OH", "OHW"))


def _numel(shp):
    return None if shp is None else math.prod(shp)


def _padded(shp, ndim: int):
    """shp broadcast to ndim dims (size-1 dims in front), None when it has more."""
    if shp is None or len(shp) > ndim:
        return None
    return (1,) * (ndim - len(shp)) + tuple(shp)


def _keep(shp, cd):
    """shp with size 1 at the class dim (cd counted from the end)."""
    if shp is None or cd is None:
        return None
    out = list(shp)
    out[len(out) + cd] = 1
    return tuple(out)


class Interpretation:
    """Symbolic values of a graph's nodes (``values``) and why logit readers stayed opaque (``why``)."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.structure = Structure(graph)
        self.values: dict[Node, Any] = {}
        self.why: dict[Node, str] = {}
        self.rejected: dict[Node, Reject] = {}
        self.inplace: dict[Node, list[Node]] = {}  # mutated node -> the in-place ops followed on it
        self.changed_by: dict[Node, Node] = {}  # node -> an in-place op the algebra does not follow
        self.alias_of: dict[Node, Node] = {}  # a followed in-place op -> the tensor it changes (and returns)
        # opaque nodes computed from a target distribution: (where it turned opaque, the label tensors
        # it was built from)
        self.lost: dict[Node, tuple[Node, frozenset]] = {}
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        for node in graph.nodes:
            try:
                value = self._eval(node)
            except Reject as err:
                value = None
                if self._reads_logits(node) or op_name(node) in SEED_OPS:
                    self.why[node] = str(err)
                    self.rejected[node] = err
            self.values[node] = value
            if value is None:
                self._note_lost_target(node)

    def _note_lost_target(self, node: Node):
        """An opaque node computed from a target distribution (or torch.arange compared with
        something): where the target turned opaque, and the label tensors it was built from."""
        at, labels = None, set()
        for a in node.all_input_nodes:
            v = self.values.get(a)
            if isinstance(v, ElemV) and v.key is None:
                at = node
                labels |= _labels_of(v)
            elif isinstance(v, ArangeV) and op_name(node) in ("eq", "ne"):
                at = node
            elif a in self.lost:
                at = at or self.lost[a][0]
                labels |= self.lost[a][1]
        if at is not None:
            self.lost[node] = (at, frozenset(labels))

    def _lost_reason(self, b, what: str) -> Optional[str]:
        """Why b, a tensor built from a target distribution, has no value (None: it is not one);
        ``what`` says how the loss reads it."""
        if not isinstance(b, Node) or b not in self.lost:
            return None
        at, labels = self.lost[b]
        if len(labels) > 1:
            return TWO_LABELS
        others = [a for a in at.all_input_nodes if fake(a) is not None and a not in self.lost
                  and not isinstance(self.values.get(a), (ElemV, ArangeV))]
        met = ""
        if others and op_name(at) in ("mul", "div", "add", "sub"):
            met = f" (where it meets {', '.join(words(a) for a in others)}, a tensor and not a number)"
        return f"{what} a target distribution the detector cannot follow past {describe(at)}{met}"

    # -- reading arguments ---------------------------------------------------------------------

    def _reads_logits(self, node: Node) -> bool:
        return any(carries_logits(self.values.get(a)) for a in node.all_input_nodes)

    def val(self, arg):
        """The value of an argument: a node's symbolic value, or a Python number as a Fraction."""
        if isinstance(arg, Node):
            return self.values.get(arg)
        return exact(arg)

    def label(self, arg) -> Optional[LabelV]:
        v = self.val(arg) if isinstance(arg, Node) else None
        if isinstance(v, LabelV):
            return v
        if isinstance(arg, Node) and (v is None or isinstance(v, ArangeV)) and is_int(arg):
            return LabelV(arg, node=arg)  # any integer tensor: torch.arange(n) are the labels 0, ..., n - 1
        return None

    def cond(self, arg) -> Optional[CondV]:
        v = self.val(arg) if isinstance(arg, Node) else None
        if isinstance(v, CondV):
            return v
        if isinstance(arg, Node) and v is None and is_bool(arg):
            return CondV(frozenset({CondAtom(("node", self.structure.key(arg)), True, arg)}))
        return None

    def logits(self, arg) -> Optional[ElemV]:
        """``arg`` as pure logits (see :class:`Logits`), or None when it is not an opaque float tensor."""
        if not isinstance(arg, Node) or self.values.get(arg) is not None or not is_float(arg) or not shape(arg):
            return None
        return pure_logits(self.trace_logits(arg))

    def trace_logits(self, x: Node) -> Logits:
        """Walk back from x through what commutes with the loss's row structure: upcasts, positive
        constant factors, a softcap c * tanh(u / c), and views and slices that keep the last dim.
        Walking outward in: factors seen before a tanh scale its cap, factors after it (inside
        the tanh) scale the logits."""
        layout: list = []
        outer, inner, cap, wide = Q(1), Q(1), None, None
        n = x
        while True:
            step = self._logits_step(n)
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

    def _logits_step(self, n: Node):
        """(kind, argument, input) of one step of trace_logits, or None where the logits start."""
        if n.op not in ("call_function", "call_method") or n in self.changed_by or n in self.inplace \
                or self.values.get(n) is not None or not n.args:
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
                    and t not in self.changed_by and self.values.get(t) is None:
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
            if fi.dtype not in _WIDTH or fo.dtype not in _WIDTH or _WIDTH[fo.dtype] < _WIDTH[fi.dtype]:
                return None  # a rounding cast: the rounded tensor is what the loss reads
            # the op computes in float32 (float64 for float64 logits): a float64 upcast must be read
            return "cast", (torch.float64 if fo.dtype == torch.float64 else None), inp
        if op in ("reshape", "flatten", "squeeze", "unsqueeze", "getitem"):
            si, so = shape(inp), shape(n)
            if not si or not so or si[-1] != so[-1]:
                return None
            if op == "getitem" and not self._basic_rows_index(n.args[1], si):
                return None
            return "layout", None, inp
        return None

    @staticmethod
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

    # -- evaluation ------------------------------------------------------------------------------

    def _eval(self, node: Node):
        if node.op not in ("call_function", "call_method"):
            return None
        op = op_name(node)
        followed = op is not None and (op == "setitem" or node.op == "call_method" and node.target in INPLACE)
        if mutates(node) and not followed:
            return self._unfollowed(node)
        if op is None:
            return None
        first, kw = bind(node, op)
        try:
            if op in _FILLS:
                value = self._fill(node, first, kw, *_FILLS[op])
            else:
                handler = getattr(self, "_op_" + op, None)
                value = handler(node, first, kw) if handler is not None else None
            if isinstance(value, ElemV):
                self._check_label_rows(node, first if followed else node)
        except Reject:
            if followed and isinstance(first, Node):  # the change is not followed: no old value survives it
                self._opaque(self._aliases(first)[1], node)
            raise
        if followed:  # an in-place op: the tensor it changes takes the value (or turns opaque)
            return self._follow_inplace(node, first, value)
        return value

    def _check_label_rows(self, node: Node, out: Node):
        """A one-hot broadcast to more elements than it has (one_hot(y[:1]) * lp) repeats its
        labels over rows: they are not one label per row, as the op reads them. ``out``: the
        tensor node computes (an in-place op's is the one it changes)."""
        size = _numel(shape(out))
        for a in node.all_input_nodes if size is not None else ():
            v = self.values.get(a)
            if isinstance(v, ElemV) and _labels_of(v) and _numel(shape(a)) != size:
                raise Reject(f"a one-hot of shape {shape(a)} is broadcast to {shape(out)} ({describe(node)}); "
                             "the op takes one label per row")

    def _unfollowed(self, node: Node):
        # an in-place change the algebra does not follow (y.clamp_, t.index_put_): later readers
        # of the tensor must not see its old value
        changed = node.args[0]
        old = self.values.get(changed)
        self._opaque(self._aliases(changed)[1], node)
        if carries_logits(old):
            raise Reject(f"a loss value is changed in place by {describe(node)}")
        return None

    def _aliases(self, n: Node) -> tuple:
        """(the tensor, every node that returns it): an in-place method returns the tensor it
        changes, so t, t.fill_(c) and t.fill_(c).scatter_(...) are one tensor."""
        root = self.alias_of.get(n, n)
        return root, [root, *(m for m in self.inplace.get(root, ()) if m.op == "call_method")]

    def _opaque(self, group: list, node: Node):
        for m in group:
            old = self.values.get(m)
            if isinstance(old, ElemV) and old.key is None:  # a target lost to the change
                self.lost[m] = (node, _labels_of(old))
            self.values[m] = None
            self.changed_by[m] = node

    def _follow_inplace(self, node: Node, first, value):
        if not isinstance(first, Node):
            return None
        root, group = self._aliases(first)
        old = self.values.get(first)
        # fill_ writes every element: what the tensor held does not matter (torch.empty)
        known = carries_logits(old) or isinstance(old, ElemV) or op_name(node) == "fill" and old is None
        if not known:
            self._opaque(group, node)  # a label, mask or unknown tensor changed in place: opaque from here
            return None
        done = self.inplace.get(root, ())
        aliases = [u for m in group for u in m.users if self.order[u] < self.order[node]
                   and op_name(u) not in FRESH and u not in done]
        if op_name(root) not in FRESH or aliases:
            self._opaque(group, node)
            if carries_logits(old):
                raise Reject(f"in-place {node.target} ({describe(node)}) on {words(first)}, which may alias "
                             "other tensors")
            return None
        if value is None:
            self._opaque(group, node)
            if carries_logits(old):
                raise Reject(f"in-place {node.target} on a loss value ({describe(node)})")
            return None
        for m in group:
            self.values[m] = value  # readers after this point see the mutated value
        self.inplace.setdefault(root, []).append(node)
        self.alias_of[node] = root
        return value

    # -- logits and log-probabilities -----------------------------------------------------------

    def _class_dim(self, node, x, dim) -> int:
        ndim = len(shape(x))
        d = _implicit_softmax_dim(ndim) if dim is None else dim
        return _from_end(norm_dim(d, ndim), ndim)

    @staticmethod
    def _upcast(logits: Logits, have, to) -> Optional[Logits]:
        """The logits (in dtype ``have``) read in dtype ``to``: the same logits when that widens
        them, None when it rounds them."""
        if to is None or to == have:
            return logits
        if to not in _WIDTH or have not in _WIDTH or _WIDTH[to] < _WIDTH[have]:
            return None
        # the op computes in float32 (float64 for float64 logits): a float64 upcast must be read
        return dataclasses.replace(logits, dtype=torch.float64) if to == torch.float64 else logits

    def _op_log_softmax(self, node, x, kw, make=log_probs):
        lg = self.logits(x)
        if lg is None:
            v = self.val(x)
            if carries_logits(v):
                raise Reject(f"log_softmax of {kind(v)} ({describe(node)})")
            return None
        key = self._upcast(lg.key, dtype(x), kw.get("dtype"))
        if key is None:
            raise Reject(f"log_softmax(dtype={kw.get('dtype')}) rounds the logits ({describe(node)})")
        cd = self._class_dim(node, x, kw["dim"])
        return make(dataclasses.replace(key, cd=cd), seeds_of(lg) | {node})

    def _op_softmax(self, node, x, kw):
        return self._op_log_softmax(node, x, kw, make=lambda key, seeds: SoftmaxV(key, seeds))

    def _op_log(self, node, x, kw):
        v = self.val(x)
        if isinstance(v, SoftmaxV):  # log(softmax(x)): log-probabilities spelled in two steps
            return log_probs(v.logits, v.seeds | {node})
        if carries_logits(v):
            raise Reject(f"log of {kind(v)} ({describe(node)})")
        return None

    def _op_exp(self, node, x, kw):
        v = self.val(x)
        if carries_logits(v):
            raise NotCrossEntropy(f"exp of {kind(v)} at {location(node)}: a focal, poly or entropy term, "
                                  "not a cross-entropy; left as written")
        return None

    def _op_logsumexp(self, node, x, kw):
        lg = self.logits(x)
        if lg is None or "dim" not in kw:
            return None
        cd = self._class_dim(node, x, kw["dim"])
        return RowV.make(dataclasses.replace(lg.key, cd=cd), {("LSE",): Q(1)}, seeds=seeds_of(lg))

    # -- reading the log-probs at the labels ----------------------------------------------------

    def _at_label(self, node, src, dim, label: LabelV):
        """src gathered at the labels along dim (shape checked by the caller)."""
        v = self.val(src)
        if not isinstance(src, Node) or shape(src) is None:
            return None
        ndim = len(shape(src))
        cd = _from_end(norm_dim(dim, ndim), ndim)
        if isinstance(v, ElemV) and v.key is not None:
            if cd != v.cd:
                raise Reject(f"log-probs over dim {v.cd + ndim} are read along dim {cd + ndim}")
            return elem_gather(v, label)
        lg = self.logits(src)
        if lg is not None and ndim >= 2:
            key = dataclasses.replace(lg.key, cd=cd)
            return RowV.make(key, {("XG", label): Q(1)}, seeds=seeds_of(lg))
        if v is None and is_float(src) and ndim == 1:
            return WeightAtV(src, label)
        if carries_logits(v):
            raise Reject(f"{kind(v)} are read at the labels ({describe(node)})")
        return None

    def _op_gather(self, node, src, kw, wrap=None):
        idx = self.label(kw.get("index"))
        if idx is not None and wrap is not None:
            idx = dataclasses.replace(idx, wrap=wrap) if idx.wrap is None else None
        if idx is None or not isinstance(src, Node) or shape(src) is None:
            if carries_logits(self.val(src)):
                raise Reject(f"log-probs gathered at an index that is not built from the labels ({describe(node)})")
            return None
        dim = norm_dim(kw["dim"], len(shape(src)))
        want = list(shape(src))
        want[dim] = 1
        if shape(kw["index"]) != tuple(want) and len(want) > 1:
            raise Reject(f"gather index of shape {shape(kw['index'])} does not pick one class per row")
        return self._at_label(node, src, dim, idx)

    def _op_take_along_dim(self, node, src, kw):
        # torch.take_along_dim is gather at indices.remainder(size): no label is out of range
        if kw.get("dim") is None:
            return None
        return self._op_gather(node, src, {"dim": kw["dim"], "index": kw.get("indices")}, wrap="mod")

    def _op_index_select(self, node, src, kw):
        idx = self.label(kw.get("index"))
        if idx is not None and self.val(src) is None and shape(src) is not None and len(shape(src)) == 1 \
                and is_float(src):
            return WeightAtV(src, idx)
        return None

    def _column(self, node, src, dim, p):
        """src[..., p] along its class dim: one class column."""
        v = self.val(src)
        shp = shape(src)
        if shp is None or isinstance(p, bool) or not isinstance(p, int):
            return None
        ndim = len(shp)
        cd = _from_end(norm_dim(dim, ndim), ndim)
        V = shp[cd]
        if not isinstance(V, int) or not -V <= p < V:
            return None
        p %= V
        if isinstance(v, ElemV) and v.key is not None and v.cd == cd:
            return elem_column(v, p)
        return None

    def _op_select(self, node, src, kw):
        v = self.val(src)
        out = self._column(node, src, kw.get("dim"), kw.get("index"))
        if out is None and carries_logits(v):
            raise Reject(f"{kind(v)} are indexed ({describe(node)})")
        return out

    def _op_getitem(self, node, src, kw):
        if len(node.args) != 2:
            return None
        index = node.args[1]
        v = self.val(src)
        parts = index if isinstance(index, tuple) else (index,)
        shp = shape(src)
        # weight[y]: a per-class vector read at the labels (advanced indexing: -1 is the last class)
        if isinstance(index, Node) and shp is not None and len(shp) == 1 and v is None and is_float(src):
            idx = self.label(index)
            return WeightAtV(src, idx) if idx is not None else None  # (-1 reads the last class: checked apart)
        # lp[torch.arange(n), y], lp[arange(B)[:, None], arange(T)[None, :], y]: the label's entry of each row
        at = self._label_index(parts, shp)
        if at is not None and shape(node) == shape(parts[at[0]]):
            return self._at_label(node, src, *at)
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
                out = self._column(node, src, len(shp) - 1, parts[-1])
                if out is not None:
                    return out
        return self._slice(node, src, parts)

    def _label_index(self, parts: tuple, shp) -> Optional[tuple]:
        """(class dim, labels) of an advanced index that reads one label per row: labels of the
        rows' shape at one dim, and at each other dim torch.arange along that dim's place among
        the rows (lp[arange(n), y], lp[arange(B)[:, None], arange(T)[None, :], y])."""
        if shp is None or len(shp) < 2 or len(parts) != len(shp) or not all(isinstance(p, Node) for p in parts):
            return None
        others = [i for i, p in enumerate(parts) if not isinstance(self.values.get(p), ArangeV)]
        if len(others) > 1:
            return None
        # aranges only (lp[arange(n), arange(n)]): the labels at the last dim first
        for c in others or reversed(range(len(shp))):
            row_dims = [i for i in range(len(shp)) if i != c]
            rows = [(j, self.values[parts[i]], parts[i], shp[i]) for j, i in enumerate(row_dims)]
            lab = self.label(parts[c])
            if lab is None or lab.wrap or shape(parts[c]) != tuple(shp[i] for i in row_dims):
                continue
            if all(len(shape(p)) <= len(rows) and len(rows) + r.axis == j and r.n == n
                   and dtype(p) in (torch.int64, torch.int32) for j, r, p, n in rows):  # eager's index dtypes
                return c, dataclasses.replace(lab, wrap="neg")
        return None

    def _slice(self, node, src, parts):
        """Basic indexing: None, Ellipsis, full slices and 0 at a dim of size 1 keep the values."""
        v = self.val(src)
        if _relayout_index(parts, shape(src)):
            return self._relayout(node, src)
        if carries_logits(v):
            raise Reject(f"{kind(v)} are sliced ({describe(node)})")
        return None

    # -- losses as one call -------------------------------------------------------------------

    def _op_nll_loss(self, node, lp, kw):
        v = self.val(lp)
        if not (isinstance(v, ElemV) and v.key is not None):
            return None
        self._legacy(kw, "nll_loss")
        ndim = len(shape(lp))
        if ndim < 2:
            raise Reject(f"nll_loss of an unbatched {ndim}-D input")
        cd = _from_end(1, ndim)
        if v.cd is not None and v.cd != cd:
            raise Reject(f"log_softmax over dim {v.cd + ndim}, but nll_loss reads classes along dim 1")
        lab = self._target_label(kw["target"], "nll_loss")
        ignore, weight = self._ignore(kw, "nll_loss"), self._weight(kw)
        row = scale(elem_gather(v, lab), Q(-1))
        if weight is not None:
            row = row_times_weight_at(row, WeightAtV(weight, lab))
        conds = frozenset({self._label_ne(lab, ignore)})
        row = dataclasses.replace(with_conds(row, conds), seeds=v.seeds | {node})
        return self._reduced(row, kw["reduction"], self._mean_divisor(lab, weight, conds))

    def _op_cross_entropy(self, node, x, kw):
        lg = self.logits(x)
        if lg is None:
            v = self.val(x)
            if carries_logits(v):
                raise Reject(f"cross_entropy of {kind(v)} ({describe(node)})")
            return None
        self._legacy(kw, "cross_entropy")
        ndim = len(shape(x))
        if ndim < 2:
            raise Reject(f"cross_entropy of an unbatched {ndim}-D input")
        V = static_classes(shape(x)[1])
        eps = exact(kw.get("label_smoothing", 0.0))
        if eps is None:
            raise Reject(f"label_smoothing={kw.get('label_smoothing')!r} is not a constant")
        if eps > 1:
            raise Reject(f"label_smoothing={float(eps)!r} is above 1: F.cross_entropy raises for it")
        eps = max(eps, Q(0))  # PyTorch smooths only for label_smoothing > 0
        key = dataclasses.replace(lg.key, cd=_from_end(1, ndim))
        lp = log_probs(key, seeds_of(lg) | {node})
        weight, target = self._weight(kw), kw["target"]
        if isinstance(target, Node) and is_float(target):
            # class probabilities: loss_i = -sum_j w_j p'_ij L_ij with p' = (1 - eps) p + eps / V
            p = self.val(target)
            if not (isinstance(p, ElemV) and p.key is None):
                lost = self._lost_reason(target, "cross_entropy reads")
                if lost is not None:
                    raise Reject(lost)
                raise Reject(f"targets are class probabilities from outside the graph ({words(target)}), "
                             "not built from the labels")
            q = add(scale(p, 1 - eps), constant(eps / V, key.cd))
            e = elem_mul(q, lp)
            if weight is not None:
                e = elem_times_weight(e, weight)
            row = dataclasses.replace(scale(elem_class_sum(e, V), Q(-1)), seeds=lp.seeds)
            return self._reduced(row, kw["reduction"], Divisor(("rows",)))  # PyTorch's mean over rows
        lab = self._target_label(target, "cross_entropy")
        ignore = self._ignore(kw, "cross_entropy")
        q = add(scale(self._one_hot(lab, key.cd), 1 - eps), constant(eps / V, key.cd))
        e = elem_mul(q, lp)
        if weight is not None:
            e = elem_times_weight(e, weight)
        conds = frozenset({self._label_ne(lab, ignore)})
        row = with_conds(scale(elem_class_sum(e, V), Q(-1)), conds)
        row = dataclasses.replace(row, seeds=lp.seeds)
        return self._reduced(row, kw["reduction"], self._mean_divisor(lab, weight, conds))

    @staticmethod
    def _legacy(kw, name):
        if kw["size_average"] is not None or kw["reduce"] is not None:
            raise Reject(f"{name} uses the legacy size_average/reduce arguments")

    def _target_label(self, target, name) -> LabelV:
        lab = self.label(target)
        if lab is None:
            raise Reject(f"the {name} target {words(target)} is not a label tensor")
        return lab

    @staticmethod
    def _ignore(kw, name) -> int:
        ign = kw["ignore_index"]
        if isinstance(ign, bool) or not isinstance(ign, int):
            raise Reject(f"{name}(ignore_index={ign!r}) is not a constant")
        return ign

    @staticmethod
    def _weight(kw) -> Optional[Node]:
        w = kw.get("weight")
        if w is not None and not isinstance(w, Node):
            raise Reject(f"weight={w!r} is not a tensor")
        return w

    @staticmethod
    def _label_ne(lab: LabelV, k: int) -> CondAtom:
        """The row condition 'target != k' for a target tensor that may have been changed."""
        if lab.plain:
            return CondAtom(("ne", lab.base, k))
        return CondAtom(("ne", lab.node, k))

    @staticmethod
    def _one_hot(lab: LabelV, cd) -> ElemV:
        return ElemV(None, cd, (((("OH", lab), "K", frozenset()), Q(1)),))

    @staticmethod
    def _mean_divisor(lab: LabelV, weight, conds) -> Divisor:
        """PyTorch's mean for class-index targets: divided by the sum of w[y] over kept rows."""
        if weight is None:
            return Divisor(("count", conds))
        return Divisor(("wsum", weight, lab, conds))

    def _reduced(self, row: RowV, reduction, divisor: Divisor):
        if reduction == "none":
            return row
        if reduction == "sum":
            return ScalarV.of(row)
        if reduction == "mean":
            return ScalarV.of(row, divisor)
        raise Reject(f"reduction={reduction!r} is not a constant 'none', 'sum' or 'mean'")

    def _op_kl_div(self, node, lp, kw):
        v = self.val(lp)
        if not (isinstance(v, ElemV) and v.key is not None):
            return None
        if not v.is_logprob():
            raise Reject(f"kl_div reads a value that is not plain log-probs ({describe(node)})")
        self._legacy(kw, "kl_div")
        if kw["log_target"] is not False:
            raise Reject("kl_div with log_target=True")
        target = kw["target"]
        p = self.val(target) if isinstance(target, Node) else None
        if not (isinstance(p, ElemV) and p.key is None):
            lost = self._lost_reason(target, "kl_div reads")
            if lost is not None:
                raise Reject(lost)
            raise Reject(f"targets are class probabilities from outside the graph "
                         f"({words(target)}), not built from the labels")
        if p.cd is not None and p.cd != v.cd:
            raise Reject(f"kl_div target has classes along dim {p.cd}, log-probs along dim {v.cd} (from the end)")
        if shape(target) != shape(lp):
            raise Reject(f"kl_div target of shape {shape(target)} broadcasts against {shape(lp)}")
        A, B, lab = self._target_coefs(p)
        V = static_classes(shape(lp)[v.cd])
        if B < 0 or A + B < 0:
            raise Reject("kl_div target has negative probabilities")

        def xlogx(t):  # t log t with 0 log 0 = 0, as kl_div computes it
            return Q(float(t) * math.log(float(t))) if t > 0 else Q(0)

        seeds = v.seeds | {node}
        reduction = kw["reduction"]
        if reduction == "none":
            # pointwise p log p - p L; p log p is xlogx(A + B) at the label and xlogx(B) elsewhere
            plogp = constant(xlogx(B), v.cd)
            if lab is not None:
                plogp = add(plogp, scale(self._one_hot(lab, v.cd), xlogx(A + B) - xlogx(B)))
            out = add(plogp, elem_mul(dataclasses.replace(p, cd=v.cd), v), Q(-1))
            return dataclasses.replace(out, seeds=seeds)
        # per row: sum_j p_j log p_j - p_j L_j
        c = xlogx(A + B) + (V - 1) * xlogx(B) if lab is not None else V * xlogx(B)
        row = scale(elem_class_sum(elem_mul(dataclasses.replace(p, cd=v.cd), v), V), Q(-1))
        row = dataclasses.replace(add(row, RowV.make(row.key, {("K",): c})), seeds=seeds)
        if reduction == "sum":
            return ScalarV.of(row)
        if reduction == "mean":  # over all N * V elements
            return ScalarV.of(scale(row, Q(1, V)), Divisor(("rows",)))
        if reduction == "batchmean":  # sum / input.size(0)
            n0 = shape(lp)[0]
            if len(shape(lp)) == 2:
                return ScalarV.of(row, Divisor(("rows",)))
            if not isinstance(n0, int) or n0 == 0:
                raise Reject(f"kl_div batchmean over a batch of {n0} (not a static positive size)")
            return ScalarV.of(scale(row, Q(1, n0)))
        raise Reject(f"kl_div(reduction={reduction!r}) is not a constant reduction")

    @staticmethod
    def _target_coefs(p: ElemV):
        """p = A [j == y] + B for a target distribution: (A, B, label or None), else Reject."""
        A = B = Q(0)
        labels = set()
        for (tp, base, conds), c in p.terms:
            if base != "K" or tp[0] not in ("U", "OH") or conds:
                raise Reject("the kl_div target is not a smoothed one-hot of the labels")
            if tp == U:
                B += c
            else:
                A += c
                labels.add(tp[1])
        if len(labels) > 1:
            raise Reject(TWO_LABELS)
        return A, B, next(iter(labels), None)

    # -- target distributions built from the labels ---------------------------------------------

    def _op_one_hot(self, node, y, kw):
        lab = self.label(y)
        n = kw["num_classes"]
        if lab is None or isinstance(n, bool) or not isinstance(n, int) or n <= 0 or shape(node) is None:
            return None
        return self._one_hot(lab, -1)

    def _fill(self, node, first, kw, value, like: bool):
        """A tensor full of one number (torch.full, zeros_like, new_ones, t.fill_, ...): a
        constant, with the class dim of the tensor it is like."""
        c = exact(kw.get(value)) if isinstance(value, str) else Q(value)
        if c is None or shape(node) is None or not shape(node):
            return None
        v = self.val(first) if like and isinstance(first, Node) else None
        return constant(c, v.cd if isinstance(v, ElemV) else -1)

    def _op_arange(self, node, _, kw):
        # arange(n), arange(0, n), arange(0, n, 1) in a dtype that holds 0, ..., n - 1 exactly
        args = kw.get("shape", ())
        start = args[0] if len(args) > 1 else kw.get("start", 0)
        step = args[2] if len(args) > 2 else kw.get("step", 1)
        shp = shape(node)
        if not (args or "end" in kw) or not _is_number(start, 0) or not _is_number(step, 1) \
                or shp is None or len(shp) != 1 or dtype(node) not in _EXACT_UP_TO:
            return None
        n = shp[0]
        if dtype(node) not in (torch.int64, torch.int32) and not (isinstance(n, int) and n <= _EXACT_UP_TO[dtype(node)]):
            return None
        return ArangeV(n)

    def _op_expand(self, node, a, kw):
        # expand aligns the trailing dims: the arange stays at its dim from the end
        v = self.val(a)
        if isinstance(v, ArangeV):
            return v
        if carries_logits(v):
            raise Reject(f"{kind(v)} are expanded ({describe(node)})")
        return None

    def _op_scatter(self, node, t, kw):
        tv = self.val(t)
        value = exact(kw.get("value"))
        if kw.get("reduce") is not None or value is None or shape(node) is None:
            return None
        base = tv if isinstance(tv, ElemV) and tv.key is None else None
        if base is None:
            return None
        lab = self.label(kw.get("index"))
        nd = len(shape(node))
        cd = _from_end(norm_dim(kw["dim"], nd), nd)
        want = list(shape(node))
        want[cd] = 1
        if lab is None or shape(kw["index"]) != tuple(want) or base.cd not in (None, cd):
            return None
        return self._write_at(dataclasses.replace(base, cd=cd), self._one_hot(lab, cd), value)

    @staticmethod
    def _write_at(t: ElemV, where: ElemV, value: Fraction) -> ElemV:
        """t with ``value`` written where the 0/1 tensor ``where`` is 1: t - t * where + value * where."""
        return add(add(t, elem_mul(t, where), Q(-1)), scale(where, value))

    def _op_setitem(self, node, t, kw):
        if len(node.args) != 3:
            return None
        _, index, value = node.args
        tv, c = self.val(t), exact(value)
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
                return self._write_at(dataclasses.replace(tv, cd=-1), col, c)
        # t[arange(n), y] = c: the label's entry of each row
        at = self._label_index(parts, shp)
        if at is not None:
            cd = at[0] - len(shp)
            if tv.cd in (None, cd) or as_constant(tv) is not None:
                return self._write_at(dataclasses.replace(tv, cd=cd), self._one_hot(at[1], cd), c)
        # t[mask] = c with a row mask
        if isinstance(index, Node):
            m = self.cond(index)
            if m is not None and shape(index) == shp[:-1]:
                return add(with_conds(tv, m.invert().atoms), with_conds(constant(c, tv.cd), m.atoms))
        return None

    def _op_index_fill(self, node, t, kw):
        return None

    def _op_clone(self, node, a, kw):
        return self.val(a) if isinstance(a, Node) else None

    # -- arithmetic ------------------------------------------------------------------------------

    def _op_neg(self, node, a, kw):
        v = self.val(a)
        if isinstance(v, Fraction):
            return -v
        if isinstance(v, (RowV, ScalarV, ColV, ElemV)):
            return scale(v, Q(-1))
        if carries_logits(v):
            raise Reject(f"negated {kind(v)} ({describe(node)})")
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
        # x - logsumexp(x, keepdim=True): log-probabilities spelled by hand
        if isinstance(vb, RowV) and vb.lse_only() == 1 and s == -1:
            lg = self.logits(a)
            if lg is not None and dataclasses.replace(vb.key, cd=None) == lg.key \
                    and shape(b) == _keep(shape(a), vb.key.cd):
                return log_probs(vb.key, seeds_of(lg) | vb.seeds | {node})
        ca, cb = as_constant(va), as_constant(vb)
        if ca is not None or cb is not None:
            const, v, s_v = (ca, vb, s) if ca is not None else (s * cb, va, Q(1))
            if isinstance(v, (RowV, ElemV)) and (v.key is not None or isinstance(v, ElemV)):
                v = scale(v, s_v)
                if isinstance(v, RowV):
                    return add(v, RowV.make(v.key, {("K",): const}))
                return add(v, constant(const, v.cd))
            if isinstance(v, DivisorV):
                return self._count_complement(node, v, const, s_v)
            if carries_logits(v):
                raise Reject(f"a constant is added to {kind(v)} ({describe(node)})")
            return None
        if isinstance(va, ElemV) and isinstance(vb, ElemV):
            if va.key is not None and vb.key is not None:
                self._same_shape(node, a, b)
            return add(va, vb, s)
        if isinstance(va, RowV) and isinstance(vb, RowV):
            self._same_shape(node, a, b)
            return add(va, vb, s)
        if isinstance(va, (ScalarV, ColV)) and type(va) is type(vb):
            if isinstance(va, ColV):
                self._same_shape(node, a, b)
            return add(va, vb, s)
        for e, r, er_sign in ((va, vb, s), (vb, va, None)):
            if isinstance(e, ElemV) and isinstance(r, RowV):
                # a per-row value broadcast over the classes (lse or a constant only)
                cd = r.key.cd
                row_node, elem_node = (b, a) if e is va else (a, b)
                if e.key is not None and e.key != r.key or shape(row_node) != _keep(shape(elem_node), cd) \
                        or any(atom not in (("LSE",), ("K",)) for (atom, _), _ in r.terms):
                    raise Reject(f"a per-row value is broadcast over the classes ({describe(node)})")
                terms = {(U, "LSE" if atom == ("LSE",) else "K", conds): c for (atom, conds), c in r.terms}
                rv = ElemV(r.key, cd, tuple(terms.items()), r.seeds)
                return add(e, rv, s) if er_sign is not None else add(scale(e, s), rv)
        if carries_logits(va) or carries_logits(vb):
            raise Reject(f"{kind(va) if va is not None else words(a)} and {kind(vb) if vb is not None else words(b)} "
                         f"are added ({describe(node)})")
        return None

    @staticmethod
    def _count_complement(node, v: DivisorV, const, sign):
        """numel - mask.sum(): the count of the rows the mask does not hold on (HF's LabelSmoother);
        any other constant offset makes an opaque count."""
        d = v.divisor
        counted = d.node.args[0] if d.node is not None and d.node.args else None
        if d.key[0] == "count" and len(d.key[1]) == 1 and v.factor == 1 and sign == -1 \
                and static_shape(counted) is not None and const == math.prod(static_shape(counted)):
            (atom,) = d.key[1]
            return DivisorV(Divisor(("count", frozenset({atom.negated()})), node))
        return None

    @staticmethod
    def _same_shape(node, a, b):
        if not (shape(a) == shape(b) == shape(node)):
            raise Reject(f"terms of shapes {shape(a)} and {shape(b)} broadcast ({describe(node)})")

    def _op_mul(self, node, a, kw):
        b = kw["other"]
        va, vb = self.val(a), self.val(b)
        if va is None and vb is None:
            return None
        if isinstance(va, Fraction) and isinstance(vb, Fraction):
            return va * vb
        # order so that the "bigger" value comes first
        if _rank(vb) > _rank(va):
            a, b, va, vb = b, a, vb, va
        c = as_constant(vb)
        if c is not None and (isinstance(vb, Fraction) or isinstance(va, (RowV, ScalarV, ColV))
                              or isinstance(va, ElemV) and shape(node) == shape(a)):
            return self._times_constant(node, a, va, c)
        if isinstance(va, ElemV):
            if isinstance(vb, ElemV):
                if va.key is not None and shape(node) != shape(a):
                    raise Reject(f"factors of shapes {shape(a)} and {shape(b)} broadcast ({describe(node)})")
                return elem_mul(va, vb)
            m = self.cond(b)
            if m is not None:
                # a row mask broadcast over the classes: (N, 1) against (N, V)
                if shape(node) != shape(a) or shape(b) != _keep(shape(a), va.cd if va.cd is not None else -1):
                    raise Reject(f"a mask of shape {shape(b)} does not select rows of {shape(a)} ({describe(node)})")
                return with_conds(va, m.atoms)
            w = self._class_vector(b, shape(a), va.cd) if vb is None and va.key is not None else None
            if w is not None:
                return elem_times_weight(va, w)
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
            m = self.cond(b)
            if m is not None:
                self._same_shape(node, a, b)
                return with_conds(va, m.atoms)
            raise Reject(self._dense_reason(b, vb, per_row=True))
        if isinstance(va, CondV) or isinstance(vb, CondV):
            ca, cb = self.cond(a), self.cond(b)
            if ca is not None and cb is not None and shape(a) == shape(b):
                return CondV(ca.atoms | cb.atoms)
            return None
        if isinstance(va, DivisorV) and isinstance(vb, Fraction):
            return DivisorV(va.divisor, va.factor * vb)
        if carries_logits(va):
            raise Reject(f"{kind(va)} is multiplied by {kind(vb) if vb is not None else words(b)} ({describe(node)})")
        return None

    def _times_constant(self, node, a, va, c: Fraction):
        if isinstance(va, (RowV, ElemV, ScalarV, ColV)):
            return scale(va, c)
        if isinstance(va, DivisorV):
            return DivisorV(va.divisor, va.factor * c)
        if isinstance(va, CondV):
            return None
        if va is None and isinstance(a, Node) and _is_scalar_like(a):  # a token count times a constant
            return DivisorV(Divisor(("expr", self.structure.key(a)), a), c)
        if carries_logits(va):
            raise Reject(f"{kind(va)} multiplied by {float(c)!r} ({describe(node)})")
        return None

    def _class_vector(self, b, shp, cd) -> Optional[Node]:
        """The 1-D class-weight tensor behind b when b broadcasts along the class dim only
        (w, or w[:, None] against classes at dim 1)."""
        if not isinstance(b, Node) or not is_float(b) or shp is None or cd is None:
            return None
        sb = shape(b)
        want = tuple(1 if i != len(shp) + cd else shp[i] for i in range(len(shp)))
        if sb is None or len(sb) > len(shp) or sb != want[len(want) - len(sb):]:
            return None
        while len(shape(b)) > 1:  # back through the views that added the size-1 dims
            if op_name(b) not in ("getitem", "unsqueeze", "reshape") or not isinstance(b.args[0], Node) \
                    or self.values.get(b.args[0]) is not None or math.prod(shape(b.args[0])) != shp[cd]:
                return None
            b = b.args[0]
        return b

    def _dense_reason(self, b, vb, per_row=False):
        name = words(b)
        if isinstance(b, Node) and b in self.changed_by:
            return f"{name} is changed in place by {describe(self.changed_by[b])}"
        lost = self._lost_reason(b, "the log-probs are multiplied by")
        if not per_row and lost is not None:
            return lost
        if per_row:
            return (f"the per-row loss is multiplied by {name} ({kind(vb) if vb is not None else 'a tensor'}), "
                    "which is not a boolean mask of rows")
        if isinstance(b, Node) and fake(b) is not None and fake(b).dtype.is_floating_point \
                and b.op == "placeholder":
            return f"targets are class probabilities from outside the graph ({name}), not built from the labels"
        return f"the log-probs are multiplied by {name}, which is not built from the labels"

    def _op_div(self, node, a, kw):
        b = kw["other"]
        if kw.get("rounding_mode") is not None:
            return None
        va, vb = self.val(a), self.val(b)
        if isinstance(va, Fraction) and isinstance(vb, Fraction):
            return va / vb if vb != 0 else None
        cb = as_constant(vb)
        if cb is not None and cb != 0 and (isinstance(vb, Fraction) or not isinstance(va, ElemV)
                                           or shape(node) == shape(a)):
            return self._times_constant(node, a, va, 1 / cb)
        if isinstance(va, ScalarV):
            if isinstance(vb, DivisorV):
                return divide(va, vb)
            if vb is None and _is_scalar_like(b):
                return divide(va, DivisorV(Divisor(("expr", self.structure.key(b)), b)))
        if carries_logits(va):
            raise Reject(f"{kind(va)} is divided by {kind(vb) if vb is not None else words(b)} "
                         f"({describe(node)})")
        return None

    def _op_pow(self, node, a, kw):
        v = self.val(a)
        if isinstance(v, RowV) and exact(kw["exponent"]) == 2:
            return row_times_row(v, v)
        if carries_logits(v):
            raise NotCrossEntropy(f"{kind(v)} raised to the power {kw['exponent']!r} at {location(node)}: a "
                                  "focal or poly term, not a cross-entropy; left as written")
        return None

    def _op_square(self, node, a, kw):
        v = self.val(a)
        if isinstance(v, RowV):
            return row_times_row(v, v)
        return None

    def _op_matmul(self, node, a, kw):
        b = kw["other"]
        va, vb = self.val(a), self.val(b)
        if isinstance(va, ElemV) and va.key is not None:
            # lp @ v with a constant per-class vector v: sum_j v_j lp_ij
            if isinstance(vb, ElemV) and vb.key is None and shape(b) in ((shape(a)[-1],), (shape(a)[-1], 1)) \
                    and va.cd == -1:
                V = shape(a)[-1]
                return elem_class_sum(elem_mul(va, dataclasses.replace(vb, cd=-1)), V)
            raise Reject(f"log-probs in a matrix product ({describe(node)})")
        if carries_logits(va) or carries_logits(vb):
            raise Reject(f"{kind(va if carries_logits(va) else vb)} in a matrix product ({describe(node)})")
        return None

    # -- reductions ------------------------------------------------------------------------------

    def _op_sum(self, node, a, kw):
        return self._reduce(node, a, kw, mean=False)

    def _op_mean(self, node, a, kw):
        return self._reduce(node, a, kw, mean=True)

    def _op_count_nonzero(self, node, a, kw):
        m = self.cond(a)
        if m is not None and kw.get("dim") is None:
            return DivisorV(Divisor(("count", m.atoms), node))
        return None

    def _reduce(self, node, a, kw, mean):
        v = self.val(a)
        dim, keep = kw["dim"], bool(kw["keepdim"])
        all_dims = dim is None or dim == [] or dim == ()
        if isinstance(v, ColV):  # the classes left: sum (or mean) over them
            if keep or not (all_dims or dim in (0, -1, [0], [-1], (0,), (-1,))):
                raise Reject("a per-class vector is reduced over something other than its classes")
            return scale(v.scalar, Q(1, v.classes)) if mean else v.scalar
        m = self.cond(a) if not carries_logits(v) else None
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
                return self._all_rows(row, mean)
            if dims == set(range(nd)) - {cd} and not keep:  # over the rows first, the classes later
                return ColV(self._all_rows(elem_class_sum(v, V), mean), V)
            raise Reject(f"log-probs reduced over dims {sorted(dims)} (classes are dim {cd})")
        if dims == set(range(nd)) and not keep:
            return self._all_rows(v, mean)
        raise Reject(f"the per-row loss is reduced over dims {sorted(dims)} of {nd} only ({describe(node)})")

    @staticmethod
    def _all_rows(row: RowV, mean) -> ScalarV:
        """The sum, or the mean over all rows (a divisor of its own: it differs from PyTorch's
        mean over kept rows, and a form reads better with it than with 1 / N in its constants)."""
        return ScalarV.of(row, Divisor(("rows",)) if mean else None)

    # -- masks and labels ------------------------------------------------------------------------

    def _compare(self, node, a, b, how):
        """Label comparisons with constants, and arange == labels (a one-hot)."""
        va, vb = self.val(a), self.val(b) if isinstance(b, Node) else None
        if isinstance(va, ArangeV) or isinstance(vb, ArangeV):
            # arange == arange: the classes along the last dim first, where log-probs have them
            pairs = sorted(((r, other) for r, other in ((va, b), (vb, a)) if isinstance(r, ArangeV)),
                           key=lambda p: p[0].axis != -1)
            out = shape(node)
            for r, other in pairs:
                lab, cd = self.label(other), r.axis
                if how in ("eq", "ne") and lab is not None and not lab.wrap and out is not None \
                        and len(out) >= 2 and isinstance(r.n, int) and out[cd] == r.n \
                        and _padded(shape(other), len(out)) == _keep(out, cd):
                    # [j == y_i] with j along the arange's dim and one label per row; a label outside
                    # [0, V) matches no class
                    inrange = CondAtom(("inrange", lab.base if lab.plain else lab.node, r.n))
                    oh = ElemV(None, cd, (((("OH", lab), "K", frozenset({inrange})), Q(1)),))
                    return oh if how == "eq" else add(constant(Q(1), cd), oh, Q(-1))
            return None
        lab = self.label(a)
        k = b if isinstance(b, int) and not isinstance(b, bool) else None
        if lab is None or k is None:
            return None
        base = lab.base if lab.plain else lab.node
        atom = {"ne": (("ne", base, k), True), "eq": (("ne", base, k), False),
                "lt": (("lt", base, k), True), "ge": (("lt", base, k), False),
                "le": (("lt", base, k + 1), True), "gt": (("lt", base, k + 1), False)}[how]
        return CondV(frozenset({CondAtom(atom[0], atom[1], node)}))

    def _op_ne(self, node, a, kw):
        return self._compare(node, a, kw["other"], "ne")

    def _op_eq(self, node, a, kw):
        return self._compare(node, a, kw["other"], "eq")

    def _op_lt(self, node, a, kw):
        return self._compare(node, a, kw["other"], "lt")

    def _op_le(self, node, a, kw):
        return self._compare(node, a, kw["other"], "le")

    def _op_gt(self, node, a, kw):
        return self._compare(node, a, kw["other"], "gt")

    def _op_ge(self, node, a, kw):
        return self._compare(node, a, kw["other"], "ge")

    def _op_invert(self, node, a, kw):
        v = self.val(a)
        if isinstance(v, ElemV) and v.key is None:  # ~one_hot: 1 - one_hot
            return add(constant(Q(1), v.cd), v, Q(-1))
        c = self.cond(a)
        return c.invert() if c is not None else None

    def _op_and(self, node, a, kw):
        b = kw["other"]
        va, vb = self.val(a), self.val(b)
        if isinstance(va, ElemV) and isinstance(vb, ElemV) and va.key is None and vb.key is None:
            return elem_mul(va, vb)
        ca, cb = self.cond(a), self.cond(b)
        if ca is not None and cb is not None and shape(a) == shape(b):
            return CondV(ca.atoms | cb.atoms)
        return None

    def _op_where(self, node, c, kw):
        return self._select(node, c, kw.get("input"), kw.get("other"))

    def _op_masked_fill(self, node, a, kw):
        return self._select(node, kw["mask"], kw["value"], a)

    def _select(self, node, c, a, b):
        """torch.where(c, a, b): a where c holds, b elsewhere."""
        va, vb = self.val(a), self.val(b)
        vc = self.val(c) if isinstance(c, Node) else None
        if isinstance(vc, ElemV) and vc.key is None:
            # an elementwise 0/1 target (arange == y): b + (a - b) c
            ea, eb = self._as_elem(va, vc.cd), self._as_elem(vb, vc.cd)
            if ea is None or eb is None:
                return None
            return add(eb, elem_mul(add(ea, eb, Q(-1)), vc))
        cond = self.cond(c)
        if cond is None:
            if carries_logits(va) or carries_logits(vb):
                raise Reject(f"torch.where on a condition that is not a boolean row mask ({describe(node)})")
            return None
        # labels changed where the mask fails: where(keep, y, k)
        for kept, fill, keep in ((a, b, cond), (b, a, None)):
            lab = self.label(kept) if isinstance(kept, Node) else None
            k = fill if isinstance(fill, int) and not isinstance(fill, bool) else None
            if k is None and isinstance(fill, Node) and as_constant(self.val(fill)) is not None:
                k = int(as_constant(self.val(fill))) if as_constant(self.val(fill)).denominator == 1 else None
            if lab is not None and k is not None and shape(node) == shape(kept) and not carries_logits(self.val(kept)):
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
            _keep(shape(loss_node), loss.cd if isinstance(loss, ElemV) and loss.cd is not None else -1)
        if shape(c) != rows or shape(node) != shape(loss_node):
            raise Reject(f"a mask of shape {shape(c)} that is not one value per row ({describe(node)})")
        ta, tb = self._as_like(va, loss), self._as_like(vb, loss)
        if ta is None or tb is None:
            other = vb if ta is not None else va
            raise Reject(f"masked rows are filled with {kind(other) if other is not None else 'a tensor'}, "
                         f"not a constant ({describe(node)})")
        return add(with_conds(ta, cond.atoms), with_conds(tb, cond.invert().atoms))

    @staticmethod
    def _as_elem(v, cd) -> Optional[ElemV]:
        if isinstance(v, ElemV):
            return v
        c = as_constant(v)
        return constant(c, cd) if c is not None else None

    @staticmethod
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

    def _op_clamp(self, node, a, kw):
        lo, hi = kw.get("min"), kw.get("max")
        lab = self.label(a)
        if lab is not None and not carries_logits(self.val(a)):
            if lo == 0 and hi is None and lab.plain:
                # y.clamp(min=0): y where y >= 0, 0 elsewhere
                return LabelV(lab.base, frozenset({CondAtom(("lt", lab.base, 0), False)}), node=node)
            return None
        v = self.val(a)
        if carries_logits(v):
            raise Reject(f"{kind(v)} clamped ({describe(node)})")
        return None

    def _op_clamp_min(self, node, a, kw):
        return self._op_clamp(node, a, {"min": kw.get("min"), "max": None})

    # -- relayouts and casts -----------------------------------------------------------------------

    def _relayout(self, node, a):
        """A view or reshape: the same values in the same order."""
        v = self.val(a)
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
            return self.label(a) or self.cond(a)
        return None

    def _op_reshape(self, node, a, kw):
        return self._relayout(node, a)

    def _op_reshape_as(self, node, a, kw):
        return self._relayout(node, a)

    def _op_squeeze(self, node, a, kw):
        return self._relayout(node, a)

    def _op_unsqueeze(self, node, a, kw):
        return self._relayout(node, a)

    def _op_flatten(self, node, a, kw):
        return self._relayout(node, a)

    def _op_contiguous(self, node, a, kw):
        return self.val(a) if isinstance(a, Node) else None

    def _op_cast(self, node, a, kw):
        v = self.val(a)
        to = dtype(node)
        if isinstance(v, CondV):
            return v  # a 0/1 tensor multiplies like the mask itself
        if isinstance(v, ArangeV):  # the same numbers while the new dtype holds them
            fits = to == torch.int64 or to in _EXACT_UP_TO and isinstance(v.n, int) and v.n <= _EXACT_UP_TO[to]
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

    def _op_detach(self, node, a, kw):
        v = self.val(a)
        if isinstance(v, ElemV) and v.key is None or isinstance(v, (LabelV, CondV, DivisorV)):
            return v  # no gradient anyway
        if carries_logits(v):
            raise Reject(f"the loss is detached ({describe(node)})")
        return None


# the integers a dtype holds exactly from 0 on
_EXACT_UP_TO = {torch.int64: 2 ** 63, torch.int32: 2 ** 31, torch.int16: 2 ** 15, torch.int8: 2 ** 7,
                torch.uint8: 2 ** 8, torch.float64: 2 ** 53, torch.float32: 2 ** 24, torch.float16: 2 ** 11,
                torch.bfloat16: 2 ** 8}


def _is_number(v, k) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v == k


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


def _relayout_index(parts: tuple, shp) -> bool:
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


# full-of-one-number tensors: (the fill value or the argument holding it, like another tensor)
_FILLS = {"full": ("fill_value", False), "zeros": (0, False), "ones": (1, False), "new_full": ("fill_value", False),
          "new_zeros": (0, False), "new_ones": (1, False), "full_like": ("fill_value", True),
          "zeros_like": (0, True), "ones_like": (1, True), "fill": ("value", True)}


def _rank(v) -> int:
    if isinstance(v, (ScalarV, ColV)):
        return 5
    if isinstance(v, RowV):
        return 4
    if isinstance(v, ElemV) and v.key is not None:
        return 3
    if isinstance(v, ElemV):
        return 2
    if isinstance(v, (CondV, DivisorV, WeightAtV, LabelV)):
        return 1
    return 0
