"""See what smoothce would do to a model, without compiling it for real.

``inspect(model, *args)`` traces the model the way torch.compile does (Dynamo, with a backend that
only records each graph and hands it back to run as traced), runs the cross-entropy detector on a
copy of every graph and returns a :class:`~smoothce.compiler.report.Report`: the losses that
would be rewritten (with their parameters), the near misses and why, and the graph breaks,
flagging those that put a loss in a different graph than its logits (the fused op then still
runs, but the logits have to be materialised between graphs).
"""

from __future__ import annotations

import copy
from typing import Callable

from smoothce import compat
from smoothce.compiler.graph_breaks import BreakTracker
from smoothce.compiler.report import GraphRecord, Report
from smoothce.patterns.report import RewriteResult

__all__ = ["inspect", "Report"]


def _copy_graph_module(gm):
    # Same submodules and parameters, a graph of its own (node.meta copied shallowly, so fake
    # example values survive): the detector rewrites the copy while the original runs.
    import torch.fx

    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _readable(gm) -> str:
    return gm.print_readable(print_output=False)


def _count_nodes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def _detector() -> Callable:
    from smoothce.patterns.cross_entropy import rewrite_cross_entropy

    return rewrite_cross_entropy


def inspect(model_or_fn: Callable, *example_args, **example_kwargs) -> Report:
    """Trace ``model_or_fn(*example_args, **example_kwargs)`` like torch.compile and report what
    the smoothce backend would rewrite. The model runs once, as traced (no Inductor, no fused op).

    Dynamo forgets the trace afterwards: calling ``inspect`` in a loop never reaches the
    recompile limit, and a later ``torch.compile`` of the same model starts as if it had not run.
    """
    import torch

    rewrite_cross_entropy = _detector()
    records: list[GraphRecord] = []
    tracker = BreakTracker()

    def capture(gm, example_inputs):
        frame = tracker.add_graph(gm)
        before = _readable(gm)
        rewritten = _copy_graph_module(gm)
        error = None
        try:
            result = rewrite_cross_entropy(rewritten)
            after = _readable(rewritten)
        except Exception as e:  # a detector bug must not hide the rest of the report
            result, after, error = RewriteResult(), before, f"{type(e).__name__}: {e}"
        records.append(GraphRecord(len(records), frame, result, before, after,
                                   _count_nodes(gm), _count_nodes(rewritten), error))
        return gm.forward

    with compat.dynamo_state_restored():
        torch.compile(model_or_fn, backend=capture, **compat.ISOLATED_COMPILE)(*example_args, **example_kwargs)
    return Report(records, tracker.breaks())
