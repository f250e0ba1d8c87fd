"""Which Triton kernel variant runs a cross-entropy, with which block sizes: the tuning table.

The kernel bodies (kernels/cross_entropy_triton.py) have two modes; this module says which
shapes each one serves, lists the configurations ``triton.autotune`` chooses among on CUDA, and
gives the fixed choice used where nothing is measured (the interpreter, small problems).

The floor the variants are measured against: one read of the logits and one write of the
gradient at the card's copy bandwidth (on an H100, 3.02 TB/s: 1.42 ms for (8192, 131072) bf16).
``python -m benchmarks.static`` compiles every configuration below for sm_90 and reads what the
compiler made of it (benchmarks/README.md); what each mode is for:

- ``ONE_PASS``: a tile of rows lives in registers whole (next_pow2(V) <= 32K). Exactly one read
  and one write, like a copy.
- ``TWO_PASS``: column blocks streamed twice (statistics, then the gradient), the second pass
  in reverse so the blocks read last come back from L2 first. Any V, any layout. Its second
  read comes from L2 for the share that the rows streamed at once leave there: every program
  resident (``programs_per_sm`` 0), or a persistent grid of 1 or 2 programs per SM walking the
  rows, which holds fewer rows in flight and so more of each in L2 (the static report gives the
  share per V and GPU).

A third mode once split a row over several programs that exchanged partial statistics, so that
each logit was read once at any V. On paper it cannot beat TWO_PASS: with the exchange down to a
fixed five memory round trips in sequence (ticket, slice, publish, poll, read partials), an
8192-wide slice compiled without spills only at 2 programs per SM (1 with every feature on), and
at about 0.7 us a round trip on a loaded H100 a program spends 3.5 us waiting for 1.4 us of
transfer: about 45% of copy bandwidth for bf16, 60% for fp32, where TWO_PASS's bound from HBM
traffic alone is 76-89% (bf16) and 71-76% (fp32) at V >= 128K. It was removed.
"""

from __future__ import annotations

import dataclasses
import functools

import triton

ONE_PASS, TWO_PASS = 0, 1
MODE_NAMES = {ONE_PASS: "one_pass", TWO_PASS: "two_pass"}

# Elements of a tile held in registers by one program. Compiled for sm_90 (Triton 3.6 and 3.9),
# a 16K tile over 16 warps (32 values a thread) needs no spill slot with any feature; a 32K tile
# over 32 warps none with only the logits per element and the row's max and sum (no class weights,
# softcap or smoothing sum; with smoothing fp32 spills 40 bytes, Triton 3.6), and hundreds of bytes
# of stack with weights or a softcap. So 16K is the fixed choice's limit and 32K a candidate for
# lean calls only.
_MAX_RESIDENT = 1 << 15
_SPILL_FREE = 1 << 14
# Elements of a one-pass tile of several short rows along N. Compiled for sm_90 (Triton 3.6), 4 x
# 1024 over 8 warps splits each row over two warps, whose reductions go through shared memory: 44
# SASS instructions per logit for fp32 with smoothing, 59 with every feature, where 2 x 1024 over
# 4 warps takes 29 and 42.
_ROWS_TILE = 2048
# Problems smaller than this (elements of the logits) use the fixed choice: their time is launch
# overhead, and tuning them would compile every candidate for nothing.
AUTOTUNE_MIN_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One choice of variant and launch parameters (the kernel's tuning constexprs)."""

    mode: int  # ONE_PASS or TWO_PASS
    block_r: int  # rows per tile
    block_c: int  # columns per tile
    reverse: bool = False  # TWO_PASS: second pass walks the blocks from last to first
    programs_per_sm: int = 0  # > 0 runs a persistent grid of that many per SM
    num_warps: int = 8
    num_stages: int = 1

    @property
    def maxnreg(self) -> int:
        """Registers a thread may take: all that one resident program leaves it. Left to itself,
        ptxas sometimes aims for two programs per SM and spills (the bf16 two-pass 16384/16w
        kernel with label smoothing, Triton 3.6: 64 registers and 28 bytes of spill; capped at
        128, 93 registers and none)."""
        return min(255, 65536 // (32 * self.num_warps))

    def kwargs(self) -> dict:
        return dict(MODE=self.mode, BLOCK_R=self.block_r, BLOCK_C=self.block_c, REVERSE=self.reverse,
                    PROGRAMS_PER_SM=self.programs_per_sm)

    def options(self) -> dict:
        """Triton's launch options for this configuration."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)

    def triton_config(self) -> triton.Config:
        return triton.Config(self.kwargs(), **self.options())

    def fits(self, C: int) -> bool:
        """Whether this configuration computes a correct result for rows of C classes."""
        return self.mode != ONE_PASS or C <= self.block_c


def _warps(elements: int) -> int:
    """Warps for a tile of this many elements held in registers: 16 to 32 values a thread."""
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16 if elements <= _SPILL_FREE else 32


@functools.cache
def candidates() -> tuple[KernelConfig, ...]:
    """Every configuration autotune may try; ``pick`` keeps those that fit a call."""
    out = []
    for log_c in range(4, 16):  # one pass: the whole (padded) row, several rows for short ones
        block_c = 1 << log_c
        for block_r in (1, 2, 4, 8, 16, 32, 64, 128):
            elements = block_c * block_r
            if 2048 <= elements <= _SPILL_FREE or (block_r == 1 and block_c < 2048):
                out.append(KernelConfig(ONE_PASS, block_r, block_c, num_warps=_warps(elements)))
    out.append(KernelConfig(ONE_PASS, 1, _MAX_RESIDENT, num_warps=32))  # a whole 32K row, lean calls only
    for block_c, warps in ((8192, 8), (16384, 16)):  # two passes, one row per tile, 32 values a thread
        for programs_per_sm in (0, 1, 2):
            out.append(KernelConfig(TWO_PASS, 1, block_c, reverse=True, programs_per_sm=programs_per_sm,
                                    num_warps=warps))
    # two passes over tiles along S (class dim 1); 32 x 512 spills
    out.append(KernelConfig(TWO_PASS, 16, 256, reverse=True, num_warps=8))
    return tuple(out)


def _block_c(C: int) -> int:
    return triton.next_power_of_2(max(C, 1))


def pick(configs, C: int, rows_along_s: bool, lean: bool) -> list[KernelConfig]:
    """The configurations worth trying for these logits (a handful, so that tuning stays short).
    ``lean``: the call holds only the logits per element and the row's max and sum (no class
    weights, softcap or smoothing)."""
    resident = _block_c(C)
    keep = []
    for cfg in configs:
        if not cfg.fits(C):
            continue
        if cfg.mode == ONE_PASS:
            # one padded width per V; rows along S want a tile wide in rows, rows along N few
            if cfg.block_c != resident or (rows_along_s and cfg.block_r < 16) \
                    or (not rows_along_s and cfg.block_r * cfg.block_c > max(resident, _ROWS_TILE)):
                continue
            if cfg.block_c > _SPILL_FREE and not lean:
                continue
        elif cfg.mode == TWO_PASS:
            if resident < (2048 if rows_along_s else 16384):
                continue  # a small one-pass tile fits: a second read cannot win
            if (cfg.block_r > 1) != rows_along_s or cfg.block_c >= resident:
                continue
        keep.append(cfg)
    return keep or [default_config(C, rows_along_s)]


def lean(features: dict) -> bool:
    """Whether a call with these kernel features is lean (see ``pick``)."""
    return not (features["HAS_WEIGHT"] or features["HAS_SOFTCAP"] or features["HAS_SMOOTHING"])


def prune(configs, named_args, **kwargs):
    """An ``early_config_prune`` for triton.autotune (arguments by the kernel's names)."""
    by_kwargs = {_from_triton(c): c for c in configs}
    kept = pick(list(by_kwargs), named_args["C"], kwargs["ROWS_ALONG_S"], lean(kwargs))
    return [by_kwargs[k] if k in by_kwargs else k.triton_config() for k in kept]


def _from_triton(cfg: triton.Config) -> KernelConfig:
    k = cfg.kwargs
    return KernelConfig(k["MODE"], k["BLOCK_R"], k["BLOCK_C"], k["REVERSE"], k["PROGRAMS_PER_SM"],
                        cfg.num_warps, cfg.num_stages)


def default_config(C: int, rows_along_s: bool) -> KernelConfig:
    """The fixed choice where nothing is measured: one pass where a tile fits, else two passes."""
    block_c = _block_c(C)
    if rows_along_s:
        if block_c <= 1024:
            block_r = max(16, min(128, 8192 // block_c))
            return KernelConfig(ONE_PASS, block_r, block_c, num_warps=_warps(block_r * block_c))
        return KernelConfig(TWO_PASS, 16, 256, reverse=True, num_warps=8)
    if block_c <= _SPILL_FREE:
        block_r = max(1, min(64, _ROWS_TILE // block_c))
        return KernelConfig(ONE_PASS, block_r, block_c, num_warps=_warps(block_r * block_c))
    return KernelConfig(TWO_PASS, 1, 16384, reverse=True, num_warps=16)


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
