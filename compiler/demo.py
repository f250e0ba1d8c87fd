"""``python -m smoothce demo``: a tiny language model trained with a hand-written label-smoothed
loss, compiled with ``backend="smoothce"`` and with plain Inductor, side by side.

Each backend trains in a fresh Python process (same seed, same data), so compile caches and
memory of one run cannot leak into the other. Peak memory is the peak of tensor memory allocated
during one training step above what was allocated when it started: on CUDA from
``torch.cuda.max_memory_allocated``, on CPU from the allocation events of the torch profiler
(``profile_memory=True``; allocator caching and Python objects are not counted), measured in an
extra step after the timed ones so the profiler does not slow those.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

# Runs of the built-in model; the worker prints one JSON line starting with this marker.
_RESULT_MARK = "SMOOTHCE_DEMO_RESULT "


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=10, help="training steps per backend (default 10)")
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
    from smoothce.compiler.cli import CliError

    for name in ("steps", "vocab", "dim", "seq", "batch"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.steps < 2:
        raise CliError(f"--steps must be at least 2 (the first step compiles), got {args.steps}")
    if not 0.0 <= args.eps < 1.0:
        raise CliError(f"--eps must be in [0, 1), got {args.eps}")
    if args.device not in ("auto", "cpu", "cuda"):
        raise CliError(f"--device must be cpu, cuda or auto, got {args.device!r}")


# --------------------------------------------------------------------------------------------
# The model and its loss
# --------------------------------------------------------------------------------------------

PAD = 0


def smoothed_cross_entropy(logits, target, eps: float):
    """Label-smoothed cross-entropy written out by hand, padding masked, as training scripts do.

    (1 - eps) * nll + eps * (mean over classes of -log p): F.cross_entropy's eps/V convention.
    """
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    smooth = -logprobs.mean(dim=-1)
    loss = (1.0 - eps) * nll + eps * smooth
    mask = (target != PAD).float()
    return (loss * mask).sum() / mask.sum()


def _build(args, device):
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.heads = 2 if dim % 2 == 0 else 1

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + self.mlp(self.norm2(x))

    class TinyLM(nn.Module):
        def __init__(self, vocab, dim, seq):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.zeros(seq, dim))
            self.block = Block(dim)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)

        def forward(self, tokens):
            x = self.embed(tokens) + self.pos[: tokens.shape[1]]
            return self.head(self.norm(self.block(x)))

    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.dim, args.seq).to(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(1, args.vocab, (args.batch, args.seq + 1), generator=gen)
    # Ragged sequences: each ends in padding from a random length on, as a batch of documents does.
    lengths = torch.randint(args.seq // 2, args.seq + 2, (args.batch, 1), generator=gen)
    tokens[torch.arange(args.seq + 1).expand(args.batch, -1) >= lengths] = PAD
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    return model, inputs, targets


def make_loss_fn(eps: float):
    def train_loss(model, inputs, targets):
        logits = model(inputs)
        return smoothed_cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), eps)

    return train_loss


# --------------------------------------------------------------------------------------------
# Progress and memory
# --------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, redrawn in place on a terminal, one summary otherwise."""

    def __init__(self, total: int, label: str, stream=None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.note = ""

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.note = note
        if self.tty:
            self._draw("\r")

    def _draw(self, prefix: str, end: str = "") -> None:
        filled = self.width * self.done // max(1, self.total)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label:<20} [{bar}] {self.done}/{self.total}  {self.note}"
        clear = "\033[K" if self.tty else ""  # erase what a longer previous line left behind
        self.stream.write(prefix + line + clear + end)
        self.stream.flush()

    def close(self) -> None:
        self._draw("\r" if self.tty else "", "\n")


@contextlib.contextmanager
def _quiet_stderr_fd():
    # The profiler's C++ side prints start/stop lines straight to fd 2; keep the terminal clean.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_step_peak(step) -> int:
    """Peak bytes of CPU tensor memory allocated during `step()` above its start."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type().name == "CPU":
            live += e.nbytes()  # negative on free
            peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------------------------
# One backend, in this process
# --------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from smoothce.compiler.cli import CliError

        raise CliError("--device cuda, but torch sees no CUDA device")
    return name


def run_worker(args) -> dict:
    """Train with one backend; returns losses, step times and peak memory."""
    import torch

    device = _device(args.device)
    model, inputs, targets = _build(args, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_fn = torch.compile(make_loss_fn(args.eps), backend=args.worker)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        loss = step_fn(model, inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses, times = [], []
    bar = Progress(args.steps, args.worker)
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach().double().cpu().item())  # after timing: one sync per step is fine here
        bar.update(1, f"loss {losses[-1]:.4f}  {times[-1] * 1e3:.0f} ms")
    bar.close()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        memory = torch.cuda.max_memory_allocated() - base
        memory_kind = "CUDA peak allocated during one step above its start (max_memory_allocated)"
    else:
        memory = _cpu_step_peak(step)
        memory_kind = "CPU tensor memory allocated during one step above its start (torch profiler)"
    return {
        "backend": args.worker,
        "device": device,
        "losses": losses,
        "first_step_s": times[0],
        "step_ms": statistics.median(times[1:]) * 1e3,
        "peak_bytes": memory,
        "peak_kind": memory_kind,
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
    """Each backend compiles with an Inductor cache of its own.

    With one shared cache, the second backend finds the model's non-loss kernels already built by
    the first and its "compile + step 1" looks several seconds cheaper than it is. Separate
    directories (kept between runs) make both cold the first time and both warm after.
    """
    from smoothce.compiler import compat

    env = dict(os.environ)
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

    ok = [r for r in results if "error" not in r]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["backend"], "-", "-", "-", "-", r["error"]])
            continue
        rows.append([
            r["backend"],
            f"{r['losses'][0]:.5f}",
            f"{r['losses'][-1]:.5f}",
            f"{r['first_step_s']:.1f} s",
            f"{r['step_ms']:.1f} ms",
            _mib(r["peak_bytes"]),
        ])
    cols = [Column("backend", "fixed"), Column("loss first", "fixed"), Column("loss last", "fixed"),
            Column("compile+step 1", "fixed"), Column("step (median)", "fixed"), Column("peak memory", min_width=12)]
    out = [table(cols, rows, width)]
    kinds = sorted({r["peak_kind"] for r in ok})
    if kinds:
        out.append("  peak memory: " + "; ".join(kinds))
    if len(ok) >= 2:
        a, b = ok[0], ok[1]
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        out.append(f"  max |loss difference| over {len(a['losses'])} steps, "
                   f"{a['backend']} vs {b['backend']}: {diff:.2e}")
        if b["peak_bytes"] > 0 and b["step_ms"] > 0:
            out.append(f"  {a['backend']} / {b['backend']}: peak memory {a['peak_bytes'] / b['peak_bytes']:.2f}x, "
                       f"step time {a['step_ms'] / b['step_ms']:.2f}x")
    return "\n".join(out)


def main(args) -> int:
    _validate(args)
    if args.worker:
        result = run_worker(args)
        print(_RESULT_MARK + json.dumps(result), flush=True)
        return 0

    import torch

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
        print(report.render(width, code=args.verbose))
    except Exception as e:  # the comparison below is still worth showing
        print(f"inspection failed: {type(e).__name__}: {e}")
    print()
    torch._dynamo.reset()

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results = [_run_backend(args, b) for b in backends]
    print(_comparison(results, width))
    return 0 if all("error" not in r for r in results) else 1
