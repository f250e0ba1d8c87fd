"""Linear head + cross-entropy, the ``head`` case: hidden (N, D) @ weight (V, D)^T -> loss.

Gradients are taken with respect to hidden and weight, as in training an LM head. Methods that
materialise the logits pay N*V memory; the fused ones chunk it away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, Grid
from benchmarks.harness import Inputs, Problem, make_target
from benchmarks.methods import (
    Method,
    auto_chunker_key,
    auto_chunker_unavailable,
    compile_module,
    has_module,
    liger_unavailable,
    smoothce_backend_unavailable,
    smoothce_rewrites,
)


class LinearCrossEntropy(torch.nn.Module):
    def __init__(self, smoothing: float):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, hidden, weight, target):
        return F.cross_entropy(F.linear(hidden, weight), target, label_smoothing=self.smoothing)


def _smoothce(p: Problem):
    import smoothce

    return lambda h, w, y: smoothce.cross_entropy(F.linear(h, w), y, label_smoothing=p.smoothing)


def _fused_linear(p: Problem):
    from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy

    return lambda h, w, y: fused_linear_cross_entropy(h, w, None, y, label_smoothing=p.smoothing)


def _fused_linear_unavailable(p: Problem) -> str | None:
    return None if has_module("smoothce.kernels.linear_cross_entropy") else "n/a (not built)"


def _torch_linear_ce(p: Problem):
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, y: F.linear_cross_entropy(h, w, y, label_smoothing=p.smoothing, options=options)


def _torch_linear_ce_unavailable(p: Problem) -> str | None:
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    return f"n/a (torch {torch.__version__})"


def _torch_linear_ce_diagnose(p: Problem, warnings: list[str]) -> str | None:
    # Unsupported configurations (label smoothing != 0 among them) warn and run the unchunked
    # reference path; detect that from the warning rather than assume it.
    for message in warnings:
        if ("options" in message and "ignored" in message) or "fall" in message.lower():
            return "falls back"
    return None


def _liger(p: Problem):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(label_smoothing=p.smoothing)
    return lambda h, w, y: loss(w, h, y)


METHODS = {
    m.name: m
    for m in (
        Method("smoothce", "linear + smoothce.cross_entropy", _smoothce),
        Method(
            "smoothce-backend",
            'compile(backend="smoothce")',
            lambda p: compile_module(LinearCrossEntropy(p.smoothing), "smoothce"),
            unavailable=smoothce_backend_unavailable,
            inspect=smoothce_rewrites,
        ),
        Method(
            "smoothce-fused-linear",
            "smoothce fused_linear_cross_entropy",
            _fused_linear,
            unavailable=_fused_linear_unavailable,
        ),
        Method("eager", "eager linear + F.cross_entropy", lambda p: LinearCrossEntropy(p.smoothing)),
        Method(
            "inductor",
            "compile (Inductor)",
            lambda p: compile_module(LinearCrossEntropy(p.smoothing), "inductor"),
        ),
        Method(
            "inductor-chunked",
            "Inductor + auto_chunker",
            lambda p: compile_module(LinearCrossEntropy(p.smoothing), "inductor", {auto_chunker_key(): True}),
            unavailable=auto_chunker_unavailable,
        ),
        Method(
            "torch-linear-ce",
            "F.linear_cross_entropy (chunked)",
            _torch_linear_ce,
            unavailable=_torch_linear_ce_unavailable,
            diagnose=_torch_linear_ce_diagnose,
        ),
        Method("liger", "Liger-Kernel fused linear CE", _liger, unavailable=liger_unavailable),
    )
}


def make_inputs(p: Problem, seed: int = 0) -> Inputs:
    """Deterministic hidden (N, D) and weight (V, D) requiring grad, and labels."""
    g = torch.Generator(device=p.device).manual_seed(seed)
    target = make_target(p, g)
    hidden = torch.randn(p.n, p.d, device=p.device, generator=g).to(p.torch_dtype).requires_grad_()
    weight = torch.randn(p.v, p.d, device=p.device, generator=g).mul_(2.0 / p.d**0.5)
    weight = weight.to(p.torch_dtype).requires_grad_()
    return Inputs((hidden, weight, target), [hidden, weight])


def flops(p: Problem) -> int:
    """logits = h W^T (2NDV), dh = g W (2NDV), dW = g^T h (2NDV)."""
    return 6 * p.n * p.d * p.v


def head_grid(device: str, quick: bool) -> Grid:
    if device == "cuda":
        # 4K and 16K tokens per step, the hidden size of a 7-8B model.
        if quick:
            return Grid((4096,), (32768, 131072), ("bfloat16",), d=4096)
        return Grid((4096, 16384), (32768, 131072, 262144), ("bfloat16", "float32"), d=4096)
    if quick:
        return Grid((1024,), (8192, 32768), ("float32",), d=256)
    return Grid((1024, 4096), (8192, 32768), ("float32",), d=256)


CASES = {
    "head": Case("head", "linear head + cross-entropy: loss + dhidden + dweight", METHODS, head_grid,
                 make_inputs, METHODS["eager"], flops=flops),
}
