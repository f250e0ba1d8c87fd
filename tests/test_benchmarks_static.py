"""The static GPU report (benchmarks/static/): the kernels' fixed choices compiled for sm_90 on this
machine, GPU or not, by Triton's own ptxas, through the project's launcher.

Held to what a memory-bound kernel needs whatever the GPU's clock: no spilled registers, and every
load of a logits tile and store of a gradient tile in the hot loops 16 bytes wide. Loads are told
apart by the source line they come from, so a 128-bit load of the class weights cannot stand in
for the logits' own.
"""

import json
import os
import subprocess
import sys

import pytest

from smoothce.kernels import cross_entropy_tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.static", "--ci", "--out", str(tmp_path), "--name", "ci"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "ci.json") as f:
        return json.load(f)


def _skip_without_ptxas():
    """The report needs Triton's CUDA backend and a ptxas (Triton bundles one; a build without it
    cannot compile for a GPU)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton import knobs

    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:  # this Triton finds no ptxas at all
        pytest.skip(f"no ptxas: {e}")
    if not (ptxas and os.access(ptxas, os.X_OK)):
        pytest.skip(f"no executable ptxas ({ptxas!r})")


def test_fixed_choices_compile_for_sm90_without_spills_with_128_bit_logits_and_gradient(tmp_path):
    _skip_without_ptxas()
    rec = _report(tmp_path)
    rows = rec["rows"]
    # the op (its statistics and gradient kernels) and the head's chunk (the fused kernel), bf16 and
    # fp32, V = 1K (fused: one pass over 2-row tiles), 4K (one pass), 128K (two passes), plain and
    # with every feature on: the fixed choices
    assert {r["V"] for r in rows} == {1024, 4096, 131072}
    modes = {(r["entry"], rec["kernels"][r["kernel"]]["mode"]) for r in rows}
    assert modes == {("op", "stats"), ("op", "grad"), ("head", "one_pass"), ("head", "two_pass")}
    assert len(rows) == 36
    for r in rows:
        k = rec["kernels"][r["kernel"]]
        if r["entry"] == "op":
            tile = cross_entropy_tuning.stream_tile(r["V"], False)
            expected = (tile.block_r, tile.block_c, tile.num_warps)
        else:
            cfg = cross_entropy_tuning.default_config(r["V"], False)
            expected = (cfg.block_r, cfg.block_c, cfg.num_warps)
            assert k["mode"] == cross_entropy_tuning.MODE_NAMES[cfg.mode]
        assert (k["block_r"], k["block_c"], k["num_warps"]) == expected
        where = f"{r['entry']} {r['dtype']} V={r['V']} {r['features']} {r['config']}"
        assert k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0, where
        assert set(r["hot_accesses"]["logits loads"]) == {"128"}, (where, r["hot_accesses"])
        stores = r["hot_accesses"].get("gradient stores", {})
        assert set(stores) == ({"128"} if k["mode"] != "stats" else set()), (where, r["hot_accesses"])
        assert not any(key.startswith("unresolved") for key in r["hot_accesses"]), (where, r["hot_accesses"])
        # the launcher's run-time specialisation reached the compiler: unit class stride, aligned rows
        assert "stride_xc" in k["specialisation"]["constant_1"]
        assert "stride_xn" in k["specialisation"]["divisible_by_16"]
    with_weights = [r for r in rows if r["features"] == "all"]
    assert all(r["hot_accesses"]["weights loads"] for r in with_weights)
