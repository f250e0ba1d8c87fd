"""smoothce.inspect on real traces: what the report says for a plain F.cross_entropy, a hand-written
label-smoothed loss, a near miss and a graph break between logits and loss.

Goldens name source lines by the `# L:<name>` tag at the end of the line, so editing this file
does not churn them. Tracing only (no Inductor): each case costs one Dynamo trace.
"""

import dataclasses
import json
import os
import re

import expecttest
import torch
import torch.nn.functional as F

import smoothce
from smoothce.compiler.demo import smoothed_cross_entropy
from smoothce.compiler.inspect import Report
from smoothce.patterns.report import RewriteResult

_HERE = os.path.basename(__file__)
with open(__file__) as _f:
    _TAGS = {i + 1: m.group(1) for i, line in enumerate(_f) if (m := re.search(r"# L:(\w+)$", line))}


def normalize(text: str) -> str:
    """test_inspect.py:<n> -> test_inspect.py:<tag of line n>; other files' lines -> :N."""

    def sub(m):
        path, line = m.group(1), int(m.group(2))
        if os.path.basename(path) == _HERE:
            return f"{_HERE}:{_TAGS.get(line, line)}"
        return f"{os.path.basename(path)}:N"

    text = re.sub(r"([\w./-]+\.py):(\d+)", sub, text)
    # Dynamo's name for the code after a break on line n: torch_dynamo_resume_in_<fn>_at_<n>.
    return re.sub(r"(torch_dynamo_resume_in_\w+_at_)(\d+)$", lambda m: m.group(1) + _TAGS.get(int(m.group(2)), "N"), text)


def normalized(report):
    """The report with every location normalized (before rendering, so columns stay aligned)."""
    rep = dataclasses.replace
    graphs = [
        rep(
            g,
            frame=normalize(g.frame),
            result=RewriteResult(
                [rep(m, location=normalize(m.location)) for m in g.result.matches],
                [rep(n, location=normalize(n.location), reason=normalize(n.reason)) for n in g.result.near_misses],
            ),
        )
        for g in report.graphs
    ]
    breaks = [
        rep(b, location=normalize(b.location), splits_loss=b.splits_loss and normalize(b.splits_loss))
        for b in report.graph_breaks
    ]
    return Report(graphs, breaks)


def _inputs(n=6, d=8, v=16):
    torch.manual_seed(0)
    x = torch.randn(n, d)
    w = torch.randn(d, v, requires_grad=True)
    y = torch.randint(0, v, (n,))
    return x, w, y


def plain_ce(x, w, y):
    return F.cross_entropy(x @ w, y, label_smoothing=0.1, ignore_index=-1)  # L:plain


def hand_written(x, w, y):
    return smoothed_cross_entropy(x @ w, y, 0.2)


def logprobs_returned(x, w, y):
    lp = torch.log_softmax(x @ w, dim=-1)  # L:logprobs
    return F.nll_loss(lp, y), lp  # L:logprobs_nll


def break_before_loss(x, w, y):
    logits = x @ w
    torch._dynamo.graph_break()  # L:brk
    return F.cross_entropy(logits, y)  # L:brk_loss


def break_inside_loss(x, w, y):
    lp = F.log_softmax(x @ w, dim=-1)
    torch._dynamo.graph_break()  # L:brk_inside
    return F.nll_loss(lp, y)  # L:nll


def break_first(x, w, y):
    torch._dynamo.graph_break()  # L:brk_first
    return F.cross_entropy(x @ w, y)


def break_elsewhere(x, w, y):
    h = torch.tanh(x)
    torch._dynamo.graph_break()  # L:brk_other
    return F.cross_entropy(h @ w, y)


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 16)

    def forward(self, x, *, target):
        return F.cross_entropy(self.head(x), target, reduction="sum")  # L:module


class TestInspect(expecttest.TestCase):
    def render(self, report):
        return normalized(report).render(width=100)

    def test_cross_entropy_call(self):
        report = smoothce.inspect(plain_ce, *_inputs())
        self.assertExpectedInline(
            self.render(report),
            """\
smoothce: 1 loss rewritten, 0 near misses, 1 graph, 0 graph breaks

Rewritten losses:
  #  location               family         parameters                                       replaces
  1  test_inspect.py:plain  cross_entropy  eps=0.1 (eps/V), ignore_index=-1,                1 node
                                           reduction=mean, weight=none, z_loss=0,
                                           softcap=none, dtype=float32, classes=16,
                                           constant=0, target_coef=0.9,
                                           uniform_coef=0.00625

Near misses: none

Graphs:
  graph  traced from  nodes   losses  near misses
  0      plain_ce     2 -> 2  1       0""",
        )
        (g,) = report.graphs
        # The op replaces the call in the copy the detector rewrote, never in the traced graph.
        self.assertNotIn("smoothce", g.before)
        self.assertIn("smoothce", g.after)
        self.assertIn("torch.nn.functional.cross_entropy", g.before)
        self.assertNotIn("torch.nn.functional.cross_entropy", g.after)

    def test_hand_written_label_smoothing(self):
        report = smoothce.inspect(hand_written, *_inputs())
        self.assertEqual(len(report.matches), 1)
        self.assertEqual(report.matches[0].params["eps"], 0.2)
        self.assertExpectedInline(
            self.render(report),
            """\
smoothce: 1 loss rewritten, 0 near misses, 1 graph, 0 graph breaks

Rewritten losses:
  #  location   family              parameters                                              replaces
  1  demo.py:N  hand-written eps/V  eps=0.2 (eps/V), ignore_index=0, reduction=mean,        16 nodes
                                    weight=none, z_loss=0, softcap=none, dtype=float32,
                                    classes=16, constant=0, target_coef=0.8,
                                    uniform_coef=0.0125

Near misses: none

Graphs:
  graph  traced from   nodes    losses  near misses
  0      hand_written  17 -> 2  1       0""",
        )

    def test_near_miss_log_probs_returned(self):
        report = smoothce.inspect(logprobs_returned, *_inputs())
        self.assertEqual(report.matches, [])
        self.assertExpectedInline(
            self.render(report),
            """\
smoothce: 0 losses rewritten, 1 near miss, 1 graph, 0 graph breaks

Rewritten losses: none

Near misses:
  #  location                      node  reason
  1  test_inspect.py:logprobs_nll  lp    log-probs (lp, test_inspect.py:logprobs) also returned from
                                         the graph

Graphs:
  graph  traced from        nodes   losses  near misses
  0      logprobs_returned  3 -> 3  0       1""",
        )
        (g,) = report.graphs
        self.assertEqual(g.before, g.after)

    def test_graph_break_between_logits_and_loss(self):
        report = smoothce.inspect(break_before_loss, *_inputs())
        self.assertExpectedInline(
            self.render(report),
            """\
smoothce: 1 loss rewritten, 0 near misses, 2 graphs, 1 graph break (1 between a loss and its logits)

Rewritten losses:
  #  location                  family         parameters                                    replaces
  1  test_inspect.py:brk_loss  cross_entropy  eps=0, ignore_index=-100, reduction=mean,     1 node
                                              weight=none, z_loss=0, softcap=none,
                                              dtype=float32, classes=16, constant=0,
                                              target_coef=1, uniform_coef=0

Near misses: none

Graph breaks:
  #  location             reason                                between a loss and its logits
  1  test_inspect.py:brk  Call to                               loss at test_inspect.py:brk_loss
                          `torch._dynamo.graph_break()`:        (graph 1) reads `logits` from graph
                          User-inserted graph break. Message:   0
                          None

Graphs:
  graph  traced from                         nodes   losses  near misses
  0      break_before_loss                   1 -> 1  0       0
  1      break_before_loss (after line brk)  1 -> 1  1       0""",
        )
        (brk,) = report.graph_breaks
        self.assertIsNotNone(brk.splits_loss)

    def test_graph_break_between_log_softmax_and_nll(self):
        report = smoothce.inspect(break_inside_loss, *_inputs())
        (brk,) = report.graph_breaks
        self.assertEqual(normalize(brk.location), f"{_HERE}:brk_inside")
        self.assertEqual(normalize(brk.splits_loss), f"loss at {_HERE}:nll (graph 1) reads `lp` from graph 0")
        self.assertEqual(report.matches, [])
        self.assertEqual(len(report.near_misses), 1)

    def test_graph_break_not_between_logits_and_loss_is_not_flagged(self):
        report = smoothce.inspect(break_elsewhere, *_inputs())
        (brk,) = report.graph_breaks
        self.assertEqual((normalize(brk.location), brk.graph), (f"{_HERE}:brk_other", 0))
        self.assertIsNone(brk.splits_loss)
        self.assertEqual(len(report.matches), 1)

    def test_graph_break_before_anything_traced(self):
        # No graph ends at this break (nothing was traced before it): it is still reported.
        report = smoothce.inspect(break_first, *_inputs())
        (brk,) = report.graph_breaks
        self.assertEqual((normalize(brk.location), brk.graph, brk.splits_loss), (f"{_HERE}:brk_first", None, None))
        self.assertEqual(len(report.graphs), 1)
        self.assertEqual(len(report.matches), 1)

    def test_module_with_keyword_arguments(self):
        torch.manual_seed(0)
        model = TinyClassifier()
        x, y = torch.randn(4, 8), torch.randint(0, 16, (4,))
        report = smoothce.inspect(model, x, target=y)
        (m,) = report.matches
        self.assertEqual(normalize(m.location), f"{_HERE}:module")
        self.assertEqual(m.params["reduction"], "sum")
        data = json.loads(json.dumps(report.to_dict()))
        self.assertEqual(data["matches"][0]["params"]["reduction"], "sum")
        self.assertEqual(data["summary"]["matches"], 1)

    def test_detector_error_is_reported_not_raised(self):
        import smoothce.compiler.inspect as si

        def broken(gm):
            raise RuntimeError("detector bug")

        original = si._detector
        si._detector = lambda: broken
        try:
            report = smoothce.inspect(plain_ce, *_inputs())
        finally:
            si._detector = original
        self.assertEqual(report.errors, ["graph 0: RuntimeError: detector bug"])
        self.assertEqual(report.graphs[0].after, report.graphs[0].before)
