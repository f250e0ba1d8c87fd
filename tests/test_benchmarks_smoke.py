"""The benchmark harness runs end to end on one tiny shape and writes its JSON and plots.

Benchmarks are never run as tests and nothing here looks at a time: this only checks that the
harness (timing, copy bandwidth, fresh-process memory, report, plots) works, so a broken harness
is caught before someone needs numbers.
"""

import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def benchmarks():
    # benchmarks/ lives at the repository root and is not installed with smoothce.
    sys.path.insert(0, REPO_ROOT)
    try:
        import benchmarks.cli
        import benchmarks.report

        yield benchmarks
    finally:
        sys.path.remove(REPO_ROOT)


def test_tiny_run_writes_json_and_plots(benchmarks, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = benchmarks.cli.main([
        "--device", "cpu", "--case", "ce", "--methods", "smoothce,quack",
        "--n", "256", "--v", "2048", "--smoothing", "0,0.1", "--min-run-time", "0.01",
        "--no-compile-time", "--out", str(tmp_path), "--note", "smoke", "--commit", "abc123",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[ce] N=256 V=2048 float32 label_smoothing=0.1" in out

    (json_path,) = tmp_path.glob("*.json")
    record = json.loads(json_path.read_text())
    assert record["device"]["type"] == "cpu" and record["device"]["copy_Bps"] > 0
    assert record["torch"] and record["date"] and record["notes"] == ["smoke"]
    assert record["complete"] is True
    # In a git checkout the commit is read from git; the given one stands in only without git.
    assert record["git"]["commit"] and record["git"]["source"] in ("git", "given")
    rows = record["rows"]
    assert [(r["method"], r["smoothing"]) for r in rows] == [
        ("smoothce", 0.0), ("quack", 0.0), ("smoothce", 0.1), ("quack", 0.1)]
    for r in rows:
        if r["method"] == "quack":  # a GPU peer: the row says why it has no number
            assert r["status"] in ("not installed", "needs CUDA", "n/a (no label smoothing)") or \
                r["status"].startswith("not importable"), r
            assert r["time_ms"] is None
            continue
        assert r["status"] == "ok", r
        assert r["check"] == "ok", r  # loss and gradient rows agree with eager PyTorch
        assert r["time_ms"] > 0 and r["gbps"] > 0
        assert r["copy_share"] == pytest.approx(r["gbps"] * 1e9 / record["device"]["copy_Bps"])
        # Measured in a fresh process: the step writes at least its 256x2048 fp32 gradient (2 MiB).
        assert r["memory_method"] in ("VmHWM", "statm sampled")
        assert r["peak_bytes"] >= 256 * 2048 * 4, r

    pngs = sorted(p.name.rsplit("-ce-", 1)[1] for p in tmp_path.glob("*.png"))
    assert pngs == ["float32-bandwidth.png", "float32.png"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A written record renders again without measuring anything.
    replot = tmp_path / "replot"
    assert benchmarks.cli.main(["--from-json", str(json_path), "--out", str(replot)]) == 0
    assert "[ce] N=256 V=2048 float32 label_smoothing=0.1" in capsys.readouterr().out
    assert len(list(replot.glob("*.png"))) == 2


def _row(method, **values):
    row = {"method": method, "label": method, "case": "ce", "n": 8192, "v": 131072, "d": None,
           "dtype": "bfloat16", "smoothing": 0.0, "device": "cuda", "status": "ok", "note": None,
           "check": "ok", "time_ms": None, "time_iqr_ms": None, "first_call_s": None, "peak_bytes": None,
           "memory_method": None, "gbps": None, "copy_share": None, "peak_share": None, "tflops": None}
    return {**row, **values}


def test_table_columns_stay_apart(benchmarks):
    # Wide values in neighbouring columns (a 4-digit peak next to a 4-digit GB/s) once ran
    # together; every cell must stay its own whitespace-separated field.
    record = {
        "device": {"type": "cuda", "name": "GPU", "copy_Bps": 4.0e12, "peak_bandwidth_Bps": 4.8e12},
        "torch": "2.11", "triton": "3.6", "date": "2026-01-01T00:00:00Z",
        "rows": [
            _row("smoothce", time_ms=1.5, time_iqr_ms=0.01, peak_bytes=1024 * 2**20, gbps=1450.0,
                 copy_share=0.3625, peak_share=0.302),
            _row("eager", time_ms=18.0, time_iqr_ms=0.2, peak_bytes=10240 * 2**20, gbps=120.8,
                 copy_share=0.0302, peak_share=0.0252),
            _row("quack", status="not installed"),
        ],
    }
    lines = benchmarks.report.table(record).splitlines()
    header = next(line for line in lines if line.strip().startswith("method"))
    assert header.split()[:9] == ["method", "time", "ms", "±iqr", "speedup", "peak", "MiB", "GB/s", "%copy"]
    smoothce = next(line for line in lines if line.strip().startswith("smoothce"))
    assert smoothce.split() == ["smoothce", "1.50", "0.01", "12.00x", "1,024", "1,450", "36", "30"]
    quack = next(line for line in lines if line.strip().startswith("quack"))
    assert quack.split()[-2:] == ["not", "installed"]
    assert "TFLOP/s" not in header  # no row has one


def test_unknown_method_is_named(benchmarks, capsys):
    assert benchmarks.cli.main(["--device", "cpu", "--methods", "eagre", "--no-plots"]) == 2
    assert "eagre" in capsys.readouterr().err


def _options(benchmarks_runner, **grid):
    return benchmarks_runner.Options(
        device="cpu", cases=("ce",), methods=None, quick=True, memory=False, compile_time=False,
        min_run_time=0.01, grid_overrides={"ns": (64,), "vs": (128,), "d": None, "dtypes": None,
                                           "smoothings": (0.0,), **grid})


def test_inputs_are_rebuilt_after_a_method_that_writes_into_them(benchmarks):
    import torch.nn.functional as F

    from benchmarks import runner
    from benchmarks.cases import Case
    from benchmarks.cross_entropy import METHODS, ce_grid, make_inputs
    from benchmarks.harness import Problem
    from benchmarks.methods import Method
    from smoothce.compiler.measure.progress import Progress

    def overwriting(p):
        def loss(logits, target):
            out = F.cross_entropy(logits, target)
            logits.data.zero_()  # as Liger leaves its gradient in the logits' buffer
            return out

        return loss

    methods = {"overwriting": Method("overwriting", "writes into its input", overwriting, overwrites_inputs=True),
               "eager": METHODS["eager"]}
    case = Case("t", "test case", methods, ce_grid, make_inputs, METHODS["eager"])
    p = Problem("t", 64, 128, None, "float32", 0.0, "cpu")
    rows = runner.time_problem(case, p, list(methods.values()), _options(runner), Progress(2), {})
    # The method after it ran on the original logits: it agrees with the reference taken before.
    assert [(r["method"], r["check"]) for r in rows] == [("overwriting", "ok"), ("eager", "ok")]


def test_a_run_leaves_its_rows_after_every_shape(benchmarks):
    from benchmarks import runner

    seen = []
    opts = _options(runner, vs=(128, 256))
    opts.methods = ("eager",)
    record = runner.run(opts, checkpoint=lambda r: seen.append((len(r["rows"]), r["complete"])))
    assert seen == [(1, False), (2, False)]
    assert record["complete"] is True and len(record["rows"]) == 2


def test_busy_keeps_processes_running_for_the_run_only(benchmarks):
    import benchmarks.load

    with benchmarks.load.busy(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.returncode is not None for p in procs)
    with pytest.raises(ValueError, match="-1"):
        with benchmarks.load.busy(-1):
            pass
