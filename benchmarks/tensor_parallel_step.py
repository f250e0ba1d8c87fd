"""A tensor-parallel LM head step on CPU processes joined by gloo: per-rank peak memory, time and
bytes communicated per row.

    python benchmarks/tensor_parallel_step.py [--tp 2 --n 2048 --d 256 --v 32768] [--busy K] [--json F]

Every rank holds the hidden states (N, D) and its rows of the head's weight: the head is
``ColwiseParallel(use_local_output=False)``, so its logits are a DTensor sharded on the vocabulary
(N x V / tp per rank). The step is ``F.cross_entropy(logits, labels, label_smoothing=eps)`` and its
backward (gradients for the hidden states and the head), compiled. Methods:

    smoothce        backend="smoothce": the head and the loss become the fused column-parallel head
                    (kernels/linear_vocab_parallel.py): no rank's logits beyond a chunk of rows, one
                    all-gather of a few floats per row, the logits recomputed chunk by chunk in
                    backward
    smoothce_logits backend="smoothce" with options={"smoothce.fuse_linear": False}: the head stays
                    and the loss becomes the vocab-parallel op on its logits (kernels/vocab_parallel.py)
    gathered        Inductor on the same code: DTensor all-gathers the logits (N x V per rank) and
                    computes F.cross_entropy on them
    loss_parallel   Inductor inside PyTorch's loss_parallel() with plain labels (eps 0 only: it
                    refuses label smoothing)

Each (method, eps) runs in fresh processes. Peak: one step after two compiling steps, by
smoothce.compiler.measure.memory.peak_cpu, the largest over the ranks. Time: the slowest rank's
time of each of ``--repeats`` steps (ranks in step through a barrier), median. Bytes: what a rank
puts into collectives during one step (the profiler's input shapes of the c10d and functional
collective ops, 4-byte floats), per row, by collective; the backward's all-reduce of the hidden
states' gradient (N x D, the head's input is replicated) is the same for every method.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import sys
import time

METHODS = ("smoothce", "smoothce_logits", "gathered", "loss_parallel")


def _step_fn(method: str, eps: float, mesh, model):
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import loss_parallel

    if method == "loss_parallel":
        def loss_fn(h, y):
            return F.cross_entropy(model(h), y, label_smoothing=eps)
    else:
        def loss_fn(h, y):
            return F.cross_entropy(model(h), DTensor.from_local(y, mesh, [Replicate()], run_check=False),
                                   label_smoothing=eps)
    if method.startswith("smoothce"):
        compiled = torch.compile(loss_fn, backend="smoothce",
                                 options={"smoothce.fuse_linear": method == "smoothce"})
    else:
        compiled = torch.compile(loss_fn, backend="inductor")
    within = loss_parallel if method == "loss_parallel" else contextlib.nullcontext

    def step(h, y):
        with within():
            loss = compiled(h, y)
            loss.backward()
        return loss.full_tensor().detach()

    return step


def _collective_bytes(prof) -> dict:
    """Bytes put into each kind of collective (first input's shape, 4-byte floats), by op name."""
    out: dict = {}
    for e in prof.events():
        name = e.name
        if not (name.startswith("_c10d_functional::") or name.startswith("c10d::")) or "wait" in name:
            continue
        shapes = [s for s in (e.input_shapes or []) if s]
        if not shapes:
            continue
        out[name] = out.get(name, 0) + 4 * math.prod(shapes[0])
    return out


def _rank(rank: int, args, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.tp,
                            timeout=datetime.timedelta(seconds=600))
    try:
        results.put((rank, _measure_rank(args)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        import traceback

        results.put((rank, {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}))
    finally:
        dist.destroy_process_group()


def _measure_rank(args) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from torch.profiler import profile, record_function

    from smoothce.compiler.backend import rewrite_pass
    from smoothce.compiler.measure.memory import peak_cpu

    mesh = init_device_mesh("cpu", (args.tp,))
    torch.manual_seed(0)
    head = torch.nn.Linear(args.d, args.v, bias=False)
    model = parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
    h = torch.randn(args.n, args.d, requires_grad=True)
    y = torch.randint(0, args.v, (args.n,))
    step = _step_fn(args.method, args.eps, mesh, model)

    def clear():
        h.grad = None
        model.weight.grad = None

    for _ in range(2):  # compile and warm up
        clear()
        loss = step(h, y)
    with profile(record_shapes=True) as prof:
        clear()
        with record_function("step"):
            step(h, y)
    sent = _collective_bytes(prof)
    dist.barrier()
    peak, how = peak_cpu(lambda: step(h, y), clear)
    times = []
    for _ in range(args.repeats):
        clear()
        dist.barrier()
        t0 = time.perf_counter()
        step(h, y)
        dist.barrier()  # the slowest rank's time
        times.append(time.perf_counter() - t0)
    return {"peak_mib": peak / 2**20, "memory_method": how, "times_s": times, "loss": float(loss),
            "sent_bytes": sent, "rewritten": [m.family for m in rewrite_pass.matches]}


def _run(method: str, eps: float, args) -> dict:
    """Every rank's figures for one method, from fresh processes (MALLOC_ENV set before they start)."""
    import torch.multiprocessing as mp

    from smoothce.compiler.measure.memory import MALLOC_ENV

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)  # glibc reads these when a process starts: the ranks', not ours
    try:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        rank_args = argparse.Namespace(**{**vars(args), "method": method, "eps": eps})
        procs = [ctx.Process(target=_rank, args=(r, rank_args, port, results)) for r in range(args.tp)]
        for p in procs:
            p.start()
        out = dict(results.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [r["error"] for r in out.values() if "error" in r]
    if errors:
        raise RuntimeError(f"{method}, eps {eps}:\n{errors[0]}")
    return {r: out[r] for r in range(args.tp)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2, help="processes (the tensor-parallel degree)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--eps", default="0,0.1", help="label smoothing values, comma separated")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--busy", type=int, default=0, metavar="K", help="other processes kept spinning throughout")
    p.add_argument("--json", metavar="PATH", help="also write the figures, the machine and the versions to PATH")
    args = p.parse_args(argv)

    import torch

    if __package__ in (None, ""):  # run as a script: the repository root holds the benchmarks package
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.load import busy
    from benchmarks.runner import environment

    record = environment("cpu")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.tp} ranks x {args.threads} thread(s), "
          f"{args.busy} other process(es) kept busy; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"step: ColwiseParallel Linear({args.d} -> {args.v}, no bias) + CE, N = {args.n}; a rank's fp32 "
          f"logits {args.n * args.v / args.tp * 4 / 2**20:.0f} MiB, all of them {args.n * args.v * 4 / 2**20:.0f} MiB")
    rows = []
    with busy(args.busy):
        for eps in (float(e) for e in args.eps.split(",")):
            for method in args.methods.split(","):
                if method == "loss_parallel" and eps != 0.0:
                    continue  # loss_parallel() refuses label smoothing
                ranks = _run(method, eps, args)
                steps = [max(r["times_s"][i] for r in ranks.values()) for i in range(args.repeats)]
                sent = ranks[0]["sent_bytes"]
                rows.append({"method": method, "eps": eps, "peak_mib": max(r["peak_mib"] for r in ranks.values()),
                             "median_s": statistics.median(steps), "times_s": steps, "loss": ranks[0]["loss"],
                             "sent_bytes_per_row": {k: v / args.n for k, v in sent.items()},
                             "rewritten": ranks[0]["rewritten"], "memory_method": ranks[0]["memory_method"]})
                r = rows[-1]
                comm = ", ".join(f"{k.split('::')[1]} {v:.0f}" for k, v in sorted(r["sent_bytes_per_row"].items()))
                print(f"eps {eps:<4} {method:<15} peak {r['peak_mib']:8.1f} MiB  median {r['median_s']:.3f} s  "
                      f"loss {r['loss']:.6f}  bytes sent per row: {comm or 'none'}  rewritten: {r['rewritten']}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        record.update(loadavg_end=os.getloadavg(), rows=rows, config={
            "tp": args.tp, "n": args.n, "d": args.d, "v": args.v, "repeats": args.repeats, "threads": args.threads,
            "busy_processes": args.busy})
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
