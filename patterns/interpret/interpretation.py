"""The walk: every node of a graph gets a symbolic value of :mod:`algebra`, in graph order.

A node gets a value when its operation (its name in ops.py) has a meaning in ``MEANING`` and the
values of its inputs are ones that meaning knows; otherwise it is opaque (None). When an opaque
node reads a value computed from the logits, the reason is kept (``Interpretation.why``) so a near
miss can say what stopped the match and where.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from smoothce.patterns.algebra import (
    TWO_LABELS, ArangeV, CondAtom, CondV, Dense, ElemV, LabelV, Logits, Reject, SoftmaxV, carries_logits,
    dense_target, pure_logits,
)
from smoothce.patterns.interpret import (
    arithmetic, indexing, inplace, losses, masks, reductions, softmax, targets, views_and_casts,
)
from smoothce.patterns.interpret.arguments import labels_of, numel
from smoothce.patterns.interpret.logits import trace_logits
from smoothce.patterns.nodes import (
    Structure, describe, exact, fake, is_bool, is_float, is_int, is_module_state, mutates, shape, words,
)
from smoothce.patterns.ops import SEED_OPS, bind, op_name

Node = torch.fx.Node

# An op's name (ops.py) -> the function that gives it meaning: f(interpretation, node, first tensor
# argument, the other arguments by name) -> its value, None (opaque) or raises Reject (why not).
# An in-place op (inplace.py) has the meaning of its out-of-place twin. Ops not listed are opaque.
MEANING = {
    # softmax.py: log-probabilities and the parts of a softmax
    "log_softmax": softmax.op_log_softmax, "softmax": softmax.op_softmax, "log": softmax.op_log,
    "exp": softmax.op_exp, "logsumexp": softmax.op_logsumexp,
    # losses.py: the loss functionals
    "cross_entropy": losses.op_cross_entropy, "nll_loss": losses.op_nll_loss, "kl_div": losses.op_kl_div,
    # indexing.py: reading at the labels, a class column, basic indexing
    "gather": indexing.op_gather, "take_along_dim": indexing.op_take_along_dim,
    "index_select": indexing.op_index_select, "select": indexing.op_select, "getitem": indexing.op_getitem,
    # targets.py: target distributions built from the labels
    "one_hot": targets.op_one_hot, "scatter": targets.op_scatter, "setitem": targets.op_setitem,
    "index_fill": targets.op_index_fill, "arange": targets.op_arange, "expand": targets.op_expand,
    "clone": targets.op_clone, "fill": targets.op_fill, "tensor": targets.op_tensor, "new_tensor": targets.op_tensor,
    "full": targets.op_full, "new_full": targets.op_new_full, "full_like": targets.op_full_like,
    "zeros": targets.op_zeros, "new_zeros": targets.op_new_zeros, "zeros_like": targets.op_zeros_like,
    "ones": targets.op_ones, "new_ones": targets.op_new_ones, "ones_like": targets.op_ones_like,
    # arithmetic.py: elementwise arithmetic and matmul
    "neg": arithmetic.op_neg, "add": arithmetic.op_add, "sub": arithmetic.op_sub, "mul": arithmetic.op_mul,
    "div": arithmetic.op_div, "pow": arithmetic.op_pow, "square": arithmetic.op_square,
    "matmul": arithmetic.op_matmul,
    # reductions.py
    "sum": reductions.op_sum, "mean": reductions.op_mean, "count_nonzero": reductions.op_count_nonzero,
    # masks.py: comparisons, boolean masks, where and masked_fill, label clamps
    "ne": masks.op_ne, "eq": masks.op_eq, "lt": masks.op_lt, "le": masks.op_le, "gt": masks.op_gt,
    "ge": masks.op_ge, "invert": masks.op_invert, "and": masks.op_and, "where": masks.op_where,
    "masked_fill": masks.op_masked_fill, "clamp": masks.op_clamp, "clamp_min": masks.op_clamp_min,
    # views_and_casts.py
    "reshape": views_and_casts.op_reshape, "reshape_as": views_and_casts.op_reshape_as,
    "squeeze": views_and_casts.op_squeeze, "unsqueeze": views_and_casts.op_unsqueeze,
    "flatten": views_and_casts.op_flatten, "transpose": views_and_casts.op_transpose,
    "permute": views_and_casts.op_permute, "contiguous": views_and_casts.op_contiguous,
    "cast": views_and_casts.op_cast, "detach": views_and_casts.op_detach,
}


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

    def _eval(self, node: Node):
        if node.op not in ("call_function", "call_method"):
            return None
        op = op_name(node)
        followed = inplace.is_followed(node, op)
        if mutates(node) and not followed:
            return inplace.unfollowed(self, node)
        if op is None:
            return None
        first, kw = bind(node, op)
        try:
            meaning = MEANING.get(op)
            value = meaning(self, node, first, kw) if meaning is not None else None
            if isinstance(value, ElemV):
                self._check_label_rows(node, first if followed else node)
        except (Reject, GuardOnDataDependentSymNode) as err:
            if followed and isinstance(first, Node):  # the change is not followed: no old value survives it
                inplace.opaque(self, inplace.aliases(self, first)[1], node)
            if isinstance(err, Reject):
                raise
            raise Reject(_data_dependent(node, err)) from err
        if followed:  # an in-place op: the tensor it changes takes the value (or turns opaque)
            return inplace.follow(self, node, first, value)
        return value

    def _check_label_rows(self, node: Node, out: Node):
        """A one-hot broadcast to more elements than it has (one_hot(y[:1]) * lp) repeats its
        labels over rows: they are not one label per row, as the op reads them. ``out``: the
        tensor node computes (an in-place op's is the one it changes)."""
        size = numel(shape(out))
        for a in node.all_input_nodes if size is not None else ():
            v = self.values.get(a)
            if isinstance(v, ElemV) and labels_of(v) and numel(shape(a)) != size:
                raise Reject(f"a one-hot of shape {shape(a)} is broadcast to {shape(out)} ({describe(node)}); "
                             "the op takes one label per row")

    # -- targets the interpretation lost track of ----------------------------------------------

    def _note_lost_target(self, node: Node):
        """An opaque node computed from a target distribution (or torch.arange compared with
        something): where the target turned opaque, and the label tensors it was built from."""
        at, labels = None, set()
        for a in node.all_input_nodes:
            v = self.values.get(a)
            if isinstance(v, ElemV) and v.key is None:
                at = node
                labels |= labels_of(v)
            elif isinstance(v, ArangeV) and op_name(node) in ("eq", "ne"):
                at = node
            elif a in self.lost:
                at = at or self.lost[a][0]
                labels |= self.lost[a][1]
        if at is not None:
            self.lost[node] = (at, frozenset(labels))

    def lost_reason(self, b, what: str) -> Optional[str]:
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

    def foreign_reason(self, b) -> Optional[str]:
        """Why a float tensor that the log-probs meet as a target has no value, when it comes
        from outside the graph (None otherwise), and what the user can change."""
        if not isinstance(b, Node) or not is_float(b):
            return None
        state = [i for i in self._inputs_of(b) if is_module_state(i)]
        if state:
            names = ", ".join(words(i) for i in state)
            return (f"targets are built from {names}, a module's tensor whose values the graph does not show "
                    "(filled in __init__?), not from the labels: build the target in forward from the labels "
                    "(F.one_hot, torch.full(...).scatter_) to have the loss rewritten")
        if b.op == "placeholder":
            return (f"targets are class probabilities from outside the graph ({words(b)}), not built from the labels "
                    f"(if the code builds {words(b)} from the labels before a graph break, keep both in one graph: "
                    "no print or .item() between them, or torch._dynamo.config.capture_scalar_outputs = True)")
        return None

    def _inputs_of(self, b: Node) -> list:
        """The graph inputs an opaque tensor is computed from, through other opaque nodes."""
        seen, todo, out = {b}, [b], []
        while todo:
            n = todo.pop()
            if n.op in ("placeholder", "get_attr"):
                out.append(n)
                continue
            for a in n.all_input_nodes:
                if a not in seen and self.values.get(a) is None:
                    seen.add(a)
                    todo.append(a)
        return sorted(out, key=self.order.__getitem__)

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

    def dense(self, arg, lp: ElemV, what: str) -> Optional[ElemV]:
        """``arg`` as a target distribution given as data, for the log-probs ``lp`` (None: it is
        none): a teacher's softmax (its logits are read, the softmax is taken by the op), or an
        opaque float tensor of lp's shape (probabilities). ``what`` says how the loss reads it."""
        if not isinstance(arg, Node) or lp.key is None:
            return None
        v = self.values.get(arg)
        if isinstance(v, SoftmaxV):
            if self.computed_from(v.logits.source, lp.key.source):
                raise Reject(f"{what} a softmax of the very logits it is computed from (an entropy or a "
                             "self-distillation term, not a cross-entropy against a target)")
            if v.logits.cap is not None:
                raise Reject(f"{what} the softmax of softcapped teacher logits; the op takes a temperature only")
            if v.logits.cd != lp.cd:
                raise Reject(f"{what} a softmax over another dim than the log-probs' classes")
            return dense_target(Dense("logits", v.logits), lp.cd)
        if v is not None or not is_float(arg) or arg in self.lost or arg in self.changed_by \
                or self.computed_from(arg, lp.key.source):
            return None
        return dense_target(Dense("probs", Logits(arg, cd=lp.cd)), lp.cd)

    def computed_from(self, node: Node, source: Node) -> bool:
        """Whether ``node`` is ``source`` or computed from it."""
        seen, stack = {node}, [node]
        while stack:
            n = stack.pop()
            if n is source:
                return True
            for a in n.all_input_nodes:
                if a not in seen and self.order.get(a, -1) >= self.order.get(source, 0):
                    seen.add(a)
                    stack.append(a)
        return False

    def logits(self, arg) -> Optional[ElemV]:
        """``arg`` as pure logits (see :class:`Logits`), or None when it is not an opaque float tensor."""
        if not isinstance(arg, Node) or self.values.get(arg) is not None or not is_float(arg) or not shape(arg):
            return None
        return pure_logits(trace_logits(self, arg))


def _data_dependent(node: Node, err: GuardOnDataDependentSymNode) -> str:
    """Why a node whose meaning asks about sizes that depend on the data (the row counts of two
    boolean selections, u0 == u1) has none: the answer is known only when the graph runs."""
    found = re.search(r"data-dependent expression (.+?) \(unhinted", str(err))
    question = found.group(1) if found else "a size"
    return (f"{describe(node)} reads tensors whose sizes depend on the data ({question} is not known before "
            "the graph runs); select the rows once (x[keep], y[keep]) and compute the loss on those")
