"""The layer that produces the logits: a linear head the loss can be fused with.

When the logits a loss reads come straight from ``F.linear(h, W, b)`` or ``h @ W.t()`` (through
the views, slices, upcasts, constant factors and softcap that :class:`algebra.Logits` absorbs)
and nothing else reads them, the loss becomes one ``fused_linear_cross_entropy`` call on the
head's input: the logits never exist. A tensor-parallel head (``ColwiseParallel``: Replicate
hidden states, a weight sharded on its classes, logits sharded on the classes) is fused the same
way, into the split head of kernels/linear_vocab_parallel.py. A loss against a distribution
becomes ``fused_linear_soft_cross_entropy``; when its target is a teacher's logits from a linear
layer that gives them no gradient (the teacher under ``torch.no_grad()``), and nothing else reads
them, that head is fused as well (:func:`find_teacher_head`): neither N x V tensor exists.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.fx

from smoothce.compat import redistributed_tensor
from smoothce.kernels.inputs import class_split, dtensor_reason, is_dtensor
from smoothce.patterns.nodes import dtype, fake, location, shape, subclass, target_name, words
from smoothce.patterns.ops import op_name

Node = torch.fx.Node

__all__ = ["Head", "head_call", "find_head", "find_teacher_head"]


@dataclasses.dataclass(frozen=True)
class Head:
    """hidden @ weight.T (+ bias), computed in ``compute_dtype`` (its output's dtype: under
    torch.autocast the autocast dtype, to which autocast casts hidden, weight and bias)."""

    node: Node  # the call that produces the logits
    hidden: Node  # (..., D)
    weight: Node  # (V, D)
    bias: Optional[Node]  # (V,)
    compute_dtype: Any

    @property
    def words(self) -> str:
        return f"the linear layer that produces the logits ({target_name(self.node)} at {location(self.node)})"


def head_call(node: Node) -> Optional[Head]:
    """The head when ``node`` is F.linear(h, W, b), h @ W.t() or h @ W.T, else None."""
    if node.op != "call_function":
        return None
    if node.target in (torch._C._nn.linear, torch.nn.functional.linear):
        args = list(node.args) + [None] * 3
        h = node.kwargs.get("input", args[0])
        w = node.kwargs.get("weight", args[1])
        b = node.kwargs.get("bias", args[2])
        if isinstance(h, Node) and isinstance(w, Node) and (b is None or isinstance(b, Node)):
            return _head(node, h, w, b)
        return None
    if node.target in (torch.matmul, operator.matmul) and len(node.args) == 2 and not node.kwargs:
        h, wt = node.args
        if not isinstance(h, Node) or not isinstance(wt, Node):
            return None
        transposed = (wt.op == "call_method" and wt.target == "t" and len(wt.args) == 1) or (
            wt.op == "call_function" and wt.target is getattr and wt.args[1:] == ("T",))
        if transposed and isinstance(wt.args[0], Node):
            return _head(node, h, wt.args[0], None)
    return None


def _head(node, h, w, b) -> Optional[Head]:
    ws = shape(w)
    if ws is None or len(ws) != 2 or shape(h) is None or shape(h)[-1] != ws[1] or dtype(node) is None:
        return None
    if b is not None and shape(b) != (ws[0],):
        return None
    return Head(node, h, w, b, dtype(node))


def replays_on_hidden(layout: tuple, classes: int) -> bool:
    """Whether the logits' views and slices can be replayed on the hidden states (last dim D)."""
    for n in layout:
        op = op_name(n)
        if op == "reshape":
            sizes = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
            if not sizes or sizes[-1] not in (classes, -1):
                return False
        elif op not in ("getitem", "squeeze", "unsqueeze", "flatten"):
            return False
    return True


def _placed_as_is(node: Node) -> Optional[Node]:
    """The input of ``node`` when it is a DTensor's redistribute to the placements it already has
    (``ColwiseParallel``'s output to Shard(-1)), else None."""
    source = redistributed_tensor(node)
    if source is None:
        return None
    before, after = fake(source), fake(node)
    if not (is_dtensor(before) and is_dtensor(after)) or before.device_mesh != after.device_mesh:
        return None
    return source if tuple(before.placements) == tuple(after.placements) else None


def _split_head_reason(head: Head, logits) -> Optional[str]:
    """Why the fused head cannot take the DTensors of ``head`` whose logits are the DTensor
    ``logits``; None when it can: the logits sharded on the classes, the weight (and bias) sharded
    like them on dim 0, the hidden states replicated (kernels/linear_vocab_parallel.py)."""
    mesh_dim, why = class_split(logits, -1)
    if mesh_dim is None:
        return why
    weight = fake(head.weight)
    if not is_dtensor(weight) or class_split(weight, 0)[0] != mesh_dim or weight.device_mesh != logits.device_mesh:
        return f"{words(head.weight)} is not a DTensor sharded like the logits' classes"
    for node, role in ((head.hidden, "the hidden states"), (head.bias, "the bias")):
        if node is None:
            continue
        t = fake(node)
        why = dtensor_reason(t, role, logits, mesh_dim) if is_dtensor(t) else f"{role} are not a DTensor"
        if why is not None:
            return why
    return None


def find_head(plan, dead: set) -> tuple[Optional[Head], Optional[str]]:
    """(the head to fuse, None), (None, why not) for a head that cannot be fused, or (None, None)
    when no linear layer produces the logits (past a redistribute that changes no placement)."""
    key = plan.logits
    source = key.source
    while _placed_as_is(source) is not None:
        source = _placed_as_is(source)
    head = head_call(source)
    if head is None:
        return None, None
    if shape(head.weight)[0] != plan.classes:
        return None, None
    if key.cd != -1:
        return None, f"not fused with {head.words}: the classes of its logits are not the last dim"
    if any(call.uniform_rows is not None for call in plan.calls):
        return None, (f"not fused with {head.words}: its smoothing term counts on other rows than its label "
                      "term, which the fused head does not take")
    if plan.group > 1:  # each loss would run the head's matmul again
        return None, f"not fused with {head.words}: its logits feed {plan.group} losses"
    if key.dtype is not None:
        return None, (f"not fused with {head.words}: its logits are upcast to "
                      f"{str(key.dtype).removeprefix('torch.')} before the loss")
    if not replays_on_hidden(key.layout, plan.classes):
        return None, f"not fused with {head.words}: its logits are reshaped in a way its input cannot follow"
    logits = fake(key.source)
    if is_dtensor(logits) and any(c.soft is not None or c.mix is not None for c in plan.calls):
        return None, f"not fused with {head.words}: a loss against a distribution has no split fused head yet"
    if is_dtensor(logits):
        why = _split_head_reason(head, logits)
        if why is not None:
            return None, f"not fused with {head.words}: {why}"
    foreign = next(((n, subclass(n)) for n in (head.hidden, head.weight, head.bias)
                    if subclass(n) and not is_dtensor(logits)), None)
    if foreign is not None:
        return None, (f"not fused with {head.words}: {words(foreign[0])} is a {foreign[1]}, a tensor subclass "
                      "the fused head has no rule for")
    if key.source not in dead:
        reader = _live_reader(key.source, dead)
        where = "returned to the caller" if reader is None or reader.op == "output" else \
            f"also read at {location(reader)} ({target_name(reader)})"
        return None, f"not fused with {head.words}: the logits are {where}"
    target = next((c.soft.dense.logits.source for c in plan.calls if c.soft is not None
                   and getattr(fake(c.soft.dense.logits.source), "requires_grad", False)), None)
    if target is not None:  # mutual learning: the fused head gives its target no gradient
        return None, (f"not fused with {head.words}: its target ({words(target)}) requires grad, and the "
                      "fused head gives the target none")
    return head, None


def find_teacher_head(dense, classes: int, dead: set) -> Optional[Head]:
    """The linear layer that produces a distillation target's logits (``dense``: algebra.Dense),
    when it can be fused with the student's head: the target is a teacher's logits straight from
    it, in its own dtype, with the classes last, read by nothing but the loss (``dead``). That
    they have no gradient, find_head has checked before it fused the student's head."""
    key = dense.logits
    head = head_call(key.source) if dense.kind == "logits" else None
    if head is None or shape(head.weight)[0] != classes or key.cd != -1 or key.dtype is not None:
        return None
    if key.source not in dead:
        return None
    if not replays_on_hidden(key.layout, classes) or any(subclass(n) for n in (head.hidden, head.weight, head.bias)):
        return None
    return head


# what logits go through on their way to a loss or to the caller
_PASS = {"cast", "contiguous", "clone", "reshape", "getitem", "squeeze", "unsqueeze", "flatten", "mul", "div", "tanh"}


def _live_reader(source: Node, dead: set) -> Optional[Node]:
    """The first reader of the logits that outlives the loss, past views, casts and scaling."""
    seen, frontier = set(), [source]
    while frontier:
        n = frontier.pop(0)
        for u in n.users:
            if u in dead or u in seen:
                continue
            seen.add(u)
            if u.op == "output" or op_name(u) not in _PASS:
                return u
            frontier.append(u)
    return None
