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
from smoothce.compiler.measure.tiny_lm import smoothed_cross_entropy
from smoothce.compiler.report import Report
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


def code_lines(graph_code: str) -> str:
    """A graph's code without its comment lines (which quote source files by path)."""
    return "\n".join(line for line in graph_code.splitlines() if not line.lstrip().startswith("#"))


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


GLOBAL_WEIGHT = torch.rand(16, generator=torch.Generator().manual_seed(5))


class WeightedLosses(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("class_weight", torch.rand(16))

    def forward(self, x, w, y, class_w):
        logits = x @ w
        own = F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=0.1)
        return own + F.cross_entropy(logits, y, weight=class_w)  # L:two_weights


def global_weight(x, w, y):
    return F.cross_entropy(x @ w, y, weight=GLOBAL_WEIGHT)  # L:global_weight


def distributions(x, w, wt, y, lam, p):
    # each loss as its author wrote it: distillation, mixup, soft targets, a symmetric KL
    s, t = x @ w, x @ wt
    kd = F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="batchmean") * 4 * 4
    hinton = 0.25 * F.cross_entropy(s, y) + 0.75 * kd  # L:hinton
    y_b = y.flip(0)
    mixup = lam * F.cross_entropy(s, y, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(s, y_b, label_smoothing=0.1)  # L:mixup
    soft = F.cross_entropy(s, p, label_smoothing=0.1)  # L:soft
    student = F.softmax(s / 2, -1)
    reverse = (student * (F.log_softmax(s / 2, -1) - F.log_softmax(t / 2, -1))).sum(-1).mean()
    forward = -(F.softmax(t / 2, -1) * F.log_softmax(s / 2, -1)).sum(-1).mean()
    return hinton, mixup, soft, (0.5 * forward + 0.5 * reverse) * 4  # L:symmetric


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
  #  location               family         parameters
  1  test_inspect.py:plain  cross_entropy  label_smoothing=0.1 (eps/V), ignore_index=-1,
                                           reduction=mean

Near misses: none

Graphs:
  graph  traced from  losses  near misses
  0      plain_ce     1       0""",
        )
        (g,) = report.graphs
        # The op replaces the call in the copy the detector rewrote, never in the traced graph.
        # (Code only: the "# File: ..." comments name this file, whose path may contain "smoothce".)
        before, after = code_lines(g.before), code_lines(g.after)
        self.assertNotIn("smoothce", before)
        self.assertIn("smoothce", after)
        self.assertIn("torch.nn.functional.cross_entropy", before)
        self.assertNotIn("torch.nn.functional.cross_entropy", after)

    def test_losses_against_a_distribution_in_their_words(self):
        x, w, y = _inputs()
        wt, p = torch.randn(8, 16), torch.softmax(torch.randn(6, 16), -1)
        report = smoothce.inspect(distributions, x, w, wt, y, torch.tensor(0.3), p)
        self.assertExpectedInline(self.render(report), """\
smoothce: 4 losses rewritten, 0 near misses, 1 graph, 0 graph breaks

Rewritten losses:
  #  location                   family                     parameters
  1  test_inspect.py:hinton     distillation KL + labels   ignore_index=-100, reduction=mean,
                                                           scale=0.25, target: teacher logits t at
                                                           temperature 4, KL weight=0.75 * T**2,
                                                           reduction=mean
  2  test_inspect.py:mixup      mixup cross_entropy        label_smoothing=0.1 (eps/V),
                                                           ignore_index=-100, reduction=mean, mixup:
                                                           lam=lam on y, 1 - lam on y_b
  3  test_inspect.py:soft       soft-target cross-entropy  target: probabilities p,
                                                           label_smoothing=0.1 (eps/V),
                                                           reduction=mean
  4  test_inspect.py:symmetric  distillation symmetric KL  target: teacher logits t at temperature
                                                           2, cross-entropy weight=0.5 * T**2,
                                                           reverse KL weight=0.5 * T**2,
                                                           reduction=mean

Near misses: none

Graphs:
  graph  traced from    losses  near misses
  0      distributions  4       0""")

    def test_hand_written_label_smoothing(self):
        report = smoothce.inspect(hand_written, *_inputs())
        self.assertEqual(len(report.matches), 1)
        self.assertEqual(report.matches[0].params["eps"], 0.2)
        self.assertExpectedInline(
            self.render(report),
            """\
smoothce: 1 loss rewritten, 0 near misses, 1 graph, 0 graph breaks

Rewritten losses:
  #  location      family              parameters
  1  tiny_lm.py:N  hand-written eps/V  label_smoothing=0.2 (eps/V), ignore_index=0, reduction=mean

Near misses: none

Graphs:
  graph  traced from   losses  near misses
  0      hand_written  1       0""",
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
  #  location                      reason
  1  test_inspect.py:logprobs_nll  log-probs (log_softmax at test_inspect.py:logprobs) also returned
                                   from the graph

Graphs:
  graph  traced from        losses  near misses
  0      logprobs_returned  0       1""",
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
  #  location                  family         parameters
  1  test_inspect.py:brk_loss  cross_entropy  ignore_index=-100, reduction=mean

Near misses: none

Graph breaks:
  #  location             reason                                between a loss and its logits
  1  test_inspect.py:brk  Call to                               loss at test_inspect.py:brk_loss
                          `torch._dynamo.graph_break()`:        (graph 1) reads `logits` from graph
                          User-inserted graph break. Message:   0
                          None

Graphs:
  graph  traced from                         losses  near misses
  0      break_before_loss                   0       0
  1      break_before_loss (after line brk)  1       0""",
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
        data = json.loads(json.dumps(report.to_dict()))
        self.assertEqual(data["matches"][0]["form"], {"ignore_index": -100, "reduction": "sum"})
        self.assertEqual(data["summary"]["matches"], 1)

    def test_class_weights_by_the_names_the_code_gives_them(self):
        # Dynamo's names for graph inputs (l_self_buffers_class_weight_, g_global_weight_) are not
        # the user's. Two calls with different weights are no one form: each is shown as written.
        report = smoothce.inspect(WeightedLosses(), *_inputs(), torch.rand(16))
        self.assertExpectedInline(
            self.render(report).split("\n\nNear misses")[0],
            """\
smoothce: 1 loss rewritten, 0 near misses, 1 graph, 0 graph breaks

Rewritten losses:
  #  location                     family         parameters
  1  test_inspect.py:two_weights  cross_entropy  [label_smoothing=0.1 (eps/V), ignore_index=-100,
                                                 reduction=mean, weight=self.class_weight] +
                                                 [ignore_index=-100, reduction=mean, weight=class_w]""",
        )
        (m,) = smoothce.inspect(global_weight, *_inputs()).matches
        self.assertEqual(m.params["weight"], "GLOBAL_WEIGHT")

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


class TestDynamoForgetsTheTrace(expecttest.TestCase):
    """inspect() leaves Dynamo's per-code memory as it found it: cache entries and shapes seen."""

    def valid_entries(self, fn):
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        return [e for e in _debug_get_cache_entry_list(fn.__code__) if e.code is not None]

    def test_a_loop_of_inspect_calls_never_reaches_the_recompile_limit(self):
        limit = torch._dynamo.config.recompile_limit
        for _ in range(limit + 2):
            report = smoothce.inspect(plain_ce, *_inputs())
            self.assertEqual(len(report.matches), 1)  # past the limit Dynamo would run it eagerly: no graph
            self.assertEqual(self.valid_entries(plain_ce), [])

    def test_the_users_own_compile_is_kept_and_not_recompiled(self):
        compiles = []

        def backend(gm, example_inputs):
            compiles.append(gm)
            return gm.forward

        compiled = torch.compile(plain_ce, backend=backend)
        compiled(*_inputs())
        for _ in range(3):
            smoothce.inspect(plain_ce, *_inputs())
        compiled(*_inputs())
        self.assertEqual(len(compiles), 1)
        self.assertEqual(len(self.valid_entries(plain_ce)), 1)

    def test_shapes_seen_by_inspect_do_not_make_a_later_compile_dynamic(self):
        smoothce.inspect(plain_ce, *_inputs(n=6))
        placeholders = []

        def backend(gm, example_inputs):
            placeholders.extend(type(n.meta["example_value"]).__name__ for n in gm.graph.find_nodes(op="placeholder"))
            return gm.forward

        # A second shape after a first one is what makes automatic dynamic mark a dimension.
        torch.compile(plain_ce, backend=backend)(*_inputs(n=9))
        self.assertEqual(placeholders, ["FakeTensor"] * 3)  # no SymInt input: a static graph
