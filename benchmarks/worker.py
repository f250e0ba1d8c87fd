"""Measurements that need a fresh process: CPU peak memory and cold compile time.

Invoked by the runner as ``python -m benchmarks.worker '<json>'``; prints one JSON object per line.
    {"job": "memory", "method": ..., "problems": [...], "threads": k}
        -> per problem {"peak_bytes": int, "memory_method": str} or {"error": str}
    {"job": "compile", "backend": ..., "device": ..., "threads": k}
        -> {"first_call_s": float, "steady_ms": float, "rewrites": int | None} or {"error": str}
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
import traceback


def _error(exc: BaseException) -> dict:
    lines = str(exc).strip().splitlines()
    return {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]}


def memory_job(job: dict) -> None:
    from benchmarks.cases import get_case
    from benchmarks.harness import Problem, first_call, make_step
    from smoothce.compiler.measure.memory import peak_cpu

    for spec in job["problems"]:
        p = Problem(**spec)
        try:
            case = get_case(p.case)
            method = case.method(job["method"])
            inputs = case.make_inputs(p)
            step = make_step(method.build(p), inputs)
            first_call(step)  # compile and warm up before the baseline is taken
            peak, how = peak_cpu(step, inputs.clear_grads)
            out = {"peak_bytes": peak, "memory_method": how}
        except Exception as exc:  # reported in the row, the next problem still runs
            out = _error(exc)
        print(json.dumps(out), flush=True)
        inputs = step = None
        gc.collect()


def compile_job(job: dict) -> None:
    import torch

    from smoothce.compiler.measure.tiny_lm import TinyLM

    model, idx, target = TinyLM.build(job["device"])
    compiled = torch.compile(model, backend=job["backend"], dynamic=False)

    def step():
        model.zero_grad(set_to_none=True)
        loss = compiled(idx, target)
        loss.backward()
        if job["device"] == "cuda":
            torch.cuda.synchronize()

    try:
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        out = {"first_call_s": first, "steady_ms": statistics.median(times) * 1e3, "rewrites": None}
        if job["backend"] == "smoothce":
            from smoothce.compiler.backend import rewrite_pass

            out["rewrites"] = sum(len(r.matches) for r in rewrite_pass.results)
    except Exception as exc:
        out = _error(exc)
    print(json.dumps(out), flush=True)


def main(argv: list[str]) -> int:
    job = json.loads(argv[1])
    import torch

    torch.set_num_threads(job["threads"])
    try:
        {"memory": memory_job, "compile": compile_job}[job["job"]](job)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
