"""Which variant of the soft-target kernel runs, with which block sizes: its tuning table.

The kernel (kernels/soft_cross_entropy_triton.py) has the cross-entropy kernel's first two modes
(kernels/cross_entropy_tuning.py says what each is for) and holds two N x V tiles where that one
holds one: the student's logits and the target. So a tile held in registers whole (ONE_PASS) is
half as wide for the same registers: 8K elements of each over 16 warps (16 values a thread of
each), and wider rows take two passes over column blocks of 4K.

The floor: a distillation step reads the student's and the teacher's logits and writes one
gradient, 3 N V accesses; ONE_PASS moves exactly that, TWO_PASS reads both tensors twice (the
second time likely from L2 for rows in flight), 5 N V at worst. Predictions, not measurements: no
GPU has run this kernel yet.
"""

from __future__ import annotations

import functools

import triton

from smoothce.kernels.cross_entropy_tuning import AUTOTUNE_MIN_ELEMENTS, ONE_PASS, TWO_PASS, KernelConfig

__all__ = ["AUTOTUNE_MIN_ELEMENTS", "candidates", "default_config", "pick"]

# Elements of one tensor's tile held in registers by a program: two tensors are held.
_SPILL_FREE = 1 << 13
_TWO_PASS_BLOCK = 4096


def _warps(elements: int) -> int:
    """Warps for a tile of this many elements of each tensor: 8 to 16 values a thread of each."""
    return 4 if elements <= 1024 else 8 if elements <= 4096 else 16


@functools.cache
def candidates() -> tuple[KernelConfig, ...]:
    """Every configuration autotune may try; ``pick`` keeps those that fit a call."""
    out = []
    for log_c in range(4, 14):
        block_c = 1 << log_c
        for block_r in (1, 2, 4, 8, 16, 32):
            elements = block_c * block_r
            if 1024 <= elements <= _SPILL_FREE or (block_r == 1 and block_c < 1024):
                out.append(KernelConfig(ONE_PASS, block_r, block_c, num_warps=_warps(elements)))
    for block_c in (2048, 4096, 8192):
        out.append(KernelConfig(TWO_PASS, 1, block_c, reverse=True, num_warps=_warps(block_c), num_stages=2))
    return tuple(out)


def pick(configs, C: int) -> list[KernelConfig]:
    """The configurations worth trying for rows of C classes."""
    resident = triton.next_power_of_2(max(C, 1))
    keep = [cfg for cfg in configs
            if (cfg.mode == ONE_PASS and cfg.block_c == resident and cfg.block_r * cfg.block_c <= max(resident, 4096))
            or (cfg.mode == TWO_PASS and resident > 2048 and cfg.block_c < resident)]
    return keep or [default_config(C)]


def default_config(C: int) -> KernelConfig:
    """The fixed choice where nothing is measured: one pass where both tiles fit, else two passes."""
    block_c = triton.next_power_of_2(max(C, 1))
    if block_c <= _SPILL_FREE:
        block_r = max(1, min(32, 2048 // block_c))
        return KernelConfig(ONE_PASS, block_r, block_c, num_warps=_warps(block_r * block_c))
    return KernelConfig(TWO_PASS, 1, _TWO_PASS_BLOCK, reverse=True, num_warps=8, num_stages=2)
