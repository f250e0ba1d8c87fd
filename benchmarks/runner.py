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

import torch

from benchmarks import cross_entropy, linear_cross_entropy
from benchmarks.harness import Problem, compare, first_call, make_inputs, make_step, snapshot, time_step
from benchmarks.methods import Method
from smoothce.measure.memory import MALLOC_ENV, peak_cuda
from smoothce.measure.progress import Progress

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def methods_for(case: str) -> dict[str, Method]:
    if case == "head":
        return linear_cross_entropy.METHODS
    if case == "step":
        return {k: cross_entropy.METHODS[k] for k in cross_entropy.STEP_METHODS}
    return cross_entropy.METHODS


def find_method(case: str, name: str) -> Method:
    table = methods_for(case)
    if name not in table:
        raise ValueError(f"no method {name!r} for case {case!r}; choose from {', '.join(table)}")
    return table[name]


# ---------------------------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(frozen=True)
class Grid:
    ns: tuple
    vs: tuple
    d: int
    dtypes: tuple
    smoothings: tuple = (0.0, 0.1)


def default_grid(device: str, case: str, quick: bool) -> Grid:
    if device == "cuda":
        # LLM-sized: 4K and 16K tokens per step, vocabularies of Llama-2 (32K), Llama-3 (128K),
        # Gemma (256K); head hidden size of a 7-8B model.
        if quick:
            return Grid((4096,), (32768, 131072), 4096, ("bfloat16",))
        return Grid((4096, 16384), (32768, 131072, 262144), 4096, ("bfloat16", "float32"))
    if case == "step":
        # The op's CPU promise, at the largest CPU shape of the ce case.
        return Grid((4096,), (32768,) if quick else (8192, 32768), 256, ("float32",))
    # Scaled down so a CPU run takes minutes on two cores.
    if quick:
        return Grid((1024,), (8192, 32768), 256, ("float32",))
    return Grid((1024, 4096), (8192, 32768), 256, ("float32",))


def problems(case: str, device: str, grid: Grid) -> list[list[Problem]]:
    """Problems grouped by shape: the smoothing variants of one shape share a memory process."""
    groups = []
    for dtype, n, v in itertools.product(grid.dtypes, grid.ns, grid.vs):
        d = grid.d if case == "head" else None
        groups.append([Problem(case, n, v, d, dtype, s, device) for s in grid.smoothings])
    return groups


# ---------------------------------------------------------------------------------------------
# Environment record


def device_info(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return {"type": "cuda", "name": name, "peak_bandwidth_Bps": peak_bandwidth(name),
                "memory_bytes": torch.cuda.get_device_properties(0).total_memory}
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"type": "cpu", "name": model, "peak_bandwidth_Bps": None,
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def peak_bandwidth(name: str) -> float | None:
    """HBM peak of the GPUs this suite is read against (datasheet figures)."""
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


def git_commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def environment(device: str) -> dict:
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
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_commit(),
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


def grid_for(case: str, opts: Options) -> Grid:
    grid = default_grid(opts.device, case, opts.quick)
    return dataclasses.replace(grid, **{k: v for k, v in opts.grid_overrides.items() if v is not None})


def selected(case: str, opts: Options) -> list[Method]:
    table = methods_for(case)
    if opts.methods is None:
        return list(table.values())
    return [table[name] for name in opts.methods if name in table]


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
            "peak_bytes": None, "memory_method": None, "gbps": None, "peak_share": None,
            "tflops": None}


def time_problem(p: Problem, methods: list[Method], opts: Options, progress: Progress, peak_bw) -> list[dict]:
    inputs = make_inputs(p)
    # Reference: eager PyTorch on the same inputs (loss and the first gradient rows).
    eager = (linear_cross_entropy if p.case == "head" else cross_entropy).METHODS["eager"]
    ref_step = make_step(eager.build(p), inputs)
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
                _release()
        if row["time_ms"]:
            seconds = row["time_ms"] / 1e3
            if p.bytes_moved():
                row["gbps"] = p.bytes_moved() / seconds / 1e9
                if peak_bw:
                    row["peak_share"] = p.bytes_moved() / seconds / peak_bw
            if p.flops():
                row["tflops"] = p.flops() / seconds / 1e12
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
    from smoothce.measure.tiny_lm import TinyLM

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


def run(opts: Options) -> dict:
    record = environment(opts.device)
    peak_bw = record["device"]["peak_bandwidth_Bps"]
    plan = []
    for case in opts.cases:
        methods = selected(case, opts)
        if methods:
            plan.append((case, methods, problems(case, opts.device, grid_for(case, opts))))
    units = sum(len(ms) * sum(len(g) for g in groups) for _, ms, groups in plan)
    if opts.device == "cpu" and opts.memory:
        units += sum(len(ms) * len(groups) for _, ms, groups in plan)
    units += 2 if opts.compile_time else 0
    progress = Progress(units)
    rows = []
    for case, methods, groups in plan:
        for group in groups:
            group_rows = []
            for p in group:
                group_rows += time_problem(p, methods, opts, progress, peak_bw)
            if opts.device == "cpu" and opts.memory:
                memory_group(group, group_rows, opts, progress)
            rows += group_rows
    record["compile_time"] = compile_times(opts.device, progress) if opts.compile_time else []
    progress.close()
    record["rows"] = rows
    record["loadavg_end"] = os.getloadavg()
    return record
