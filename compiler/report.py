"""What smoothce found in a model, as data (:class:`Report`) and as text a reader can act on.

The report is built by :func:`smoothce.compiler.inspect.inspect`; its loss tables are also what
``TORCH_LOGS=smoothce`` prints for each graph the backend rewrites.
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from typing import Any

from smoothce.compiler.render import Column, paragraph, short_location, table, terminal_width
from smoothce.kernels.form import REDUCTIONS, LossForm, shortest
from smoothce.patterns.report import Match, NearMiss, RewriteResult

__all__ = ["Report", "GraphRecord", "GraphBreak", "loss_words", "loss_sections"]

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
            **result_dict(self.result),
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
            "matches": [{"graph": g.index, **_match_dict(m)} for g in self.graphs for m in g.result.matches],
            "near_misses": [
                {"graph": g.index, **jsonable(n.to_dict())} for g in self.graphs for n in g.result.near_misses
            ],
            "graph_breaks": [b.to_dict() for b in self.graph_breaks],
            "graphs": [g.to_dict(code=code) for g in self.graphs],
        }

    def __repr__(self) -> str:
        return (
            f"Report(matches={len(self.matches)}, near_misses={len(self.near_misses)}, "
            f"graphs={len(self.graphs)}, graph_breaks={len(self.graph_breaks)})"
        )

    def render(self, width: int | None = None, verbose: bool = False) -> str:
        """The report as text at most ``width`` columns wide (default: the terminal's).

        ``verbose`` adds what the detector works with: the coefficients it recovered, graph node
        names and each graph's code before and after the rewrite."""
        return _render(self, terminal_width() if width is None else width, verbose)

    def __str__(self) -> str:
        return self.render()


# --------------------------------------------------------------------------------------------
# A loss in the user's words
# --------------------------------------------------------------------------------------------

_CONVENTIONS = {"all": "eps/V", "others": "eps/(V-1)"}


def _fmt_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "/".join(_fmt_value(x) for x in v)
    s = str(v)
    return s[len("torch."):] if s.startswith("torch.") else s


# Keys of a Match's flat ``params`` that restate its form or its coefficients; the rest are details
# (class weight, classes, dtypes, the head, op calls, ...).
_FORM_PARAMS = frozenset({"eps", "convention", "target_coef", "uniform_coef", "constant", "z_loss", "softcap",
                          "logit_scale", "ignore_index", "reduction"})


def _loss_parts(m: Match) -> tuple[LossForm, dict[str, Any], dict[str, float]]:
    """(the loss as the user wrote it, what else a reader may want, the kernels' coefficients)."""
    p = dict(m.params)
    details = {k: v for k, v in p.items() if k not in _FORM_PARAMS}
    coefficients = getattr(m, "coefficients", None) or {
        "a": p["target_coef"], "b": p["uniform_coef"], "c": p["constant"], "z": p["z_loss"]}
    form = getattr(m, "form", None)
    if form is None:  # a detector that reports coefficients only: the form they stand for
        reduction = p["reduction"]
        if reduction not in REDUCTIONS:  # e.g. "none then mean": a plain mean after the op
            details["reduction"] = reduction
        form = LossForm.from_coefficients(
            coefficients["a"], coefficients["b"], coefficients["c"], p["classes"], ignore_index=p["ignore_index"],
            reduction=reduction if reduction in REDUCTIONS else "none", z_loss=p["z_loss"], softcap=p["softcap"],
            logit_scale=p.get("logit_scale", 1.0),
        )
    return form, details, dict(coefficients)


def loss_words(m: Match, verbose: bool = False) -> str:
    """The loss's parameters as its author wrote them, in LossForm's words:
    'label_smoothing=0.1 (eps/V), ignore_index=-100, reduction=mean, weight=w'; op calls with
    different class weights each in brackets, joined by '+'. ``verbose`` adds the detector's
    details (classes, dtype, ...) and the coefficients the kernels use."""
    form, details, coefficients = _loss_parts(m)
    call_forms = getattr(m, "call_forms", ())
    if call_forms:
        parts = [" + ".join(f"[{_form_words(f, w)}]" for f, w in call_forms)]
    else:
        parts = [_form_words(form, details.get("weight"))]
    target = m.params.get("target")
    if target:  # a term against a target given as data: its words, and the label part's when there is one
        labelled = any(coefficients.get(k) for k in ("a", "b"))
        parts = (parts if labelled else []) + ["target: " + _target_words(target, form)]
    mixup = m.params.get("mixup")
    if mixup:
        parts.append(f"mixup: lam={_fmt_value(mixup['lam'])} on {mixup['labels']}, 1 - lam on {mixup['labels_b']}")
    if verbose:
        parts += [f"{k}={_fmt_value(v)}" for k, v in details.items() if k != "weight"]
        parts += [f"{k}={_fmt_value(v)}" for k, v in coefficients.items()]
    return ", ".join(parts)


_TARGET_KINDS = {"probs": "probabilities", "log_probs": "log-probabilities", "logits": "teacher logits"}


def _target_words(t: dict, form: LossForm) -> str:
    """The term against a target given as data, as its author wrote it: what the target is, the
    temperatures (the student's is 1 / (logit_scale * soft_logit_scale)), the target's label
    smoothing, each divergence's weight (times T**2 at the student's temperature T where that is
    how the weight reads shortest: Hinton's factor), and the reduction."""
    parts = [f"{_TARGET_KINDS[t.get('target_kind', 'probs')]} {t['tensor']}"]
    teacher = t.get("temperature", 1.0)
    student = t.get("student_temperature", 1.0) / form.logit_scale
    if t.get("target_kind") == "logits" and teacher == student:
        parts[0] += f" at temperature {_fmt_value(teacher)}" if teacher != 1.0 else ""
    else:
        if t.get("target_kind") == "logits" and teacher != 1.0:
            parts[0] += f" at temperature {_fmt_value(teacher)}"
        if student != 1.0:
            parts.append(f"student at temperature {_fmt_value(student)}")
    if t.get("soft_label_smoothing"):
        parts.append(f"label_smoothing={_fmt_value(t['soft_label_smoothing'])} (eps/V)")
    forward, reverse = t.get("soft_scale", 1.0), t.get("reverse_kl", 0.0)
    if forward and (forward != 1.0 or reverse):
        parts.append(("KL" if t.get("soft_kl") else "cross-entropy") + " weight=" + _weight_words(forward, student))
    if reverse:
        parts.append("reverse KL weight=" + _weight_words(reverse, student))
    parts.append(f"reduction={t['reduction']}")
    return ", ".join(parts)


def _weight_words(weight: float, temperature: float) -> str:
    """'0.75 * T**2' when the weight is a short number times the square of the temperature, else
    the weight itself."""
    if temperature == 1.0:
        return _fmt_value(weight)
    per = shortest(Fraction(weight) / Fraction(temperature) ** 2)
    if len(repr(per)) > len(repr(shortest(Fraction(weight)))):
        return _fmt_value(weight)
    return "T**2" if per == 1.0 else f"{_fmt_value(per)} * T**2"


def _form_words(form: LossForm, weight: str | None) -> str:
    said = form.describe()
    parts = []
    if "label_smoothing" in said:
        said.pop("smoothing", None)  # left out when it is the default, "all"
        parts.append(f"label_smoothing={_fmt_value(said.pop('label_smoothing'))} ({_CONVENTIONS[form.smoothing]})")
    for key, value in said.items():
        text = f"{key}={_fmt_value(value)}"
        if key == "logit_scale":
            text += f" (temperature {_fmt_value(1.0 / value)})"
        parts.append(text)
    if weight is not None:
        parts.append(f"weight={_fmt_value(weight)}")
    return ", ".join(parts)


def _match_dict(m: Match) -> dict[str, Any]:
    form, details, coefficients = _loss_parts(m)
    out = {"family": m.family, "location": m.location, "form": form.describe(),
           "details": details, "coefficients": coefficients, "replaced": list(m.replaced)}
    if getattr(m, "call_forms", ()):
        out["calls"] = [{"form": f.describe(), "weight": w} for f, w in m.call_forms]
    return jsonable(out)


def result_dict(result: RewriteResult) -> dict[str, Any]:
    """One graph's matches and near misses as JSON (what ``to_dict`` and the trace artifact hold)."""
    return {"matches": [_match_dict(m) for m in result.matches],
            "near_misses": [jsonable(n.to_dict()) for n in result.near_misses]}


_RESUME = re.compile(r"torch_dynamo_resume_in_(.+)_at_(\w+)$")


def _frame_label(frame: str) -> str:
    # Dynamo names the code after a graph break torch_dynamo_resume_in_<fn>_at_<line>.
    m = _RESUME.match(frame)
    return f"{m.group(1)} (after line {m.group(2)})" if m else frame


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _section(title: str, columns: list[Column], rows: list[list[str]], width: int) -> list[str]:
    if not rows:
        return [f"{title}: none"]
    return [f"{title}:", table(columns, rows, width)]


def loss_sections(matches: list[Match], near_misses: list[NearMiss], width: int,
                  verbose: bool = False) -> list[str]:
    """The 'Rewritten losses' and 'Near misses' tables."""
    # Graph node names and counts only mean something next to the graph's code: verbose.
    place = Column("location", "path", 18)
    rows = [[str(i), short_location(m.location), m.family, loss_words(m, verbose)]
            + ([plural(len(m.replaced), "node")] if verbose else []) for i, m in enumerate(matches, 1)]
    cols = [Column("#", "fixed"), place, Column("family", min_width=12), Column("parameters", min_width=20)]
    out = _section("Rewritten losses", cols + ([Column("replaces", "fixed")] if verbose else []), rows, width)
    rows = [[str(i), short_location(n.location)] + ([n.node] if verbose else []) + [n.reason]
            for i, n in enumerate(near_misses, 1)]
    cols = [Column("#", "fixed"), place] + ([Column("node", min_width=14)] if verbose else [])
    out += [""] + _section("Near misses", cols + [Column("reason", min_width=20)], rows, width)
    return out


def _render(report: Report, width: int, verbose: bool) -> str:
    breaks = report.graph_breaks
    splitting = sum(b.splits_loss is not None for b in breaks)
    head = (
        f"smoothce: {plural(len(report.matches), 'loss')} rewritten, "
        f"{plural(len(report.near_misses), 'near miss')}, "
        f"{plural(len(report.graphs), 'graph')}, {plural(len(breaks), 'graph break')}"
        + (f" ({splitting} between a loss and its logits)" if splitting else "")
    )
    out = [paragraph(head, width), ""] + loss_sections(report.matches, report.near_misses, width, verbose)
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
            [str(g.index), _frame_label(g.frame)] + ([f"{g.nodes_before} -> {g.nodes_after}"] if verbose else [])
            + [str(len(g.result.matches)), str(len(g.result.near_misses)), g.error or ""]
            for g in report.graphs
        ]
        cols = [Column("graph", "fixed"), Column("traced from", min_width=12)]
        cols += [Column("nodes", "fixed")] if verbose else []
        cols += [Column("losses", "fixed"), Column("near misses", "fixed")]
        if any(g.error for g in report.graphs):
            cols.append(Column("detector error", min_width=20))
        else:
            rows = [r[:-1] for r in rows]
        out += [""] + _section("Graphs", cols, rows, width)
    if verbose:
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


def jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return _fmt_value(v)

