"""Which Triton kernel variant runs a cross-entropy, with which block sizes: the tuning table.

The kernel bodies (kernels/cross_entropy_triton.py) have three modes; this module says which
shapes each one serves, lists the configurations ``triton.autotune`` chooses among on CUDA, and
gives the fixed choice used where nothing is measured (the interpreter, small problems).

The floor the variants are measured against: one read of the logits and one write of the
gradient at the card's copy bandwidth (on an H100, 3.02 TB/s: 1.42 ms for (8192, 131072) bf16).
A plain two-pass kernel reached 66-70% of it at V >= 128K (its second read comes from HBM), 86%
at V = 32K where the re-read still hits L2. What each mode is for, and what it is predicted to
reach (predictions, not measurements):

- ``ONE_PASS``: a tile of rows lives in registers whole (next_pow2(V) <= 32K). Exactly one read
  and one write, like a copy: predicted 85-90% of copy at V <= 16K, less at 32K if its spills
  cost more than the second read they save.
- ``TWO_PASS``: column blocks streamed twice (statistics, then the gradient), the second pass
  in reverse so the blocks read last come back from L2 first; optionally persistent (a few
  programs per SM walking the rows), which keeps fewer rows in flight and so more of them in L2.
  Any V, any layout; predicted 66-75% at V >= 128K.
- ``SPLIT``: P programs per row each hold a slice in registers and exchange their partial
  statistics through a small workspace, so every logit is read once at any V. Predicted to
  approach ``ONE_PASS`` (80-90%) when P programs of a row are resident together; its cost is
  the wait for partners. Not for gradients written over the logits (a late partner's slice
  may already be overwritten).
"""

from __future__ import annotations

import dataclasses
import functools

import triton

ONE_PASS, TWO_PASS, SPLIT = 0, 1, 2
MODE_NAMES = {ONE_PASS: "one_pass", TWO_PASS: "two_pass", SPLIT: "split"}

# Elements of a tile held in registers by one program. Compiled for sm_90 (ptxas via Triton 3.9),
# a 16K tile over 16 warps (32 values a thread) needs no spill slot; a 32K tile spills a little
# even over 32 warps (200 bytes of stack a thread with bf16, more with every feature on) and
# 64K spills kilobytes. So 16K is the fixed choice's limit and 32K (32 warps) only a candidate.
_MAX_RESIDENT = 1 << 15
_SPILL_FREE = 1 << 14
# Problems smaller than this (elements of the logits) use the fixed choice: their time is launch
# overhead, and tuning them would compile every candidate for nothing.
AUTOTUNE_MIN_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One choice of variant and launch parameters (the kernel's tuning constexprs)."""

    mode: int  # ONE_PASS, TWO_PASS or SPLIT
    block_r: int  # rows per tile (1 for SPLIT)
    block_c: int  # columns per tile (the slice of a SPLIT program)
    reverse: bool = False  # TWO_PASS: second pass walks the blocks from last to first
    programs_per_sm: int = 0  # ONE_PASS / TWO_PASS: > 0 runs a persistent grid of that many per SM
    num_warps: int = 8
    num_stages: int = 1

    def kwargs(self) -> dict:
        return dict(MODE=self.mode, BLOCK_R=self.block_r, BLOCK_C=self.block_c, REVERSE=self.reverse,
                    PROGRAMS_PER_SM=self.programs_per_sm)

    def triton_config(self) -> triton.Config:
        return triton.Config(self.kwargs(), num_warps=self.num_warps, num_stages=self.num_stages)

    def fits(self, C: int, rows_along_s: bool, contiguous: bool, in_place: bool) -> bool:
        """Whether this configuration computes a correct result for these logits."""
        if self.mode == ONE_PASS:
            return C <= self.block_c
        if self.mode == SPLIT:
            slices = -(-C // self.block_c)
            return (self.block_r == 1 and contiguous and not rows_along_s and not in_place
                    and 2 <= slices <= _MAX_SLICES)
        return True


# A row split into more slices than this would need that many programs resident at once.
_MAX_SLICES = 32


def _warps(elements: int) -> int:
    """Warps for a tile of this many elements held in registers: 16 to 32 values a thread."""
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16 if elements <= _SPILL_FREE else 32


@functools.cache
def candidates() -> tuple[KernelConfig, ...]:
    """Every configuration autotune may try; ``prune`` keeps those that fit a call."""
    out = []
    for log_c in range(4, 16):  # one pass: the whole (padded) row, several rows for short ones
        block_c = 1 << log_c
        for block_r in (1, 2, 4, 8, 16, 32, 64, 128):
            elements = block_c * block_r
            if 2048 <= elements <= _SPILL_FREE or (block_r == 1 and block_c < 2048):
                out.append(KernelConfig(ONE_PASS, block_r, block_c, num_warps=_warps(elements)))
    out.append(KernelConfig(ONE_PASS, 1, _MAX_RESIDENT, num_warps=32))  # a whole 32K row, spilling a little
    for block_c in (8192, 16384):  # two passes, one row per tile
        for programs_per_sm in (0, 2):
            out.append(KernelConfig(TWO_PASS, 1, block_c, reverse=True, programs_per_sm=programs_per_sm,
                                    num_warps=16, num_stages=2))
    # two passes over tiles along S (class dim 1); 32 x 512 spills
    out.append(KernelConfig(TWO_PASS, 16, 256, reverse=True, num_warps=8, num_stages=2))
    for block_c in (8192, 16384, 32768):  # split rows
        out.append(KernelConfig(SPLIT, 1, block_c, num_warps=_warps(block_c)))
    return tuple(out)


def _block_c(C: int) -> int:
    return triton.next_power_of_2(max(C, 1))


def pick(configs, C: int, rows_along_s: bool, contiguous: bool, in_place: bool) -> list[KernelConfig]:
    """The configurations worth trying for these logits (a handful, so that tuning stays short)."""
    resident = _block_c(C)
    keep = []
    for cfg in configs:
        if not cfg.fits(C, rows_along_s, contiguous, in_place):
            continue
        if cfg.mode == ONE_PASS:
            # one padded width per V; rows along S want a tile wide in rows, rows along N few
            if cfg.block_c != resident or (rows_along_s and cfg.block_r < 16) \
                    or (not rows_along_s and cfg.block_r * cfg.block_c > max(resident, 8192)):
                continue
        elif cfg.mode == TWO_PASS:
            if resident < (2048 if rows_along_s else 16384):
                continue  # a small one-pass tile fits: a second read cannot win
            if (cfg.block_r > 1) != rows_along_s or cfg.block_c >= resident:
                continue
        keep.append(cfg)
    return keep or [default_config(C, rows_along_s, contiguous, in_place)]


def prune_for(in_place: bool):
    """An ``early_config_prune`` for triton.autotune (arguments by the kernel's names)."""

    def prune(configs, named_args, **kwargs):
        by_kwargs = {_from_triton(c): c for c in configs}
        kept = pick(list(by_kwargs), named_args["C"], kwargs["ROWS_ALONG_S"], kwargs["CONTIGUOUS"], in_place)
        return [by_kwargs[k] if k in by_kwargs else k.triton_config() for k in kept]

    return prune


def _from_triton(cfg: triton.Config) -> KernelConfig:
    k = cfg.kwargs
    return KernelConfig(k["MODE"], k["BLOCK_R"], k["BLOCK_C"], k["REVERSE"], k["PROGRAMS_PER_SM"],
                        cfg.num_warps, cfg.num_stages)


def default_config(C: int, rows_along_s: bool, contiguous: bool, in_place: bool) -> KernelConfig:
    """The fixed choice where nothing is measured: one pass where a tile fits, else two passes.

    (SPLIT is never the default: it must first win a measurement on the device at hand.)
    """
    block_c = _block_c(C)
    if rows_along_s:
        if block_c <= 1024:
            block_r = max(16, min(128, 8192 // block_c))
            return KernelConfig(ONE_PASS, block_r, block_c, num_warps=_warps(block_r * block_c))
        return KernelConfig(TWO_PASS, 16, 256, reverse=True, num_warps=8, num_stages=2)
    if block_c <= _SPILL_FREE:
        block_r = max(1, min(64, 4096 // block_c))
        return KernelConfig(ONE_PASS, block_r, block_c, num_warps=_warps(block_r * block_c))
    return KernelConfig(TWO_PASS, 1, 16384, reverse=True, num_warps=16, num_stages=2)


# --------------------------------------------------------------------------------------------
# The row-statistics kernel and the gradient kernel (smoothce::cross_entropy_stats and
# smoothce::cross_entropy_grad): each reads every logit once, so there is no mode to choose,
# only a tile. Fixed choices, not yet measured on a GPU.
# --------------------------------------------------------------------------------------------

# Elements of a tile: enough 16-byte loads in flight per program to stream from HBM, few enough
# registers (16 fp32 values a thread at 8 warps) that nothing spills.
_STREAM_TILE = 4096


@dataclasses.dataclass(frozen=True)
class Tile:
    """A tile of rows and columns for the one-read kernels."""

    block_r: int  # rows per tile (consecutive positions along S when rows run along S)
    block_c: int  # columns per tile: the statistics kernel loops over the row in such blocks
    num_warps: int


def stream_tile(C: int, rows_along_s: bool) -> Tile:
    """The tile of the statistics and gradient kernels for rows of C columns.

    Rows along N (class stride 1): the columns of one row are contiguous, so a tile is at most
    _STREAM_TILE columns of as few rows as fill it. Rows along S (class dim 1 with positions
    contiguous): a tile is 16 or more consecutive positions, whose loads coalesce across rows,
    times a few classes."""
    width = _block_c(C)
    if rows_along_s:
        block_r = 64 if width <= 64 else 16
        block_c = min(width, max(1, _STREAM_TILE // block_r))
    else:
        block_c = min(width, _STREAM_TILE)
        block_r = max(1, min(64, _STREAM_TILE // block_c))
    elements = block_r * block_c
    return Tile(block_r, block_c, num_warps=4 if elements <= 2048 else 8)
