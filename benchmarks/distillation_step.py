"""One training step of a loss against a distribution on CPU: peak memory and time.

    python benchmarks/distillation_step.py --case distill|mixup|head [--n 4096 --v 32768 --d 256] [--busy 2] [--json F]

Cases (fp32; the student's tensors require grad, the teacher's and the targets do not):

    distill  student logits s and teacher logits t (N, V), labels y with every 7th ignored:
             alpha CE(s, y) + (1 - alpha) T**2 KL(softmax(t / T) || softmax(s / T)), batchmean,
             T = 2, alpha = 0.5 (Hinton distillation, as the PyTorch tutorial and DistilBERT write it)
    mixup    a classifier's logits x (N, V) against timm's mixup target (two smoothed one-hots
             mixed by lam, given as data): timm's SoftTargetCrossEntropy, sum(-t log_softmax(x)).mean()
    head     distill's loss on the logits of two heads: s = hs @ ws.T (hs (N, D), ws (V, D), both
             trained) and t = ht @ wt.T computed under torch.no_grad() (the teacher's)

Methods:

    inductor   torch.compile of the step as written, the baseline
    eager      the step in eager PyTorch
    smoothce   torch.compile(backend="smoothce") of the same step: the loss rewritten into one op
               (with `head`, both heads fused into it: neither N x V tensor exists)
    op         the smoothce function called by hand, eager: fused_soft_cross_entropy (distill,
               mixup), fused_linear_soft_cross_entropy with the teacher's head (head)

Every method runs in fresh subprocesses; benchmarks/cpu_step.py says how peak and time are
measured. ``--busy K`` keeps K other processes spinning on the CPU throughout (benchmarks/load.py).
"""
from __future__ import annotations

import json
import os
import sys

CASES = ("distill", "mixup", "head")
METHODS = ("inductor", "eager", "smoothce", "op")
T, ALPHA, EPS = 2.0, 0.5, 0.1


def _losses():
    import torch.nn.functional as F

    def hinton(s, t, y):
        kd = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T ** 2
        return ALPHA * F.cross_entropy(s, y) + (1 - ALPHA) * kd

    def soft_target_ce(x, target):  # timm's SoftTargetCrossEntropy
        return (-target * F.log_softmax(x, dim=-1)).sum(dim=-1).mean()

    return hinton, soft_target_ce


def _make_step(case: str, method: str):
    """(step taking the case's inputs and returning the loss)."""
    import torch
    import torch.nn.functional as F

    hinton, soft_target_ce = _losses()
    if method == "op":
        from smoothce.kernels.linear_soft_cross_entropy import fused_linear_soft_cross_entropy
        from smoothce.kernels.soft_cross_entropy import fused_soft_cross_entropy

        words = dict(scale=ALPHA, target_kind="logits", target_logit_scale=1 / T, soft_logit_scale=1 / T,
                     soft_scale=(1 - ALPHA) * T * T, soft_kl=True)
        if case == "distill":
            # KL's batchmean is the op's 'mean' over every row, the CE's over the kept labels
            return lambda s, t, y: fused_soft_cross_entropy(s, t, y, target_rows=torch.ones_like(y, dtype=torch.bool),
                                                            **words)
        if case == "mixup":
            return lambda x, target: fused_soft_cross_entropy(x, target)
        return lambda hs, ws, ht, wt, y: fused_linear_soft_cross_entropy(
            hs, ws, None, None, y, teacher_hidden=ht, teacher_weight=wt,
            target_rows=torch.ones_like(y, dtype=torch.bool), **words)
    if case == "distill":
        step = hinton
    elif case == "mixup":
        step = soft_target_ce
    else:
        def step(hs, ws, ht, wt, y):
            with torch.no_grad():
                t = F.linear(ht, wt)
            return hinton(F.linear(hs, ws), t, y)
    if method == "inductor":
        return torch.compile(step, fullgraph=True)
    if method == "smoothce":
        return torch.compile(step, backend="smoothce", fullgraph=True)
    return step


def _inputs(case: str, n: int, v: int, d: int):
    """(inputs, the leaves that train)."""
    import torch

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    if case == "head":
        hs = torch.randn(n, d, generator=g).requires_grad_()
        ws = (torch.randn(v, d, generator=g) / d ** 0.5).requires_grad_()
        ht, wt = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d ** 0.5
        return (hs, ws, ht, wt, y), (hs, ws)
    x = (torch.randn(n, v, generator=g) * 2).requires_grad_()
    if case == "distill":
        return (x, torch.randn(n, v, generator=g) * 2, y), (x,)
    # timm's Mixup: smoothed one-hots of the labels and of the flipped batch's, mixed by lam
    y = y.clamp(min=0)
    off, on = EPS / v, 1 - EPS + EPS / v
    y1 = torch.full((n, v), off).scatter_(1, y[:, None], on)
    lam = 0.7
    return (x, y1 * lam + y1.flip(0) * (1 - lam)), (x,)


def worker(case: str, method: str, n: int, v: int, d: int, mode: str, repeats: int) -> dict:
    from benchmarks.cpu_step import worker_result

    inputs, leaves = _inputs(case, n, v, d)
    step = _make_step(case, method)

    def clear():
        for t in leaves:
            t.grad = None

    def run():
        clear()
        loss = step(*inputs)
        loss.backward()
        return loss.detach()

    return worker_result(run, clear, mode, repeats)


def main(argv=None):
    if __package__ in (None, ""):  # run as a script: the repository root holds the benchmarks package
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.cpu_step import run_steps, step_parser

    p = step_parser(__doc__, METHODS)
    p.add_argument("--case", choices=CASES, default="distill")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--d", type=int, default=256, help="hidden size of both heads (case head)")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.case, args.worker, args.n, args.v, args.d, args.mode, args.repeats)))
        return
    run_steps(__file__, args, {"case": args.case, "n": args.n, "v": args.v, "d": args.d},
              f"case {args.case}: N = {args.n}, V = {args.v}" + (f", D = {args.d}" if args.case == "head" else "")
              + f", T = {T}, alpha = {ALPHA}; one fp32 N x V tensor is {args.n * args.v * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
