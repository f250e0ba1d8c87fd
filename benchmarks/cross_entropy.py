"""Cross-entropy on given logits (N, V): the ``ce`` and ``step`` cases.

Each method computes the mean label-smoothed cross-entropy of the logits, as
``F.cross_entropy(logits, target, label_smoothing=eps)`` defines it, and its gradient with respect
to the logits. Every 7th label is ignore_index, as in a padded batch. Methods differ in who
computes it (smoothce's op, its backend, the peers' kernels, Inductor, eager) and, for the
compilers, in how user code spells the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, Grid
from benchmarks.harness import IGNORE_INDEX, Inputs, Problem, make_target
from benchmarks.methods import (
    Method,
    auto_chunker_key,
    auto_chunker_unavailable,
    compile_module,
    liger_unavailable,
    quack_unavailable,
    smoothce_backend_unavailable,
    smoothce_rewrites,
)

IGNORE_EVERY = 7


# ---------------------------------------------------------------------------------------------
# The loss as user code spells it


def plain_loss(logits, target, eps):
    return F.cross_entropy(logits, target, label_smoothing=eps)


def upcast_loss(logits, target, eps):
    # The everyday LLM spelling: bf16 logits upcast before the loss.
    return F.cross_entropy(logits.float(), target, label_smoothing=eps)


def handwritten_loss(logits, target, eps):
    """Label smoothing written out, as training scripts do: (1 - eps) * nll + eps * (mean over the
    classes of -log p), averaged over the rows whose label is not ignore_index. Equal to
    F.cross_entropy(label_smoothing=eps), computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = target != IGNORE_INDEX
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    return (((1.0 - eps) * nll + eps * uniform) * keep).sum() / keep.sum()


class Loss(torch.nn.Module):
    """One spelling of the loss; smoothing is an attribute, so it compiles as a constant."""

    def __init__(self, spelling, smoothing: float):
        super().__init__()
        self.spelling = spelling
        self.smoothing = smoothing

    def forward(self, logits, target):
        return self.spelling(logits, target, self.smoothing)


# ---------------------------------------------------------------------------------------------
# Methods


def _smoothce(p: Problem):
    import smoothce

    return lambda logits, target: smoothce.cross_entropy(logits, target, label_smoothing=p.smoothing)


def _quack(p: Problem):
    from quack.cross_entropy import cross_entropy

    # Mean over the rows whose label is not ignore_index (-100, its default), like F.cross_entropy.
    return lambda logits, target: cross_entropy(logits, target)


def _quack_unavailable(p: Problem) -> str | None:
    if p.smoothing:
        return "n/a (no label smoothing)"
    return quack_unavailable(p)


def _liger(p: Problem):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(label_smoothing=p.smoothing)


def _upcast_unavailable(p: Problem) -> str | None:
    return "n/a (logits already float32)" if p.dtype == "float32" else None


def _handwritten_unavailable(p: Problem) -> str | None:
    return None if p.smoothing else "n/a (label_smoothing=0: nothing to write out)"


def _both(*checks):
    def unavailable(p: Problem) -> str | None:
        return next((reason for reason in (check(p) for check in checks) if reason), None)

    return unavailable


def _compiled(spelling, backend: str, options: dict | None = None):
    return lambda p: compile_module(Loss(spelling, p.smoothing), backend, options)


def _backend(name: str, label: str, spelling, unavailable=None) -> Method:
    checks = (smoothce_backend_unavailable,) + ((unavailable,) if unavailable else ())
    return Method(name, label, _compiled(spelling, "smoothce"), unavailable=_both(*checks),
                  inspect=smoothce_rewrites)


METHODS = {
    m.name: m
    for m in (
        Method("smoothce", "smoothce.cross_entropy", _smoothce),
        _backend("smoothce-backend", 'compile(backend="smoothce")', plain_loss),
        _backend("smoothce-backend-upcast", 'compile(backend="smoothce"), x.float()', upcast_loss,
                 _upcast_unavailable),
        _backend("smoothce-backend-handwritten", 'compile(backend="smoothce"), hand-written',
                 handwritten_loss, _handwritten_unavailable),
        Method("quack", "Quack cross_entropy", _quack, unavailable=_quack_unavailable),
        # Liger writes the gradient into the logits' own buffer: the runner rebuilds the inputs.
        Method("liger", "Liger-Kernel", _liger, unavailable=liger_unavailable, overwrites_inputs=True),
        Method("inductor", "compile (Inductor)", _compiled(plain_loss, "inductor")),
        Method("inductor-upcast", "compile (Inductor), x.float()", _compiled(upcast_loss, "inductor"),
               unavailable=_upcast_unavailable),
        Method("inductor-handwritten", "compile (Inductor), hand-written", _compiled(handwritten_loss, "inductor"),
               unavailable=_handwritten_unavailable),
        Method(
            "inductor-chunked",
            "Inductor + auto_chunker",
            lambda p: compile_module(Loss(plain_loss, p.smoothing), "inductor", {auto_chunker_key(): True}),
            unavailable=auto_chunker_unavailable,
        ),
        Method("eager", "eager F.cross_entropy", lambda p: Loss(plain_loss, p.smoothing)),
    )
}


# ---------------------------------------------------------------------------------------------
# Shapes and inputs


def make_inputs(p: Problem, seed: int = 0) -> Inputs:
    """Deterministic logits (N, V) requiring grad and labels, built on the target device."""
    g = torch.Generator(device=p.device).manual_seed(seed)
    target = make_target(p, g, IGNORE_EVERY)
    # Logit scale ~2 gives a softmax that is neither uniform nor one-hot.
    logits = torch.randn(p.n, p.v, device=p.device, generator=g).mul_(2.0).to(p.torch_dtype)
    logits.requires_grad_()
    return Inputs((logits, target), [logits])


def bytes_moved(p: Problem) -> int:
    """What an ideal fused loss + gradient kernel must move: one read of the logits and one write
    of their gradient."""
    return 2 * p.logits_bytes


def ce_grid(device: str, quick: bool) -> Grid:
    if device == "cuda":
        # 8K tokens per step; vocabularies of Llama-2 (32K), Llama-3 (128K), Gemma (256K).
        return Grid((8192,), (32768, 131072) if quick else (32768, 131072, 262144), ("bfloat16",))
    # Scaled down so a CPU run takes minutes on two cores.
    return Grid((1024,) if quick else (1024, 4096), (8192, 32768), ("float32",))


def step_grid(device: str, quick: bool) -> Grid:
    if device == "cuda":
        return ce_grid(device, quick)
    # The op's CPU promise, at the largest CPU shape of the ce case.
    return Grid((4096,), (32768,) if quick else (8192, 32768), ("float32",))


CASES = {
    "ce": Case("ce", "cross-entropy on logits (N, V): loss + dlogits", METHODS, ce_grid, make_inputs,
               METHODS["eager"], bytes_moved=bytes_moved),
    # The comparison the op promises on CPU: a training step through it is not slower than
    # Inductor on the same step and peaks no higher.
    "step": Case("step", "training step through the loss (CPU promise: smoothce vs Inductor)",
                 {k: METHODS[k] for k in ("smoothce", "smoothce-backend", "inductor")},
                 step_grid, make_inputs, METHODS["eager"], bytes_moved=bytes_moved),
}
