"""One training step of an LM head + label-smoothed cross-entropy on CPU: peak memory and time.

    python benchmarks/linear_cross_entropy_step.py [--n 4096 --d 256 --v 32768 --eps 0.1] [--busy 2] [--json F]

Step: loss = CE(hidden @ weight.T, target, label_smoothing=eps); loss.backward() with gradients
for hidden and weight (no bias), as when training a head. Methods:

    inductor   torch.compile of the unfused step (F.linear + F.cross_entropy), the baseline
    eager      the unfused step in eager PyTorch
    fused      smoothce's fused_linear_cross_entropy, eager (the op runs chunk by chunk)
    fused+compile   the same call inside torch.compile (Inductor)

Every method runs in fresh subprocesses; benchmarks/cpu_step.py says how peak and time are
measured. ``--busy K`` keeps K other processes spinning on the CPU throughout (benchmarks/load.py).
"""
from __future__ import annotations

import json
import os
import sys

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

    from benchmarks.cpu_step import worker_result

    torch.manual_seed(0)
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) / d**0.5).requires_grad_()
    y = torch.randint(0, v, (n,))
    step = _make_step(method, eps, v)

    def clear():
        h.grad = w.grad = None

    def run():
        clear()
        loss = step(h, w, y)
        loss.backward()
        return loss.detach()

    return worker_result(run, clear, mode, repeats)


def main(argv=None):
    if __package__ in (None, ""):  # run as a script: the repository root holds the benchmarks package
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.cpu_step import run_steps, step_parser

    p = step_parser(__doc__, METHODS)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--eps", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.d, args.v, args.eps, args.mode, args.repeats)))
        return
    run_steps(__file__, args, {"n": args.n, "d": args.d, "v": args.v, "eps": args.eps},
              f"step: Linear({args.d} -> {args.v}, no bias) + CE(label_smoothing={args.eps}), N = {args.n}; "
              f"fp32 logits would be {args.n * args.v * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
