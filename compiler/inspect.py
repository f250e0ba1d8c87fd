"""See what smoothce would do to a model, without compiling it for real.

`inspect(model, *args)` traces the model the way torch.compile does (Dynamo, with a backend that
only records each graph and hands it back to run as traced), runs the cross-entropy detector on a
copy of every graph and returns a :class:`Report`: the losses that would be rewritten (with their
recovered parameters), the near misses and why, and the graph breaks, flagging those that put a
loss in a different graph than its logits (the fused op then still runs, but the logits have to be
materialised between graphs).

The same rendering serves the backend's logging: ``TORCH_LOGS=smoothce`` prints the table of each
rewritten graph, ``TORCH_LOGS=+smoothce`` adds the graph code before and after, and with
``TORCH_TRACE`` set the report lands in tlparse output as the ``smoothce_report`` artifact.
No log name or artifact is registered with torch: TORCH_LOGS accepts any importable module name
(torch >= 2.1), so the ``smoothce`` logger works on every supported torch without touching torch's
registry at import, and without the artifact name having to exist before ``import torch``
parses TORCH_LOGS.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
from typing import Any, Callable

from smoothce.compiler.render import Column, paragraph, short_location, table, terminal_width
from smoothce.patterns.report import Match, NearMiss, RewriteResult

__all__ = ["Report", "GraphRecord", "GraphBreak", "inspect", "log_rewrite", "rewrite_and_log"]

log = logging.getLogger(__name__)

# Detector parameters in the order a reader wants them; anything else follows alphabetically.
_PARAM_ORDER = ("eps", "ignore_index", "reduction", "weight", "z_loss", "softcap", "dtype", "dtypes")


# --------------------------------------------------------------------------------------------
# Report data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphBreak:
    """A Dynamo graph break: where, why, and whether a loss lost its logits to it."""

    graph: int | None  # index of the graph the break ended; None when nothing was traced before it
    location: str  # "file.py:42" of the statement Dynamo could not trace
    reason: str  # Dynamo's reason, verbatim
    splits_loss: str | None = None  # e.g. "loss at m.py:9 (graph 1) reads `logits` from graph 0"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GraphRecord:
    """One captured graph: its code before and after the rewrite and what the detector found."""

    index: int
    frame: str  # Python function the graph was traced from
    result: RewriteResult
    before: str = dataclasses.field(repr=False)  # readable graph code before the rewrite
    after: str = dataclasses.field(repr=False)  # ... and after (same as before when nothing matched)
    nodes_before: int
    nodes_after: int
    error: str | None = None  # the detector's exception, when it raised on this graph

    def to_dict(self, code: bool = True) -> dict[str, Any]:
        d = {
            "index": self.index,
            "frame": self.frame,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "error": self.error,
            **_jsonable(self.result.to_dict()),
        }
        if code:
            d["before"] = self.before
            d["after"] = self.after
        return d


@dataclasses.dataclass
class Report:
    """What smoothce finds in a model: `print(report)` for a table, `to_dict()` for JSON."""

    graphs: list[GraphRecord] = dataclasses.field(default_factory=list)
    graph_breaks: list[GraphBreak] = dataclasses.field(default_factory=list)

    @property
    def matches(self) -> list[Match]:
        return [m for g in self.graphs for m in g.result.matches]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [n for g in self.graphs for n in g.result.near_misses]

    @property
    def errors(self) -> list[str]:
        return [f"graph {g.index}: {g.error}" for g in self.graphs if g.error]

    def to_dict(self, code: bool = True) -> dict[str, Any]:
        """JSON-serialisable: parameters become numbers/strings, dtypes their short names."""
        return {
            "summary": {
                "graphs": len(self.graphs),
                "matches": len(self.matches),
                "near_misses": len(self.near_misses),
                "graph_breaks": len(self.graph_breaks),
                "loss_splitting_breaks": sum(b.splits_loss is not None for b in self.graph_breaks),
                "errors": len(self.errors),
            },
            "matches": [
                {"graph": g.index, **_jsonable(m.to_dict())} for g in self.graphs for m in g.result.matches
            ],
            "near_misses": [
                {"graph": g.index, **_jsonable(n.to_dict())} for g in self.graphs for n in g.result.near_misses
            ],
            "graph_breaks": [b.to_dict() for b in self.graph_breaks],
            "graphs": [g.to_dict(code=code) for g in self.graphs],
        }

    def __repr__(self) -> str:
        return (
            f"Report(matches={len(self.matches)}, near_misses={len(self.near_misses)}, "
            f"graphs={len(self.graphs)}, graph_breaks={len(self.graph_breaks)})"
        )

    def render(self, width: int | None = None, code: bool = False) -> str:
        """The report as text at most `width` columns wide (default: the terminal's)."""
        return _render(self, terminal_width() if width is None else width, code)

    def __str__(self) -> str:
        return self.render()


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _fmt_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "/".join(_fmt_value(x) for x in v)
    s = str(v)
    return s[len("torch."):] if s.startswith("torch.") else s


def format_params(params: dict[str, Any]) -> str:
    """'eps=0.1 (eps/C), ignore_index=-100, reduction=mean, ...' in a reader's order."""
    rest = dict(params)
    parts = []
    if "eps" in rest:
        eps, conv = rest.pop("eps"), rest.pop("convention", None)
        parts.append(f"eps={_fmt_value(eps)}" + (f" ({conv})" if conv else ""))
    keys = [k for k in _PARAM_ORDER if k in rest] + sorted(k for k in rest if k not in _PARAM_ORDER)
    parts.extend(f"{k}={_fmt_value(rest[k])}" for k in keys)
    return ", ".join(parts)


_RESUME = re.compile(r"torch_dynamo_resume_in_(.+)_at_(\w+)$")


def _frame_label(frame: str) -> str:
    # Dynamo names the code after a graph break torch_dynamo_resume_in_<fn>_at_<line>.
    m = _RESUME.match(frame)
    return f"{m.group(1)} (after line {m.group(2)})" if m else frame


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _section(title: str, columns: list[Column], rows: list[list[str]], width: int) -> list[str]:
    if not rows:
        return [f"{title}: none"]
    return [f"{title}:", table(columns, rows, width)]


def _loss_sections(matches: list[Match], near_misses: list[NearMiss], width: int) -> list[str]:
    rows = [
        [str(i), short_location(m.location), m.family, format_params(m.params), _plural(len(m.replaced), "node")]
        for i, m in enumerate(matches, 1)
    ]
    out = _section(
        "Rewritten losses",
        [Column("#", "fixed"), Column("location", "path", 18), Column("family", min_width=12),
         Column("parameters", min_width=20), Column("replaces", "fixed")],
        rows,
        width,
    )
    rows = [[str(i), short_location(n.location), n.node, n.reason] for i, n in enumerate(near_misses, 1)]
    out += [""] + _section(
        "Near misses",
        [Column("#", "fixed"), Column("location", "path", 18), Column("node", min_width=14),
         Column("reason", min_width=20)],
        rows,
        width,
    )
    return out


def _render(report: Report, width: int, code: bool) -> str:
    breaks = report.graph_breaks
    splitting = sum(b.splits_loss is not None for b in breaks)
    head = (
        f"smoothce: {_plural(len(report.matches), 'loss')} rewritten, "
        f"{_plural(len(report.near_misses), 'near miss')}, "
        f"{_plural(len(report.graphs), 'graph')}, {_plural(len(breaks), 'graph break')}"
        + (f" ({splitting} between a loss and its logits)" if splitting else "")
    )
    out = [paragraph(head, width), ""] + _loss_sections(report.matches, report.near_misses, width)
    if breaks:
        rows = [
            [str(i), short_location(b.location), _short_reason(b.reason), b.splits_loss or "-"]
            for i, b in enumerate(breaks, 1)
        ]
        out += [""] + _section(
            "Graph breaks",
            [Column("#", "fixed"), Column("location", "path", 18), Column("reason", min_width=20),
             Column("between a loss and its logits", min_width=16)],
            rows,
            width,
        )
    if report.graphs:
        rows = [
            [str(g.index), _frame_label(g.frame), f"{g.nodes_before} -> {g.nodes_after}",
             str(len(g.result.matches)), str(len(g.result.near_misses)), g.error or ""]
            for g in report.graphs
        ]
        cols = [Column("graph", "fixed"), Column("traced from", min_width=12), Column("nodes", "fixed"),
                Column("losses", "fixed"), Column("near misses", "fixed")]
        if any(g.error for g in report.graphs):
            cols.append(Column("detector error", min_width=20))
        else:
            rows = [r[:-1] for r in rows]
        out += [""] + _section("Graphs", cols, rows, width)
    if code:
        for g in report.graphs:
            out += ["", f"--- graph {g.index} before ---", g.before.rstrip()]
            if g.after != g.before:
                out += [f"--- graph {g.index} after ---", g.after.rstrip()]
            else:
                out += [f"--- graph {g.index} after: unchanged ---"]
    return "\n".join(out)


def _short_reason(reason: str) -> str:
    """Dynamo's first line plus its 'Explanation:' line; the hints and links stay in to_dict()."""
    lines = [l.strip() for l in reason.strip().splitlines() if l.strip()]
    if not lines:
        return "?"
    first = lines[0]
    expl = next((l[len("Explanation:"):].strip() for l in lines[1:] if l.startswith("Explanation:")), None)
    return f"{first}: {expl}" if expl else first


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return _fmt_value(v)


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


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
class _GraphFacts:
    """What break analysis needs from one graph, taken while Dynamo hands it over."""

    break_reason: Any  # Dynamo's GraphCompileReason (graph_break=True when a break ended it)
    output_shapes: list[tuple]
    losses_on_inputs: list[tuple[str, str, tuple]]  # (location, placeholder name, its shape)


def _location_of(node) -> str:
    # The last "File ..., line N" of the node's stack trace is the user's statement.
    trace = node.meta.get("stack_trace") or ""
    found = re.findall(r'File "([^"]+)", line (\d+)', trace)
    return f"{found[-1][0]}:{found[-1][1]}" if found else "<unknown>"


def _graph_facts(gm) -> _GraphFacts:
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
    return _GraphFacts(getattr(gm, "compile_subgraph_reason", None), out_shapes, losses)


def _frame_of(reason) -> str:
    stack = getattr(reason, "user_stack", None) or []
    return stack[-1].name if stack else "<unknown>"


def _graph_breaks(facts: list[_GraphFacts], reasons: list) -> list[GraphBreak]:
    """One GraphBreak per break Dynamo reported, in order, joined to the graph it ended.

    `reasons` are all break reasons Dynamo recorded during the trace: a break before anything
    was traced ends no graph (no backend call), so only that list sees it."""
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


def _break_reasons() -> list:
    # Dynamo appends every GraphCompileReason with graph_break=True to this list (private;
    # present on 2.11 and 2.13). Without it, breaks are read from the graphs they ended.
    try:
        from torch._dynamo.utils import graph_break_reasons
    except ImportError:
        return []
    return graph_break_reasons


def _local_name(placeholder: str) -> str:
    # Dynamo names the placeholder of local `logits` L_logits_.
    m = re.fullmatch(r"L_(.+)_", placeholder)
    return m.group(1) if m else placeholder


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
    """Trace `model_or_fn(*example_args, **example_kwargs)` like torch.compile and report what
    the smoothce backend would rewrite. The model runs once, as traced (no Inductor, no fused op).

    Each call compiles anew (a backend of its own), so it adds an entry to Dynamo's cache for the
    function; `torch._dynamo.reset()` clears those when inspecting the same function many times.
    """
    import torch

    rewrite_cross_entropy = _detector()
    records: list[GraphRecord] = []
    facts: list[_GraphFacts] = []

    def capture(gm, example_inputs):
        index = len(records)
        facts.append(_graph_facts(gm))
        before = _readable(gm)
        rewritten = _copy_graph_module(gm)
        error = None
        try:
            result = rewrite_cross_entropy(rewritten)
            after = _readable(rewritten)
        except Exception as e:  # a detector bug must not hide the rest of the report
            result, after, error = RewriteResult(), before, f"{type(e).__name__}: {e}"
        records.append(
            GraphRecord(index, _frame_of(facts[-1].break_reason), result, before, after,
                        _count_nodes(gm), _count_nodes(rewritten), error)
        )
        return gm.forward

    all_reasons = _break_reasons()
    start = len(all_reasons)
    torch.compile(model_or_fn, backend=capture)(*example_args, **example_kwargs)
    reasons = list(all_reasons[start:]) if all_reasons is _break_reasons() else []
    # Breaks the list missed (it was reset meanwhile, or is not there) still show from their graphs.
    known = {id(r) for r in reasons}
    reasons += [f.break_reason for f in facts if f.break_reason is not None and id(f.break_reason) not in known]
    return Report(records, _graph_breaks(facts, reasons))


# --------------------------------------------------------------------------------------------
# Logging from the backend
# --------------------------------------------------------------------------------------------


def _compile_id() -> str | None:
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # private API; the id is a nicety
        return None
    return str(cid) if cid is not None else None


def log_rewrite(gm_name: str, result: RewriteResult, before_code: str | None = None,
                after_code: str | None = None) -> None:
    """Report one backend rewrite: ``TORCH_LOGS=smoothce`` logs its table, ``+smoothce`` also
    the code before/after; with TORCH_TRACE the JSON lands in tlparse as ``smoothce_report``.
    Costs nothing beyond two checks when neither is on."""
    # torch's log format already shows the compile id ([0/0]) on every line.
    label = gm_name
    if log.isEnabledFor(logging.INFO):
        if result.matches or result.near_misses:
            text = "\n".join(_loss_sections(result.matches, result.near_misses, terminal_width()))
            log.info(
                "smoothce rewrite of %s: %s rewritten, %s\n%s", label, _plural(len(result.matches), "loss"),
                _plural(len(result.near_misses), "near miss"), text,
            )
        else:
            log.info("smoothce rewrite of %s: no cross-entropy found", label)
    if log.isEnabledFor(logging.DEBUG):
        if before_code is not None:
            log.debug("smoothce %s before:\n%s", label, before_code)
        if after_code is not None:
            log.debug("smoothce %s after:\n%s", label, after_code)
    _trace_artifact(gm_name, result, after_code)


def _trace_artifact(gm_name: str, result: RewriteResult, after_code: str | None) -> None:
    try:
        from torch._logging import trace_structured
    except ImportError:
        return
    payload = {"graph": gm_name, "compile_id": _compile_id(), **_jsonable(result.to_dict())}
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "smoothce_report", "encoding": "json"},
        payload_fn=lambda: json.dumps(payload),
    )
    if after_code is not None and result.matches:
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": "smoothce_graph_after", "encoding": "string"},
            payload_fn=lambda: after_code,
        )


def rewrite_and_log(gm, rewrite: Callable | None = None, name: str | None = None) -> RewriteResult:
    """Run the detector on `gm` in place and log the result (the backend's one-liner).

    The code before the rewrite is rendered only when ``+smoothce`` debug logging wants it."""
    if rewrite is None:
        rewrite = _detector()
    before = _readable(gm) if log.isEnabledFor(logging.DEBUG) else None
    result = rewrite(gm)
    wants_after = before is not None or (result.matches and _tracing())
    log_rewrite(name or "graph", result, before, _readable(gm) if wants_after else None)
    return result


def _tracing() -> bool:
    # TORCH_TRACE output is on when torch's structured-trace logger has a handler.
    try:
        from torch._logging._internal import trace_log
    except ImportError:
        return False
    return bool(trace_log.handlers)
