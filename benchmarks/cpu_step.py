"""What the CPU training-step scripts share (benchmarks/linear_cross_entropy_step.py,
benchmarks/distillation_step.py): every method's step in a fresh process, its peak memory and
its time measured there, methods alternating over rounds, a table and a JSON record.

Peak memory: one step after the warm-up (compiling) steps, by smoothce.compiler.measure.memory's
peak_cpu (the resident set's high-water mark above its start, with glibc's mmap threshold pinned
so freed buffers go back to the OS). Time: several steps per process in other processes, with the
default allocator; methods alternate over rounds, so a busy minute slows every method alike.
Reported: the best round's median (the least disturbed), and the median and interquartile range
of every timed step of every round (what a shared machine typically gives), with the load average
before and after.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time


def worker_result(run, clear, mode: str, repeats: int) -> dict:
    """In a worker process: two warm-up steps (``run()`` returns the detached loss), then the peak
    memory of one more step (``clear()`` drops the gradients first) or the times of ``repeats``."""
    for _ in range(2):
        loss = run()
    if mode == "memory":
        from smoothce.compiler.measure.memory import peak_cpu

        losses = []
        peak, how = peak_cpu(lambda: losses.append(run()), clear)
        return {"peak_mib": peak / 2**20, "memory_method": how, "loss": float(losses[0])}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "times_s": times, "loss": float(loss)}


def spawn(script: str, method: str, mode: str, argv: list) -> dict:
    """``script --worker method --mode mode *argv`` in a fresh process: its worker_result."""
    from smoothce.compiler.measure.memory import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV} if mode == "memory" else dict(os.environ)
    cmd = [sys.executable, script, "--worker", method, "--mode", mode, *argv]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method} ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(script: str, methods: list, argv: list, rounds: int, config: dict, json_path=None) -> list:
    """Peak and times of every method (script's workers, given argv), the table on stdout and,
    with ``json_path``, the record (machine, versions, load averages, config, rows). Returns the rows."""
    import torch

    from benchmarks.runner import environment

    record = environment("cpu")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    peaks = {m: spawn(script, m, "memory", argv)["peak_mib"] for m in methods}
    best, samples, losses = {m: math.inf for m in methods}, {m: [] for m in methods}, {}
    for _ in range(rounds):
        for m in methods:
            out = spawn(script, m, "time", argv)
            best[m] = min(best[m], out["time_s"])
            samples[m] += out["times_s"]
            losses[m] = out["loss"]
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    typical = {m: statistics.quantiles(samples[m], n=4, method="inclusive") for m in methods}
    base = "inductor" if "inductor" in methods else methods[0]
    width = max(15, *(len(m) + 2 for m in methods))
    print(f"{'method':<{width}}{'peak MiB':>10}{'vs ' + base:>13}{'best s':>9}{'vs ' + base:>13}"
          f"{'median s':>10}{'IQR s':>14}{'vs ' + base:>13}{'loss':>12}")
    rows = []
    for m in methods:
        q1, median, q3 = typical[m]
        peak_share = f"{peaks[m] / peaks[base]:.1%}" if peaks[base] else "-"  # a tiny step may show no peak
        print(f"{m:<{width}}{peaks[m]:>10.1f}{peak_share:>13}{best[m]:>9.3f}{best[m] / best[base]:>12.2f}x"
              f"{median:>10.3f}{f'{q1:.3f}-{q3:.3f}':>14}{median / typical[base][1]:>12.2f}x{losses[m]:>12.6f}")
        rows.append({"method": m, "peak_mib": peaks[m], "best_s": best[m], "median_s": median, "iqr_s": [q1, q3],
                     "times_s": samples[m], "loss": losses[m]})
    if json_path:
        record.update(loadavg_end=os.getloadavg(), rows=rows, baseline=base,
                      config={**config, "rounds": rounds, "threads": torch.get_num_threads()})
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {json_path}")
    return rows


def step_parser(doc: str, methods: tuple) -> argparse.ArgumentParser:
    """The options every step script takes (its own sizes are added by the script)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed steps per process (median)")
    p.add_argument("--rounds", type=int, default=2, help="timing processes per method (best kept)")
    p.add_argument("--methods", default=",".join(methods))
    p.add_argument("--busy", type=int, default=0, metavar="K", help="other processes kept spinning throughout")
    p.add_argument("--json", metavar="PATH", help="also write the figures, the machine and the versions to PATH")
    p.add_argument("--worker", choices=methods)
    p.add_argument("--mode", choices=("memory", "time"), default="time")
    return p


def run_steps(script: str, args, sizes: dict, header: str) -> list:
    """Every method of ``args`` measured (``sizes``: the script's own options, passed to its
    workers and recorded), with ``args.busy`` other processes spinning; returns the rows."""
    import torch

    from benchmarks.load import busy

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, "
          f"{args.busy} other process(es) kept busy")
    print(header)
    argv = [a for k, v in sizes.items() for a in (f"--{k}", str(v))] + ["--repeats", str(args.repeats)]
    with busy(args.busy):
        return measure(script, args.methods.split(","), argv, args.rounds,
                       {**sizes, "repeats": args.repeats, "busy_processes": args.busy}, args.json)
