"""Report rendering and JSON, from constructed detector results (no tracing), and backend logging
through TORCH_LOGS / TORCH_TRACE in fresh processes (the env vars are read at `import torch`)."""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import textwrap

import expecttest
import torch

from smoothce.compiler.report import GraphBreak, GraphRecord, Report, loss_words
from smoothce.compiler.render import Column, table
from smoothce.kernels.form import LossForm
from smoothce.patterns.report import Match, NearMiss, RewriteResult

_BREAK_REASON = (
    "Failed to trace builtin operator\n"
    "  Explanation: Dynamo does not know how to trace builtin operator `print` with argument types "
    "['str'] (has_kwargs False)\n"
    "  Hint: Avoid calling builtin `print` with argument types ['str'].\n"
)


def make_match(family, location, form, replaced, *, classes=16, **details):
    """A detector Match for ``form`` as the detector builds it: the flat ``params`` every version
    has, plus ``form`` and ``coefficients`` where Match has those fields."""
    a, b, c = form.coefficients(classes)
    coefficients = {"a": a, "b": b, "c": c, "z": form.z_loss}
    params = {"eps": form.label_smoothing, "target_coef": a, "uniform_coef": b, "constant": c,
              "z_loss": form.z_loss, "softcap": form.softcap, "logit_scale": form.logit_scale,
              "ignore_index": form.ignore_index, "reduction": form.reduction,
              "weight": None, "classes": classes, "dtype": "float32", **details}
    fields = {f.name for f in dataclasses.fields(Match)}
    extra = {"form": form, "coefficients": coefficients} if "form" in fields else {}
    return Match(family, location, params, tuple(replaced), **extra)


def _report() -> Report:
    hand = make_match(
        "hand-written eps/(V-1)", "train.py:42",
        LossForm(label_smoothing=0.1, smoothing="others", ignore_index=0, z_loss=1e-4),
        ("log_softmax", "gather", "squeeze", "neg", "mean", "neg_1", "mul", "mul_1", "add"), dtype="bfloat16",
    )
    plain = make_match("cross_entropy", "model.py:7", LossForm(reduction="sum"), ("cross_entropy",))
    distilled = make_match(
        "kl_div", "distill.py:30",
        LossForm(label_smoothing=0.1, kl=True, logit_scale=0.5, softcap=30.0, reduction="sum", ignore_index=None),
        ("log_softmax", "kl_div"), weight="class_weight",
    )
    miss = NearMiss("log_softmax_1", "train.py:50", "log-probs also read at train.py:53")
    graphs = [
        GraphRecord(0, "forward", RewriteResult([hand, distilled], [miss]), "before0", "after0", 14, 6),
        GraphRecord(1, "torch_dynamo_resume_in_loss_fn_at_12", RewriteResult([plain], []), "b1", "a1", 3, 3),
    ]
    brk = GraphBreak(0, "train.py:12", _BREAK_REASON, "loss at model.py:7 (graph 1) reads `logits` from graph 0")
    return Report(graphs, [brk])


class TestRender(expecttest.TestCase):
    def test_wide(self):
        self.assertExpectedInline(
            _report().render(width=100),
            """\
smoothce: 3 losses rewritten, 1 near miss, 2 graphs, 1 graph break (1 between a loss and its logits)

Rewritten losses:
  #  location       family                  parameters
  1  train.py:42    hand-written eps/(V-1)  label_smoothing=0.1 (eps/(V-1)), ignore_index=0,
                                            reduction=mean, z_loss=0.0001
  2  distill.py:30  kl_div                  label_smoothing=0.1 (eps/V), ignore_index=none,
                                            reduction=sum, kl=True, softcap=30, logit_scale=0.5
                                            (temperature 2), weight=class_weight
  3  model.py:7     cross_entropy           ignore_index=-100, reduction=sum

Near misses:
  #  location     reason
  1  train.py:50  log-probs also read at train.py:53

Graph breaks:
  #  location     reason                                    between a loss and its logits
  1  train.py:12  Failed to trace builtin operator: Dynamo  loss at model.py:7 (graph 1) reads
                  does not know how to trace builtin        `logits` from graph 0
                  operator `print` with argument types
                  ['str'] (has_kwargs False)

Graphs:
  graph  traced from              losses  near misses
  0      forward                  2       1
  1      loss_fn (after line 12)  1       0""",
        )

    def test_narrow_lines_fit(self):
        text = _report().render(width=60)
        self.assertEqual([l for l in text.splitlines() if len(l) > 60], [])
        self.assertExpectedInline(
            text.split("\n\nNear misses")[0],
            """\
smoothce: 3 losses rewritten, 1 near miss, 2 graphs, 1 graph
break (1 between a loss and its logits)

Rewritten losses:
  #  location       family              parameters
  1  train.py:42    hand-written        label_smoothing=0.1
                    eps/(V-1)           (eps/(V-1)),
                                        ignore_index=0,
                                        reduction=mean,
                                        z_loss=0.0001
  2  distill.py:30  kl_div              label_smoothing=0.1
                                        (eps/V),
                                        ignore_index=none,
                                        reduction=sum,
                                        kl=True, softcap=30,
                                        logit_scale=0.5
                                        (temperature 2),
                                        weight=class_weight
  3  model.py:7     cross_entropy       ignore_index=-100,
                                        reduction=sum""",
        )

    def test_empty(self):
        self.assertExpectedInline(
            Report().render(width=80),
            """\
smoothce: 0 losses rewritten, 0 near misses, 0 graphs, 0 graph breaks

Rewritten losses: none

Near misses: none""",
        )

    def test_code_and_detector_error(self):
        g = GraphRecord(0, "f", RewriteResult(), "def forward(x): ...", "def forward(x): ...", 2, 2,
                        error="RuntimeError: boom")
        text = Report([g]).render(width=80, verbose=True)
        self.assertIn("detector error", text)
        self.assertIn("RuntimeError: boom", text)
        self.assertIn("--- graph 0 after: unchanged ---", text)
        self.assertEqual(Report([g]).errors, ["graph 0: RuntimeError: boom"])

    def test_path_column_keeps_the_end(self):
        loc = "/very/long/directory/name/that/does/not/fit/model_file.py:77"
        text = table([Column("location", "path", 10), Column("x", "fixed")], [[loc, "y"]], width=30)
        self.assertExpectedInline(
            text,
            """\
  location                   x
  ...t/fit/model_file.py:77  y""",
        )


class TestToDict(expecttest.TestCase):
    def test_json_round_trip(self):
        d = json.loads(json.dumps(_report().to_dict()))
        self.assertEqual(d["summary"], {"graphs": 2, "matches": 3, "near_misses": 1, "graph_breaks": 1,
                                        "loss_splitting_breaks": 1, "errors": 0})
        self.assertEqual(d["matches"][0]["form"], {"ignore_index": 0, "reduction": "mean", "label_smoothing": 0.1,
                                                   "smoothing": "others", "z_loss": 0.0001})
        self.assertEqual(d["matches"][0]["details"]["dtype"], "bfloat16")
        self.assertEqual([m["graph"] for m in d["matches"]], [0, 0, 1])
        self.assertEqual(d["graphs"][1]["after"], "a1")
        self.assertEqual(d["graph_breaks"][0]["reason"], _BREAK_REASON)

    def test_non_finite_and_odd_values_become_strings(self):
        m = make_match("x", "a.py:1", LossForm(), (), weight=torch.float16, t=(1, 2.5), nan=float("nan"))
        d = json.loads(json.dumps(Report([GraphRecord(0, "f", RewriteResult([m]), "", "", 0, 0)]).to_dict(),
                                  allow_nan=False))
        details = d["matches"][0]["details"]
        self.assertEqual((details["weight"], details["t"], details["nan"]), ("float16", [1, 2.5], "nan"))

    def test_verbose_adds_details_and_coefficients(self):
        hand = _report().matches[0]
        self.assertEqual(loss_words(hand), "label_smoothing=0.1 (eps/(V-1)), ignore_index=0, reduction=mean, "
                                           "z_loss=0.0001")
        self.assertExpectedInline(
            loss_words(hand, verbose=True),
            """label_smoothing=0.1 (eps/(V-1)), ignore_index=0, reduction=mean, z_loss=0.0001, classes=16, dtype=bfloat16, a=0.893333, b=0.00666667, c=0, z=0.0001""",
        )


_LOG_SCRIPT = textwrap.dedent(
    """
    import torch
    import sys
    sys.path.insert(0, TESTS)
    from test_inspect_render import make_match
    from smoothce.compiler.rewrite_log import log_rewrite
    from smoothce.kernels.form import LossForm
    from smoothce.patterns.report import RewriteResult
    m = make_match("cross_entropy", "m.py:3", LossForm(label_smoothing=0.1), ("cross_entropy",))
    log_rewrite("forward", RewriteResult([m], []), "BEFORE-CODE", "AFTER-CODE")
    log_rewrite("other", RewriteResult())
    """
)


def _run_logged(tmp_path, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_TRACE")}
    env.update(env_vars, COLUMNS="100")
    script = _LOG_SCRIPT.replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def _strip_prefix(output: str) -> str:
    # torch's log prefix: "I1122 18:25:31.352000 9801 /path/inspect.py:459] "
    return "\n".join(line.split("] ", 1)[-1] for line in output.splitlines())


def test_torch_logs_smoothce_prints_the_table(tmp_path):
    out = _strip_prefix(_run_logged(tmp_path, TORCH_LOGS="smoothce"))
    assert out == textwrap.dedent(
        """\
        smoothce rewrite of forward: 1 loss rewritten, 0 near misses
        Rewritten losses:
          #  location  family         parameters
          1  m.py:3    cross_entropy  label_smoothing=0.1 (eps/V), ignore_index=-100, reduction=mean

        Near misses: none
        smoothce rewrite of other: no cross-entropy found"""
    ), out


def test_torch_logs_plus_smoothce_adds_graph_code(tmp_path):
    out = _run_logged(tmp_path, TORCH_LOGS="+smoothce")
    assert "BEFORE-CODE" in out and "AFTER-CODE" in out and "1 loss rewritten" in out


def test_no_torch_logs_is_silent(tmp_path):
    assert _run_logged(tmp_path) == ""


def test_torch_trace_gets_the_report_artifact(tmp_path):
    _run_logged(tmp_path, TORCH_TRACE=str(tmp_path / "trace"))
    lines = [l for f in glob.glob(str(tmp_path / "trace" / "*")) for l in open(f)]
    reports = [i for i, l in enumerate(lines) if '"name": "smoothce_report"' in l]
    assert len(reports) == 2, lines
    # The payload follows its metadata line, one tab-indented line per payload line.
    payload = json.loads(lines[reports[0] + 1].strip())
    assert payload["graph"] == "forward" and payload["matches"][0]["form"]["label_smoothing"] == 0.1
    assert any('"name": "smoothce_graph_after"' in l for l in lines)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F

    def f(x, w, y):
        return F.cross_entropy(x @ w, y, label_smoothing=0.1)

    x, w, y = torch.randn(6, 8), torch.randn(8, 16, requires_grad=True), torch.randint(0, 16, (6,))
    torch.compile(f, backend="smoothce_aot_eager")(x, w, y).backward()
    """
)


def test_torch_logs_while_compiling_with_the_backend(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_TRACE")}
    env.update(TORCH_LOGS="smoothce", TORCH_TRACE=str(tmp_path / "trace"), COLUMNS="100")
    (tmp_path / "train.py").write_text(_COMPILE_SCRIPT)
    proc = subprocess.run([sys.executable, "train.py"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = _strip_prefix(proc.stderr)
    assert ": 1 loss rewritten, 0 near misses" in out, out
    assert "train.py:6" in out and "label_smoothing=0.1 (eps/V)" in out, out
    lines = [l for f in glob.glob(str(tmp_path / "trace" / "*")) for l in open(f)]
    (i,) = [i for i, l in enumerate(lines) if '"name": "smoothce_report"' in l]
    assert json.loads(lines[i + 1].strip())["matches"][0]["family"] == "cross_entropy"


def test_repr_is_short():
    # A REPL shows repr(report): counts, not pages of graph code.
    assert repr(_report()) == "Report(matches=3, near_misses=1, graphs=2, graph_breaks=1)"
    assert "before0" not in repr(_report().graphs[0])
