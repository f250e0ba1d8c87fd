"""Cross-entropy on given logits (N, V): the ``ce`` and ``step`` cases.

Each method computes ``F.cross_entropy(logits, target, label_smoothing=eps)`` (mean reduction)
and its gradient with respect to the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import Problem
from benchmarks.methods import (
    Method,
    auto_chunker_key,
    auto_chunker_unavailable,
    compile_module,
    liger_unavailable,
    smoothce_backend_unavailable,
    smoothce_rewrites,
)


class CrossEntropy(torch.nn.Module):
    """The loss as user code writes it; smoothing is an attribute, so it compiles as a constant."""

    def __init__(self, smoothing: float):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing)


def _smoothce(p: Problem):
    import smoothce

    return lambda logits, target: smoothce.cross_entropy(logits, target, label_smoothing=p.smoothing)


def _liger(p: Problem):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(label_smoothing=p.smoothing)


METHODS = {
    m.name: m
    for m in (
        Method("smoothce", "smoothce.cross_entropy", _smoothce),
        Method(
            "smoothce-backend",
            'compile(backend="smoothce")',
            lambda p: compile_module(CrossEntropy(p.smoothing), "smoothce"),
            unavailable=smoothce_backend_unavailable,
            inspect=smoothce_rewrites,
        ),
        Method("eager", "eager F.cross_entropy", lambda p: CrossEntropy(p.smoothing)),
        Method("inductor", "compile (Inductor)", lambda p: compile_module(CrossEntropy(p.smoothing), "inductor")),
        Method(
            "inductor-chunked",
            "Inductor + auto_chunker",
            lambda p: compile_module(CrossEntropy(p.smoothing), "inductor", {auto_chunker_key(): True}),
            unavailable=auto_chunker_unavailable,
        ),
        Method("liger", "Liger-Kernel", _liger, unavailable=liger_unavailable),
    )
}

# The comparison the op promises on CPU: a training step through it is not slower than Inductor on
# the same step and peaks no higher.
STEP_METHODS = ("smoothce", "smoothce-backend", "inductor")
