"""One training step of an LM head + label-smoothed cross-entropy on CPU: peak memory and time.

    python benchmarks/linear_cross_entropy_step.py [--n 4096 --d 256 --v 32768 --eps 0.1]

Step: loss = CE(hidden @ weight.T, target, label_smoothing=eps); loss.backward() with gradients
for hidden and weight (no bias), as when training a head. Methods:

    inductor   torch.compile of the unfused step (F.linear + F.cross_entropy), the baseline
    eager      the unfused step in eager PyTorch
    fused      smoothce's fused_linear_cross_entropy, eager (the op runs chunk by chunk)
    fused+compile   the same call inside torch.compile (Inductor)

Every method runs in a fresh subprocess. Peak memory is the RSS high-water mark of one step
minus the RSS before it: warm-up steps (compilation) first, then the high-water mark is reset
through /proc/self/clear_refs. glibc's mmap threshold is pinned so freed buffers go back to the
OS and the high-water mark tracks live memory (otherwise a step could reuse pages freed by the
warm-up and look smaller than it is). Time is the median of several steps in other processes
with the default allocator; methods alternate over rounds and the best round counts.
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


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


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
    import gc

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
    h.grad = w.grad = None
    gc.collect()
    if mode == "memory":
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (VmHWM) to the current RSS
        loss = run()
        peak = _rss_kib("VmHWM")
        return {"peak_mib": (peak - before) / 1024, "loss": float(loss)}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "times_s": times, "loss": float(loss)}


def _spawn(method, args, mode) -> dict:
    env = dict(os.environ)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
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
    p.add_argument("--worker", choices=METHODS)
    p.add_argument("--mode", choices=("memory", "time"), default="time")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.d, args.v, args.eps, args.mode, args.repeats)))
        return

    import torch

    logits_mib = args.n * args.v * 4 / 2**20
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}")
    print(f"step: Linear({args.d} -> {args.v}, no bias) + CE(label_smoothing={args.eps}), N = {args.n}; "
          f"fp32 logits would be {logits_mib:.0f} MiB")
    methods = args.methods.split(",")
    peaks = {m: _spawn(m, args, "memory")["peak_mib"] for m in methods}
    # Time: methods alternate over rounds and each keeps its best round's median, so a busy
    # machine slows every method alike instead of whichever ran during the busy minute.
    times, losses = {m: math.inf for m in methods}, {}
    for _ in range(args.rounds):
        for m in methods:
            out = _spawn(m, args, "time")
            times[m] = min(times[m], out["time_s"])
            losses[m] = out["loss"]
    rows = {m: (peaks[m], times[m], losses[m]) for m in methods}
    base_peak, base_time, base_loss = rows.get("inductor", next(iter(rows.values())))
    print(f"{'method':<15}{'peak MiB':>10}{'vs inductor':>13}{'time s':>9}{'vs inductor':>13}{'loss':>12}")
    for method, (peak, t, loss) in rows.items():
        print(f"{method:<15}{peak:>10.1f}{peak / base_peak:>12.1%}{t:>9.3f}{t / base_time:>12.2f}x"
              f"{loss:>12.6f}")


if __name__ == "__main__":
    main()
