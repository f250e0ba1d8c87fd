"""One training step of an LM head + label-smoothed cross-entropy on CPU: peak memory and time.

    python benchmarks/linear_cross_entropy_step.py [--n 4096 --d 256 --v 32768 --eps 0.1] [--busy 2] [--json F]

Step: loss = CE(hidden @ weight.T, target, label_smoothing=eps); loss.backward() with gradients
for hidden and weight (no bias), as when training a head. Methods:

    inductor   torch.compile of the unfused step (F.linear + F.cross_entropy), the baseline
    eager      the unfused step in eager PyTorch
    fused      smoothce's fused_linear_cross_entropy, eager (the op runs chunk by chunk)
    fused+compile   the same call inside torch.compile (Inductor)

Every method runs in a fresh subprocess. Peak memory: one step after the warm-up (compiling)
steps, by smoothce.compiler.measure.memory.peak_cpu (the resident set's high-water mark above its start,
with glibc's mmap threshold pinned so freed buffers go back to the OS). Time: several steps per
process in other processes, with the default allocator; methods alternate over rounds. Reported:
the best round's median, and the median and interquartile range of all timed steps, with the load
average before and after. ``--busy K`` keeps K other processes spinning on the CPU throughout
(benchmarks/load.py).
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

METHODS = ("inductor", "eager", "fused", "fused+compile")


def _make_step(method: str, eps: float, v: int):
    import torch
    import torch.nn.functional as F

    if method in ("inductor", "eager"):
        def step(h, w, y):
            return F.cross_entropy(F.linear(h, w), y, label_smoothing=eps)
    else:
        from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy

        def step(h, w, y):
            return fused_linear_cross_entropy(h, w, None, y, label_smoothing=eps)
    if method in ("inductor", "fused+compile"):
        step = torch.compile(step, fullgraph=True)
    return step


def worker(method: str, n: int, d: int, v: int, eps: float, mode: str, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) / d**0.5).requires_grad_()
    y = torch.randint(0, v, (n,))
    step = _make_step(method, eps, v)

    def run():
        h.grad = None
        w.grad = None
        loss = step(h, w, y)
        loss.backward()
        return loss.detach()

    for _ in range(2):  # compile and warm up
        loss = run()
    if mode == "memory":
        from smoothce.compiler.measure.memory import peak_cpu

        def clear():
            h.grad = w.grad = None

        losses = []
        peak, how = peak_cpu(lambda: losses.append(run()), clear)
        return {"peak_mib": peak / 2**20, "memory_method": how, "loss": float(losses[0])}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "times_s": times, "loss": float(loss)}


def _spawn(method, args, mode) -> dict:
    from smoothce.compiler.measure.memory import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV} if mode == "memory" else dict(os.environ)
    cmd = [sys.executable, __file__, "--worker", method, "--mode", mode, "--n", str(args.n), "--d", str(args.d),
           "--v", str(args.v), "--eps", str(args.eps), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method} ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per process (median)")
    p.add_argument("--rounds", type=int, default=2, help="timing processes per method (best kept)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--busy", type=int, default=0, metavar="K", help="other processes kept spinning throughout")
    p.add_argument("--json", metavar="PATH", help="also write the figures, the machine and the versions to PATH")
    p.add_argument("--worker", choices=METHODS)
    p.add_argument("--mode", choices=("memory", "time"), default="time")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.d, args.v, args.eps, args.mode, args.repeats)))
        return

    import torch

    if __package__ in (None, ""):  # run as a script: the repository root holds the benchmarks package
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.load import busy

    with busy(args.busy):
        _measure(args, torch)


def _measure(args, torch):
    from benchmarks.runner import environment

    record = environment("cpu")
    logits_mib = args.n * args.v * 4 / 2**20
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, "
          f"{args.busy} other process(es) kept busy")
    print(f"step: Linear({args.d} -> {args.v}, no bias) + CE(label_smoothing={args.eps}), N = {args.n}; "
          f"fp32 logits would be {logits_mib:.0f} MiB")
    methods = args.methods.split(",")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    peaks = {m: _spawn(m, args, "memory")["peak_mib"] for m in methods}
    # Time: methods alternate over rounds, so a busy minute slows every method alike. Reported: the
    # best round's median (the least disturbed), and the median and interquartile range of every
    # timed step of every round (what a shared machine typically gives).
    best, samples, losses = {m: math.inf for m in methods}, {m: [] for m in methods}, {}
    for _ in range(args.rounds):
        for m in methods:
            out = _spawn(m, args, "time")
            best[m] = min(best[m], out["time_s"])
            samples[m] += out["times_s"]
            losses[m] = out["loss"]
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    typical = {m: statistics.quantiles(samples[m], n=4, method="inclusive") for m in methods}
    base = "inductor" if "inductor" in methods else methods[0]
    print(f"{'method':<15}{'peak MiB':>10}{'vs ' + base:>13}{'best s':>9}{'vs ' + base:>13}"
          f"{'median s':>10}{'IQR s':>14}{'vs ' + base:>13}{'loss':>12}")
    rows = []
    for m in methods:
        q1, median, q3 = typical[m]
        peak_share = f"{peaks[m] / peaks[base]:.1%}" if peaks[base] else "-"  # a tiny step may show no peak
        print(f"{m:<15}{peaks[m]:>10.1f}{peak_share:>13}{best[m]:>9.3f}{best[m] / best[base]:>12.2f}x"
              f"{median:>10.3f}{f'{q1:.3f}-{q3:.3f}':>14}{median / typical[base][1]:>12.2f}x{losses[m]:>12.6f}")
        rows.append({"method": m, "peak_mib": peaks[m], "best_s": best[m], "median_s": median, "iqr_s": [q1, q3],
                     "times_s": samples[m], "loss": losses[m]})
    if args.json:
        record.update(loadavg_end=os.getloadavg(), rows=rows, baseline=base, config={
            "n": args.n, "d": args.d, "v": args.v, "eps": args.eps, "rounds": args.rounds, "repeats": args.repeats,
            "busy_processes": args.busy, "threads": torch.get_num_threads()})
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")

if __name__ == "__main__":
    main()
