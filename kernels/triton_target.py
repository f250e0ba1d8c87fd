"""Compiling a Triton kernel for a GPU this machine does not have (the static GPU report).

Triton compiles for the GPU its active driver reports. A launch first specialises the arguments
(an int equal to 1 becomes a constant; pointers, and ints divisible by 16, are marked so) and
``warmup`` does exactly the same without running anything. Here, for the duration of one call,
the active driver is one that reports a chosen target and owns no device, so Triton's own ptxas
emits that GPU's binary on a CPU-only machine, specialised as a launch on that GPU would be.

Triton's driver registry is not public API; this module is the only place that touches it (the
same in Triton 3.6 and 3.9).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from triton.backends.compiler import GPUTarget
from triton.runtime import driver

__all__ = ["GPUTarget", "compile_for"]


class _TargetDriver:
    """Stands in for Triton's active driver: reports ``target`` and has no device or stream."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> GPUTarget:
        # Triton keeps one cache of compiled kernels per device: one per target here.
        return self.target

    def get_current_stream(self, device=None):
        return None


@contextlib.contextmanager
def _reporting(target: GPUTarget) -> Iterator[None]:
    previous = driver._active  # None until a real GPU's driver was needed
    driver.set_active(_TargetDriver(target))
    try:
        yield
    finally:
        driver._active = previous


def compile_for(target: GPUTarget, kernel, args: tuple, kwargs: dict) -> list:
    """What ``kernel[grid](*args, **kwargs)`` compiles on a ``target`` GPU, without running it: the
    one kernel a jit function compiles, or one per configuration an autotuner keeps after its
    pruning (``triton.CompiledKernel`` objects, with their PTX and cubin in ``.asm``)."""
    with _reporting(target):
        out = kernel.warmup(*args, grid=None, **kwargs)
    return out if isinstance(out, list) else [out]
