"""Runs every (problem, method) pair: timing side by side in this process on the same inputs,
peak memory on GPU in this process, on CPU in a fresh process per method and shape."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from benchmarks.cases import Case, Grid, get_case
from benchmarks.harness import Problem, compare, copy_bandwidth, first_call, make_step, snapshot, time_step
from benchmarks.methods import Method
from smoothce.compiler.measure.memory import MALLOC_ENV, peak_cuda
from smoothce.compiler.measure.progress import Progress

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problems(case: Case, device: str, grid: Grid) -> list[list[Problem]]:
    """Problems grouped by shape: the smoothing variants of one shape share a memory process."""
    groups = []
    for dtype, n, v in itertools.product(grid.dtypes, grid.ns, grid.vs):
        groups.append([Problem(case.name, n, v, grid.d, dtype, s, device) for s in grid.smoothings])
    return groups


# ---------------------------------------------------------------------------------------------
# Environment record


def device_info(device: str) -> dict:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": props.name, "peak_bandwidth_Bps": peak_bandwidth(props.name),
                "memory_bytes": props.total_memory, "sm_count": props.multi_processor_count,
                "l2_bytes": getattr(props, "L2_cache_size", None)}
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"type": "cpu", "name": model, "peak_bandwidth_Bps": None,
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def peak_bandwidth(name: str) -> float | None:
    """HBM peak of the GPUs this suite is read against (datasheet figures; the copy bandwidth
    measured in the run is the practical ceiling)."""
    name = name.upper()
    if "H200" in name:
        return 4.8e12
    if "H100" in name:
        if "PCIE" in name:
            return 2.0e12
        if "NVL" in name:
            return 3.9e12
        return 3.35e12  # SXM5, reported as "NVIDIA H100 80GB HBM3"
    return None


def git_commit(given: str | None = None) -> dict:
    """The checkout's commit and whether it has local changes; ``given`` stands in where the
    checkout carries no git metadata (a copied tree)."""
    def git(*args):
        try:
            proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": given, "dirty": None, "source": "given" if given else None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")), "source": "git"}


# Distributions whose versions a record names: the peers and what the cases build on.
VERSIONED = ("liger-kernel", "quack-kernels", "nvidia-cutlass-dsl", "cut-cross-entropy", "transformers")


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str, commit: str | None = None) -> dict:
    import platform

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_info(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "packages": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_commit(commit),
        "loadavg_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class Options:
    device: str
    cases: tuple
    methods: tuple | None  # None: every method of each case
    quick: bool
    memory: bool
    compile_time: bool
    min_run_time: float
    grid_overrides: dict  # ns / vs / d / dtypes / smoothings from the command line
    commit: str | None = None  # recorded where the checkout has no git metadata


def grid_for(case: Case, opts: Options) -> Grid:
    grid = case.grid(opts.device, opts.quick)
    return dataclasses.replace(grid, **{k: v for k, v in opts.grid_overrides.items() if v is not None})


def selected(case: Case, opts: Options) -> list[Method]:
    if opts.methods is None:
        return list(case.methods.values())
    return [case.methods[name] for name in opts.methods if name in case.methods]


def _short(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "OOM"
    # Dynamo wraps backend errors as "backend='x' raised:\n<the real error>": keep both lines.
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"error: {type(exc).__name__}: {text}"[:200]


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def base_row(p: Problem, m: Method) -> dict:
    return {"method": m.name, "label": m.label, **p.to_dict(), "status": "ok", "note": None,
            "check": None, "time_ms": None, "time_iqr_ms": None, "first_call_s": None,
            "peak_bytes": None, "memory_method": None, "gbps": None, "copy_share": None,
            "peak_share": None, "tflops": None}


def add_rates(row: dict, case: Case, p: Problem, device: dict) -> None:
    """Effective bandwidth (and its share of the measured copy bandwidth and of the datasheet
    peak) and TFLOP/s, where the case defines bytes or operations."""
    if not row["time_ms"]:
        return
    seconds = row["time_ms"] / 1e3
    moved, flops = case.bytes_moved(p), case.flops(p)
    if moved:
        row["gbps"] = moved / seconds / 1e9
        if device.get("copy_Bps"):
            row["copy_share"] = moved / seconds / device["copy_Bps"]
        if device.get("peak_bandwidth_Bps"):
            row["peak_share"] = moved / seconds / device["peak_bandwidth_Bps"]
    if flops:
        row["tflops"] = flops / seconds / 1e12


def time_problem(case: Case, p: Problem, methods: list[Method], opts: Options, progress: Progress,
                 device: dict) -> list[dict]:
    inputs = case.make_inputs(p)
    # Reference: the case's reference method on the same inputs (loss and the first gradient rows).
    ref_step = make_step(case.reference.build(p), inputs)
    reference = snapshot(ref_step().detach(), inputs)
    inputs.clear_grads()
    rows = []
    for m in methods:
        progress.show(f"time {m.name:<22} {p.label()}")
        row = base_row(p, m)
        reason = m.unavailable(p)
        if reason:
            row["status"] = reason
        else:
            try:
                step = make_step(m.build(p), inputs)
                t0 = time.perf_counter()
                loss, warns = first_call(step)
                row["first_call_s"] = time.perf_counter() - t0
                notes = [n for n in (m.diagnose(p, warns), m.inspect(p)) if n]
                row["note"] = "; ".join(notes) or None
                row["check"] = compare(reference, snapshot(loss, inputs), p.dtype) or "ok"
                row["time_ms"], row["time_iqr_ms"] = time_step(step, p.device, opts.min_run_time)
                if p.device == "cuda" and opts.memory:
                    row["peak_bytes"] = peak_cuda(step, inputs.clear_grads)
                    row["memory_method"] = "cuda.max_memory_allocated"
            except Exception as exc:  # one broken method must not stop the suite
                row["status"] = _short(exc)
            finally:
                step = None
                inputs.clear_grads()
                torch._dynamo.reset()
                if m.overwrites_inputs:
                    inputs = None
                    _release()
                    inputs = case.make_inputs(p)
                _release()
        add_rates(row, case, p, device)
        rows.append(row)
        progress.advance()
    return rows


def run_worker(job: dict, timeout: float = 900) -> list[dict]:
    env = {**os.environ, **MALLOC_ENV}
    env.setdefault("PYTHONPATH", REPO_ROOT)
    if "cache_dir" in job:
        env["TORCHINDUCTOR_CACHE_DIR"] = job.pop("cache_dir")
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", json.dumps(job)], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"worker timed out after {timeout:.0f} s"}]
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not out:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"error": f"worker exit {proc.returncode}: {tail}"[:200]}]
    return out


def memory_group(group: list[Problem], rows: list[dict], opts: Options, progress: Progress) -> None:
    """CPU: one fresh process per method for this shape, measuring each smoothing in turn."""
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    for name, method_rows in by_method.items():
        runnable = [r for r in method_rows if r["status"] == "ok"]
        progress.show(f"memory {name:<20} {group[0].label().rsplit(' ls=', 1)[0]}")
        if runnable:
            specs = [{k: r[k] for k in Problem.__dataclass_fields__} for r in runnable]
            results = run_worker({"job": "memory", "method": name, "problems": specs,
                                  "threads": torch.get_num_threads()})
            for r, res in zip(runnable, results):
                if "error" in res:
                    r["note"] = "; ".join(filter(None, [r["note"], f"memory: {res['error']}"]))
                else:
                    r["peak_bytes"], r["memory_method"] = res["peak_bytes"], res["memory_method"]
        progress.advance()


def compile_times(device: str, progress: Progress) -> list[dict]:
    """Cold first-call time (Dynamo + AOTAutograd + Inductor codegen + the step) of a small model,
    each backend in a fresh process with an empty Inductor cache."""
    from benchmarks.methods import smoothce_backend_unavailable
    from smoothce.compiler.measure.tiny_lm import TinyLM

    out = []
    for backend in ("inductor", "smoothce"):
        progress.show(f"compile time {backend}")
        row = {"backend": backend, "model": f"TinyLM V={TinyLM.V} D={TinyLM.D} tokens={TinyLM.BATCH * TinyLM.SEQ}"}
        probe = Problem("ce", 1, 1, None, "float32", 0.0, device)
        if backend == "smoothce" and smoothce_backend_unavailable(probe):
            row["status"] = smoothce_backend_unavailable(probe)
        else:
            with tempfile.TemporaryDirectory(prefix="smoothce-bench-cache-") as cache:
                res = run_worker({"job": "compile", "backend": backend, "device": device,
                                  "threads": torch.get_num_threads(), "cache_dir": cache})[0]
            row.update(res)
            row["status"] = res.get("error", "ok")
        out.append(row)
        progress.advance()
    return out


def run(opts: Options, checkpoint: Callable[[dict], None] = lambda record: None) -> dict:
    """Measure every selected (problem, method). ``checkpoint`` receives the record so far after
    each shape, so a run stopped part way still leaves its rows."""
    record = environment(opts.device, opts.commit)
    record["device"]["copy_Bps"] = copy_bandwidth(opts.device, opts.min_run_time)
    plan = []
    for name in opts.cases:
        case = get_case(name)
        methods = selected(case, opts)
        if methods:
            plan.append((case, methods, problems(case, opts.device, grid_for(case, opts))))
    units = sum(len(ms) * sum(len(g) for g in groups) for _, ms, groups in plan)
    if opts.device == "cpu" and opts.memory:
        units += sum(len(ms) * len(groups) for _, ms, groups in plan)
    units += 2 if opts.compile_time else 0
    progress = Progress(units)
    record["rows"] = rows = []
    record["complete"] = False
    for case, methods, groups in plan:
        for group in groups:
            group_rows = []
            for p in group:
                group_rows += time_problem(case, p, methods, opts, progress, record["device"])
            if opts.device == "cpu" and opts.memory:
                memory_group(group, group_rows, opts, progress)
            rows += group_rows
            checkpoint(record)
    record["compile_time"] = compile_times(opts.device, progress) if opts.compile_time else []
    progress.close()
    record["loadavg_end"] = os.getloadavg()
    record["complete"] = True
    return record
