"""`python -m smoothce` end to end, in subprocesses: exit codes, output formats, error lines."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from smoothce.compiler import cli

_MODELS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 16)

        def forward(self, x, y):
            return F.cross_entropy(self.head(x), y, label_smoothing=0.1)

    def factory():
        torch.manual_seed(0)
        return Classifier(), (torch.randn(4, 8), torch.randint(0, 16, (4,)))

    def with_kwargs():
        fn = lambda x, *, y: F.cross_entropy(x, y, reduction="sum")
        return fn, (torch.randn(4, 16),), {"y": torch.randint(0, 16, (4,))}

    def no_loss():
        return (lambda x: x.softmax(-1)), (torch.randn(4, 16),)

    def raises():
        raise RuntimeError("no weights here\\nsecond line")

    def not_a_tuple():
        return 3

    def shape_error():
        return Classifier(), (torch.randn(4, 5), torch.randint(0, 16, (4,)))

    NOT_CALLABLE = 1
    """
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "models.py"
    path.write_text(_MODELS)
    return str(path)


def smoothce(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_TRACE")}
    env["COLUMNS"] = "100"
    return subprocess.run([sys.executable, "-m", "smoothce", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_help_lists_commands():
    proc = smoothce("--help")
    assert proc.returncode == 0
    assert "inspect" in proc.stdout and "demo" in proc.stdout and "TORCH_LOGS=smoothce" in proc.stdout
    proc = smoothce()
    assert proc.returncode == 2 and "required: COMMAND" in proc.stderr


def test_inspect_text(models):
    proc = smoothce("inspect", f"{models}:factory", "--expect", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "smoothce: 1 loss rewritten, 0 near misses, 1 graph, 0 graph breaks"
    words = " ".join(proc.stdout.split())  # cells wrap within their column
    assert "models.py:11" in proc.stdout and "label_smoothing=0.1 (eps/V), ignore_index=-100, reduction=mean" in words
    assert max(len(l) for l in lines) <= 100


def test_inspect_json_graphs_and_kwargs(models, tmp_path):
    out = tmp_path / "graphs"
    proc = smoothce("inspect", f"{models}:with_kwargs", "--json", "--graphs", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["summary"]["matches"] == 1
    assert data["matches"][0]["form"] == {"ignore_index": -100, "reduction": "sum"}
    assert sorted(os.listdir(out)) == ["graph_0_after.py", "graph_0_before.py"]
    assert "cross_entropy" in (out / "graph_0_before.py").read_text()
    assert "smoothce" in (out / "graph_0_after.py").read_text()


def test_expect_more_than_found_exits_1(models):
    proc = smoothce("inspect", f"{models}:no_loss", "--expect", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "smoothce: expected at least 1 rewritten losses, found 0"
    assert proc.stdout.startswith("smoothce: 0 losses rewritten")


@pytest.mark.parametrize(
    "target, message",
    [
        ("missing.py:factory", "no such file: missing.py"),
        ("{models}", "expected FILE.py:FACTORY, got '{models}'"),
        ("{models}:nope", "{models} has no 'nope'"),
        ("{models}:NOT_CALLABLE", "{models}:NOT_CALLABLE is a int, not a callable factory"),
        ("{models}:raises", "factory {models}:raises raised RuntimeError: no weights here"),
        ("{models}:not_a_tuple", "factory {models}:not_a_tuple must return (model_or_fn, args) or "
                                 "(model_or_fn, args, kwargs), got int"),
    ],
)
def test_bad_input_exits_2_with_one_line(models, target, message, capsys):
    # In process (main() is what the console script calls); one case below runs as a subprocess.
    assert cli.main(["inspect", target.format(models=models)]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == ["smoothce inspect: error: " + message.format(models=models)]
    assert out == ""


def test_factory_raising_in_subprocess(models):
    proc = smoothce("inspect", f"{models}:raises")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"smoothce inspect: error: factory {models}:raises raised RuntimeError: no weights here"]
    proc = smoothce("inspect", f"{models}:raises", "-v")
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr


def test_untraceable_model_exits_2_traceback_only_when_verbose(models):
    proc = smoothce("inspect", f"{models}:shape_error")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"smoothce inspect: error: tracing {models}:shape_error failed: "), line
    assert line.endswith("(--verbose for details)")
    proc = smoothce("inspect", f"{models}:shape_error", "--verbose")
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("smoothce inspect: error: tracing")


def test_demo_runs_tiny(tmp_path):
    # Code-generation-free backends keep this fast; the default pair (smoothce, inductor) is the
    # same code path with Inductor behind it.
    proc = smoothce("demo", "--steps", "2", "--vocab", "64", "--dim", "16", "--seq", "8", "--batch", "2",
                    "--backends", "smoothce_aot_eager,aot_eager", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "smoothce: 1 loss rewritten" in out, out
    assert "hand-written" in out
    rows = [l.split() for l in out.splitlines()
            if l.strip().startswith(("smoothce_aot_eager ", "aot_eager ")) and " / " not in l]
    assert [r[0] for r in rows] == ["smoothce_aot_eager", "aot_eager"], out
    # Same seed and data: the two backends start from the same loss.
    assert rows[0][1] == rows[1][1]
    assert "max |loss difference| over 2 steps" in out
    # A step this small may allocate nothing the resident size shows; then no ratio of zeros.
    assert ("smoothce_aot_eager / aot_eager: peak memory" in out
            or "smoothce_aot_eager / aot_eager: no peak-memory ratio (a peak of 0 bytes" in out), out
    # One timed step each: too few for a spread, so no step-time ratio is claimed.
    assert "smoothce_aot_eager / aot_eager: no step-time ratio" in out
    # Where stderr is not a terminal, each progress bar ends on one line with the table's figures.
    bars = [l for l in proc.stderr.splitlines() if l.startswith(("smoothce_aot_eager ", "aot_eager "))]
    assert [b.split()[0] for b in bars] == ["smoothce_aot_eager"] * 2 + ["aot_eager"] * 2, proc.stderr
    for bar, row in zip(bars[1::2], rows):
        assert f"step {row[5]} ms (IQR {row[7]} ms)" in bar, (bar, row)
    # Nothing else on stderr: no warning a fresh install would print ("Failed to initialize NumPy")
    others = [l for l in proc.stderr.splitlines() if l.strip() and l not in bars]
    assert not others, proc.stderr


def test_demo_rejects_bad_steps():
    proc = smoothce("demo", "--steps", "1")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "smoothce demo: error: --steps must be at least 2 (the first step compiles), got 1"
    ]


def test_demo_comparison_table():
    from smoothce.compiler.demo import _comparison

    tight = [0.150, 0.148, 0.152, 0.151, 0.149, 0.150]
    results = [
        {"backend": "smoothce", "losses": [7.0, 6.9], "first_step_s": 60.0, "step_s": tight,
         "peak_bytes": 5 * 2**20, "peak_method": "VmHWM"},
        {"backend": "inductor", "losses": [7.0, 6.9000014], "first_step_s": 16.0,
         "step_s": [t * 2 / 3 for t in tight], "peak_bytes": 10 * 2**20, "peak_method": "VmHWM"},
        {"backend": "broken", "error": "worker exited with status 1"},
    ]
    assert _comparison(results, 100) == textwrap.indent(textwrap.dedent(
        """\
          backend   loss first  loss last  compile+step 1  step median  IQR             peak memory
          smoothce  7.00000     6.90000    60.0 s          150.0 ms     149.2-150.8 ms  5.0 MiB
          inductor  7.00000     6.90000    16.0 s          100.0 ms     99.5-100.5 ms   10.0 MiB
          broken    -           -          -               -            -               worker exited with
                                                                                        status 1
          peak memory: resident memory high-water mark during one step above its start (VmHWM)
          max |loss difference| over 2 steps, smoothce vs inductor: 1.40e-06
          smoothce / inductor: peak memory 0.50x
          smoothce / inductor: step time 1.50x (quartiles: 1.49x-1.52x)"""
    ), "  ")


@pytest.mark.parametrize(
    "inductor_steps, reason",
    [
        ([0.1, 0.1, 0.3, 0.1, 0.2, 0.05], "inductor: IQR 75% of the median, a ratio needs under 25%); a busy machine?"),
        ([0.1, 0.1], "inductor: 2 timed steps, a spread needs 5)"),
    ],
    ids=["busy-machine", "too-few-steps"],
)
def test_demo_prints_no_ratio_when_the_spread_forbids_it(inductor_steps, reason):
    from smoothce.compiler.demo import _comparison

    results = [
        {"backend": "smoothce", "losses": [7.0], "first_step_s": 1.0, "step_s": [0.150, 0.148, 0.152, 0.151, 0.149],
         "peak_bytes": 2**20, "peak_method": "VmHWM"},
        {"backend": "inductor", "losses": [7.0], "first_step_s": 1.0, "step_s": inductor_steps,
         "peak_bytes": 2**20, "peak_method": "VmHWM"},
    ]
    text = _comparison(results, 100)
    assert max(len(line) for line in text.splitlines()) <= 100
    words = " ".join(text.split())  # footer lines wrap to the width
    assert words.endswith("smoothce / inductor: no step-time ratio (" + reason), text
