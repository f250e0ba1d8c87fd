"""What a benchmarked method is, and the availability checks the cases share.

A method builds, for one problem, a loss function of the case's positional inputs. It may be
unavailable (a module not installed, a config this torch lacks, a kernel that needs CUDA): then
it reports why, and the row says so instead of a number.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Callable

import torch

from benchmarks.harness import Problem


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # the --methods key and the JSON "method"
    label: str  # legend text
    build: Callable[[Problem], Callable]  # problem -> loss_fn(*inputs.args)
    unavailable: Callable[[Problem], str | None] = lambda p: None  # why it cannot run, or None
    # Given the warnings of the first call, a note to attach to the row (e.g. "falls back").
    diagnose: Callable[[Problem, list[str]], str | None] = lambda p, warnings: None
    # After the first call: a note from the method's own bookkeeping (e.g. rewrites found).
    inspect: Callable[[Problem], str | None] = lambda p: None
    # The method writes into its inputs (a gradient into the logits' buffer): the inputs are
    # rebuilt after it, so the methods after it see the same values.
    overwrites_inputs: bool = False


@functools.lru_cache(maxsize=None)
def import_error(module: str) -> str | None:
    """Why ``module`` cannot be imported ("not installed", or the import's error), or None."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return "not installed"
        return f"not importable: {type(exc).__name__}: {exc}"[:160]
    except Exception as exc:  # a peer's import can fail in many ways (missing CUDA libraries, ...)
        return f"not importable: {type(exc).__name__}: {exc}"[:160]
    return None


def has_module(name: str) -> bool:
    return import_error(name) is None


def needs_cuda(p: Problem) -> str | None:
    return None if p.device == "cuda" else "needs CUDA"


def peer_unavailable(module: str, p: Problem) -> str | None:
    """A GPU peer: unavailable when not importable or not on CUDA (checked in that order, so a
    CPU run still says whether the peer is installed)."""
    return import_error(module) or needs_cuda(p)


def liger_unavailable(p: Problem) -> str | None:
    return peer_unavailable("liger_kernel.transformers", p)


def quack_unavailable(p: Problem) -> str | None:
    return peer_unavailable("quack.cross_entropy", p)


def smoothce_backend_unavailable(p: Problem) -> str | None:
    return None if has_module("smoothce.compiler.backend") else "n/a (backend not built)"


def auto_chunker_key() -> str | None:
    """Inductor's opt-in chunking pass: ``auto_chunker.enable`` on 2.13; older trees spelled the
    section ``AutoChunker``. None when this torch has neither."""
    import torch._inductor.config as inductor_config

    keys = getattr(inductor_config, "_config", {})
    for key in ("auto_chunker.enable", "AutoChunker.enable"):
        if key in keys:
            return key
    return None


def auto_chunker_unavailable(p: Problem) -> str | None:
    return None if auto_chunker_key() else f"n/a (no auto_chunker in torch {torch.__version__})"


def compile_module(module: torch.nn.Module, backend: str, options: dict | None = None) -> Callable:
    # dynamic=False: every shape gets its own specialised code, as a training run with fixed
    # shapes would (and automatic-dynamic recompiles do not leak between rows).
    return torch.compile(module, backend=backend, dynamic=False, options=options)


def smoothce_rewrites(p: Problem) -> str | None:
    """What the smoothce backend rewrote in the graphs compiled since the last call (no rewrite
    means the row measured plain Inductor)."""
    try:
        from smoothce.compiler.backend import rewrite_pass
    except ImportError:
        return None
    results = list(getattr(rewrite_pass, "results", None) or [])
    rewrite_pass.clear()
    matches = [m for r in results for m in r.matches]
    if not matches:
        return "0 rewrites: measured plain Inductor"
    # A loss on a linear head's output may be rewritten together with the matmul (fused linear
    # cross-entropy): say so, since it changes what the row measures.
    head = any(str(name).startswith("linear") for m in matches for name in m.replaced)
    families = ", ".join(sorted({m.family for m in matches}))
    return f"rewrote {families}" + (" + head matmul" if head else "")
