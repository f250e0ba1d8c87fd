"""Which Dynamo graph breaks separate a loss from its logits.

A break between the LM head (or whatever computes the logits) and the loss does not stop the
rewrite, but the logits then cross graphs and have to be materialised. To tell, each graph is
summarised while Dynamo hands it over, and each break Dynamo reported is joined to the graph it
ended (:class:`BreakTracker`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from smoothce.compiler.render import short_location
from smoothce.compiler.report import GraphBreak

__all__ = ["BreakTracker"]


# Ops whose first argument is the logits of a loss; used to tell which graph breaks separate a
# loss from its logits. Only names are compared, so this list needs no torch import.
_LOSS_FUNCTIONS = {"cross_entropy", "nll_loss", "log_softmax", "logsumexp", "kl_div", "softmax"}
# Ops that only view, reshape or cast: the logits pass through them unchanged in substance.
_PASS_THROUGH = {
    "view", "reshape", "flatten", "float", "to", "contiguous", "transpose", "permute", "squeeze",
    "unsqueeze", "type", "double", "half", "bfloat16", "__getitem__", "getitem", "tanh", "mul",
    "truediv", "div",
}


def _target_name(node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _source_placeholder(node):
    """The placeholder a loss's logits come from through views/casts/softcap, else None."""
    seen = 0
    while node is not None and seen < 32:
        if node.op == "placeholder":
            return node
        if node.op not in ("call_function", "call_method") or _target_name(node) not in _PASS_THROUGH:
            return None
        node = next((a for a in node.args if hasattr(a, "op")), None)
        seen += 1
    return None


def _shape(node):
    val = node.meta.get("example_value")
    shape = getattr(val, "shape", None)
    return tuple(shape) if shape is not None else None


@dataclasses.dataclass
class GraphFacts:
    """What break analysis needs from one graph, taken while Dynamo hands it over."""

    break_reason: Any  # Dynamo's GraphCompileReason (graph_break=True when a break ended it)
    output_shapes: list[tuple]
    losses_on_inputs: list[tuple[str, str, tuple]]  # (location, placeholder name, its shape)


def _location_of(node) -> str:
    # The last "File ..., line N" of the node's stack trace is the user's statement.
    trace = node.meta.get("stack_trace") or ""
    found = re.findall(r'File "([^"]+)", line (\d+)', trace)
    return f"{found[-1][0]}:{found[-1][1]}" if found else "<unknown>"


def _graph_facts(gm) -> GraphFacts:
    out_shapes = []
    losses = []
    for node in gm.graph.nodes:
        if node.op == "output":
            for arg in node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]:
                if hasattr(arg, "op") and arg.op != "placeholder" and _shape(arg):
                    out_shapes.append(_shape(arg))
        elif node.op in ("call_function", "call_method") and _target_name(node) in _LOSS_FUNCTIONS:
            first = next((a for a in node.args if hasattr(a, "op")), None)
            ph = _source_placeholder(first) if first is not None else None
            if ph is not None and _shape(ph) and len(_shape(ph)) >= 2:
                losses.append((_location_of(node), ph.target, _shape(ph)))
    return GraphFacts(getattr(gm, "compile_subgraph_reason", None), out_shapes, losses)


def _frame_of(reason) -> str:
    stack = getattr(reason, "user_stack", None) or []
    return stack[-1].name if stack else "<unknown>"


def _graph_breaks(facts: list[GraphFacts], reasons: list) -> list[GraphBreak]:
    """One GraphBreak per break Dynamo reported, in order, joined to the graph it ended."""
    ended = {id(f.break_reason): i for i, f in enumerate(facts) if f.break_reason is not None}
    breaks, seen = [], set()
    for reason in reasons:
        if not getattr(reason, "graph_break", False):
            continue
        stack = reason.user_stack or []
        location = f"{stack[-1].filename}:{stack[-1].lineno}" if stack else "<unknown>"
        i = ended.get(id(reason))
        if (location, reason.reason, i) in seen:  # Dynamo may record a break again on restart
            continue
        seen.add((location, reason.reason, i))
        splits = None
        # A loss in the next graph whose logits are a graph input shaped like one of this
        # graph's outputs: the logits were computed here and crossed the break.
        if i is not None and i + 1 < len(facts):
            for loc, name, shape in facts[i + 1].losses_on_inputs:
                if shape in facts[i].output_shapes:
                    splits = (
                        f"loss at {short_location(loc)} (graph {i + 1}) reads "
                        f"`{_local_name(name)}` from graph {i}"
                    )
                    break
        breaks.append(GraphBreak(i, location, reason.reason, splits))
    return breaks


def _dynamo_break_reasons() -> list:
    # Dynamo appends every GraphCompileReason with graph_break=True to this list (private;
    # present on 2.11 and 2.13). Without it, breaks are read from the graphs they ended.
    try:
        from torch._dynamo.utils import graph_break_reasons
    except ImportError:
        return []
    return graph_break_reasons


class BreakTracker:
    """What one trace needs to report its graph breaks: start it before the trace, hand it each
    graph as Dynamo does (:meth:`add_graph`), read :meth:`breaks` after."""

    def __init__(self) -> None:
        self._reasons = _dynamo_break_reasons()
        self._start = len(self._reasons)
        self._facts: list[GraphFacts] = []

    def add_graph(self, gm) -> str:
        """Record one graph; returns the Python function it was traced from."""
        self._facts.append(_graph_facts(gm))
        return _frame_of(self._facts[-1].break_reason)

    def breaks(self) -> list[GraphBreak]:
        # A break before anything was traced ends no graph (no backend call): only Dynamo's list
        # sees it. Breaks that list missed (it was reset meanwhile, or is not there) still show
        # from the graphs they ended.
        same_list = self._reasons is _dynamo_break_reasons()
        reasons = list(self._reasons[self._start:]) if same_list else []
        known = {id(r) for r in reasons}
        reasons += [f.break_reason for f in self._facts
                    if f.break_reason is not None and id(f.break_reason) not in known]
        return _graph_breaks(self._facts, reasons)


def _local_name(placeholder: str) -> str:
    # Dynamo names the placeholder of local `logits` L_logits_.
    m = re.fullmatch(r"L_(.+)_", placeholder)
    return m.group(1) if m else placeholder

