"""``python -m smoothce demo``: a tiny language model trained with a hand-written label-smoothed
loss, compiled with ``backend="smoothce"`` and with plain Inductor, side by side.

Each backend trains in a fresh Python process (same seed, same data, an Inductor cache of its
own), so compile caches and memory of one run cannot leak into the other. Step times are the
median and interquartile range of every step after the first (which compiles); a ratio of two
medians is printed only when both spreads allow it (:mod:`smoothce.compiler.measure.timing`). Peak memory
is one extra step after the timed ones (:mod:`smoothce.compiler.measure.memory`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

from smoothce.compiler.errors import UsageError

# The worker prints its result as one JSON line starting with this marker.
_RESULT_MARK = "SMOOTHCE_DEMO_RESULT "


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=30,
                   help="training steps per backend; the first compiles, the rest are timed (default 30)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present; default)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size V (default 1024)")
    p.add_argument("--dim", type=int, default=64, help="model width (default 64)")
    p.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--eps", type=float, default=0.1, help="label smoothing (default 0.1)")
    p.add_argument(
        "--backends",
        default="smoothce,inductor",
        help="comma-separated torch.compile backends to compare (default smoothce,inductor)",
    )
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", metavar="BACKEND", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="print the graph code in the report")


def _validate(args) -> None:
    for name in ("steps", "vocab", "dim", "seq", "batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.steps < 2:
        raise UsageError(f"--steps must be at least 2 (the first step compiles), got {args.steps}")
    if args.seq < 2:
        raise UsageError(f"--seq must be at least 2 (sequences are padded from half their length), got {args.seq}")
    if not 0.0 <= args.eps < 1.0:
        raise UsageError(f"--eps must be in [0, 1), got {args.eps}")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or auto, got {args.device!r}")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device")
    return name


def _build(args, device):
    from smoothce.compiler.measure.tiny_lm import TinyLM

    return TinyLM.build(device, vocab=args.vocab, dim=args.dim, batch=args.batch, seq=args.seq, seed=args.seed)


def make_loss_fn(eps: float):
    """The step the demo compiles: the model's logits into the hand-written smoothed loss."""
    from smoothce.compiler.measure.tiny_lm import smoothed_cross_entropy

    def train_loss(model, inputs, targets):
        logits = model(inputs)
        return smoothed_cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), eps)

    return train_loss


def _ms(spread) -> tuple[str, str]:
    """('12.3 ms', '11.9-13.0 ms'): median and IQR as the progress bar and the table both show them."""
    return f"{spread.median * 1e3:.1f} ms", f"{spread.q1 * 1e3:.1f}-{spread.q3 * 1e3:.1f} ms"


# --------------------------------------------------------------------------------------------
# One backend, in this process
# --------------------------------------------------------------------------------------------


def run_worker(args) -> dict:
    """Train with one backend; returns losses, step times and peak memory."""
    import torch

    from smoothce.compiler.measure.memory import peak_cpu, peak_cuda
    from smoothce.compiler.measure.progress import Progress
    from smoothce.compiler.measure.timing import Spread

    device = _device(args.device)
    model, inputs, targets = _build(args, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_fn = torch.compile(make_loss_fn(args.eps), backend=args.worker)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        loss = step_fn(model, inputs, targets)
        loss.backward()
        opt.step()
        return loss

    def clear():
        opt.zero_grad(set_to_none=True)

    losses, times = [], []
    bar = Progress(args.steps, f"{args.worker:<18}")
    bar.show("compiling")
    for _ in range(args.steps):
        clear()
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach().double().cpu().item())  # after timing: one sync per step is fine here
        timed = times[1:]
        note = f"loss {losses[-1]:.4f}  " + ("step {} (IQR {})".format(*_ms(Spread.of(timed))) if timed else "compiled")
        bar.advance(note)
    bar.show(note)  # where a log gets one line, it gets the final one: the table's figures
    bar.close()

    if device == "cuda":
        peak, how = peak_cuda(step, clear), "cuda"
    else:
        peak, how = peak_cpu(step, clear)
    return {
        "backend": args.worker,
        "device": device,
        "losses": losses,
        "first_step_s": times[0],
        "step_s": times[1:],
        "peak_bytes": peak,
        "peak_method": how,
    }


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


def _worker_argv(args, backend: str) -> list[str]:
    argv = [sys.executable, "-m", "smoothce", "demo", "--worker", backend]
    for name in ("steps", "device", "vocab", "dim", "seq", "batch", "eps", "seed"):
        argv += [f"--{name}", str(getattr(args, name))]
    return argv


def _worker_env(backend: str) -> dict:
    """Each backend compiles with an Inductor cache of its own, under the allocator settings the
    CPU peak-memory measurement needs.

    With one shared cache, the second backend finds the model's non-loss kernels already built by
    the first and its "compile + step 1" looks several seconds cheaper than it is. Separate
    directories (kept between runs) make both cold the first time and both warm after.
    """
    from smoothce import compat
    from smoothce.compiler.measure.memory import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV}
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(compat.inductor_cache_dir(), f"smoothce-demo-{backend}")
    return env


def _run_backend(args, backend: str) -> dict:
    proc = subprocess.run(_worker_argv(args, backend), stdout=subprocess.PIPE, stderr=None, text=True,
                          env=_worker_env(backend))
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    return {"backend": backend, "error": f"worker exited with status {proc.returncode}"}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _comparison(results: list[dict], width: int) -> str:
    from smoothce.compiler.render import Column, table
    from smoothce.compiler.measure.memory import describe
    from smoothce.compiler.measure.timing import MAX_RELATIVE_SPREAD, MIN_SAMPLES, Spread, ratio

    ok = [r for r in results if "error" not in r]
    spreads = {r["backend"]: Spread.of(r["step_s"]) for r in ok}
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["backend"], "-", "-", "-", "-", "-", r["error"]])
            continue
        rows.append([
            r["backend"],
            f"{r['losses'][0]:.5f}",
            f"{r['losses'][-1]:.5f}",
            f"{r['first_step_s']:.1f} s",
            *_ms(spreads[r["backend"]]),
            _mib(r["peak_bytes"]),
        ])
    cols = [Column("backend", "fixed"), Column("loss first", "fixed"), Column("loss last", "fixed"),
            Column("compile+step 1", "fixed"), Column("step median", "fixed"), Column("IQR", "fixed"),
            Column("peak memory", min_width=12)]
    out = [table(cols, rows, width)]
    kinds = sorted({describe(r["peak_method"]) for r in ok})
    if kinds:
        out.append("  peak memory: " + "; ".join(kinds))
    if len(ok) >= 2:
        a, b = ok[0], ok[1]
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        names = f"{a['backend']} / {b['backend']}"
        out.append(f"  max |loss difference| over {len(a['losses'])} steps, "
                   f"{a['backend']} vs {b['backend']}: {diff:.2e}")
        if a["peak_bytes"] > 0 and b["peak_bytes"] > 0:
            out.append(f"  {names}: peak memory {a['peak_bytes'] / b['peak_bytes']:.2f}x")
        else:
            out.append(f"  {names}: no peak-memory ratio (a peak of 0 bytes: the step fit in memory "
                       "the process already held)")
        sa, sb = spreads[a["backend"]], spreads[b["backend"]]
        r = ratio(sa, sb)
        if r is not None:
            out.append(f"  {names}: step time {r[0]:.2f}x (quartiles: {r[1]:.2f}x-{r[2]:.2f}x)")
        else:
            why = "; ".join(f"{x['backend']}: {s.why_not_comparable()}"
                            for x, s in ((a, sa), (b, sb)) if s.why_not_comparable())
            busy = any(s.n >= MIN_SAMPLES and s.relative > MAX_RELATIVE_SPREAD for s in (sa, sb))
            out.append(f"  {names}: no step-time ratio ({why})" + ("; a busy machine?" if busy else ""))
    footer = [textwrap.fill(line, width, subsequent_indent="    ") for line in out[1:]]
    return "\n".join(out[:1] + footer)


def main(args) -> int:
    _validate(args)
    if args.worker:
        result = run_worker(args)
        print(_RESULT_MARK + json.dumps(result), flush=True)
        return 0

    from smoothce.compiler.inspect import inspect
    from smoothce.compiler.render import terminal_width

    device = _device(args.device)
    width = terminal_width()
    print(
        f"smoothce demo: tiny LM, V={args.vocab}, dim={args.dim}, {args.batch}x{args.seq} tokens, "
        f"hand-written label smoothing eps={args.eps} with a padding mask, {args.steps} steps on {device}\n"
    )
    model, inputs, targets = _build(args, device)
    try:
        report = inspect(make_loss_fn(args.eps), model, inputs, targets)
        print(report.render(width, verbose=args.verbose))
    except Exception as e:  # the comparison below is still worth showing
        print(f"inspection failed: {type(e).__name__}: {e}")
    print(flush=True)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results = [_run_backend(args, b) for b in backends]
    print(_comparison(results, width))
    return 0 if all("error" not in r for r in results) else 1
