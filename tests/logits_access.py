"""Which ops of a training step read or write a tensor of the logits' size, eager or compiled.

A step's cost on a GPU is the logits-sized tensors it moves: the floor is three accesses (the loss
reads the logits; the backward reads them again and writes their gradient). ``accesses`` lists
every op that touches such a tensor, as ``(op, reads, writes)``; views and aliases move nothing
and are left out.
"""

import operator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
# Ops that only reinterpret a tensor's storage.
VIEWS = {aten.view, aten._unsafe_view, aten.expand, aten.t, aten.transpose, aten.permute, aten.select,
         aten.slice, aten.unsqueeze, aten.squeeze, aten.detach, aten.alias, aten.as_strided, aten.unbind,
         aten.split, aten.reshape, aten.view_as, aten.expand_as}


def _packet(op):
    return getattr(op, "overloadpacket", op)


def _sizes(values) -> list[int]:
    """The number of elements of every tensor (or fake tensor) in a nest of values."""
    return [t.numel() for t in tree_leaves(values) if isinstance(t, torch.Tensor)]


def accesses(calls, size: int) -> list[tuple[str, int, int]]:
    """(op name, logits-sized inputs, logits-sized outputs) of each non-view op among ``calls``
    (``(op, input sizes, output sizes)``) that touches a tensor of ``size`` elements."""
    out = []
    for op, inputs, outputs in calls:
        if _packet(op) in VIEWS or op is operator.getitem:
            continue
        reads = sum(n == size for n in inputs)
        writes = sum(n == size for n in outputs)
        if reads or writes:
            out.append((str(_packet(op)), reads, writes))
    return out


class RecordOps(TorchDispatchMode):
    """Every op dispatched while active, forward and backward, as ``(op, inputs, outputs)``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # sizes, not the tensors: a reference kept here would change what autograd does (it
        # copies a gradient someone else holds instead of taking it)
        self.calls.append((func, _sizes((args, kwargs)), _sizes(out)))
        return out


def graph_calls(gm_or_graph) -> list:
    """``(op, input sizes, output sizes)`` of an FX graph's call_function nodes, from their fake values."""
    graph = getattr(gm_or_graph, "graph", gm_or_graph)
    return [(n.target, _sizes([a.meta.get("val") for a in n.all_input_nodes]), _sizes(n.meta.get("val")))
            for n in graph.nodes if n.op == "call_function"]
