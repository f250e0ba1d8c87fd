"""The benchmark harness runs end to end on one tiny shape and writes its JSON and plot.

Benchmarks are never run as tests and nothing here looks at a time: this only checks that the
harness (timing, fresh-process memory, report, plots) works, so a broken harness is caught before
someone needs numbers.
"""

import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def benchmarks_cli():
    # benchmarks/ lives at the repository root and is not installed with smoothce.
    sys.path.insert(0, REPO_ROOT)
    try:
        from benchmarks import cli

        yield cli
    finally:
        sys.path.remove(REPO_ROOT)


def test_tiny_run_writes_json_and_plot(benchmarks_cli, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = benchmarks_cli.main([
        "--device", "cpu", "--case", "ce", "--methods", "smoothce",
        "--n", "256", "--v", "2048", "--smoothing", "0,0.1", "--min-run-time", "0.01",
        "--no-compile-time", "--out", str(tmp_path), "--note", "smoke",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[ce] N=256 V=2048 float32 label_smoothing=0.1" in out

    (json_path,) = tmp_path.glob("*.json")
    record = json.loads(json_path.read_text())
    assert record["device"]["type"] == "cpu"
    assert record["torch"] and record["date"] and record["notes"] == ["smoke"]
    rows = record["rows"]
    assert [(r["method"], r["smoothing"]) for r in rows] == [("smoothce", 0.0), ("smoothce", 0.1)]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["check"] == "ok", r  # loss and gradient rows agree with eager PyTorch
        assert r["time_ms"] > 0 and r["gbps"] > 0
        # Measured in a fresh process: the step writes at least its 256x2048 fp32 gradient (2 MiB).
        assert r["memory_method"] in ("VmHWM", "statm sampled")
        assert r["peak_bytes"] >= 256 * 2048 * 4, r

    (png,) = tmp_path.glob("*-ce-float32.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_method_is_named(benchmarks_cli, capsys):
    assert benchmarks_cli.main(["--device", "cpu", "--methods", "eagre", "--no-plots"]) == 2
    assert "eagre" in capsys.readouterr().err
