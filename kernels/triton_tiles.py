"""Tile helpers both Triton kernels share: rows of a flat index, a tile's columns, offsets and
mask, its logits transformed, class weights, and the online softmax's statistics.

A tile is BLOCK_R rows by BLOCK_C columns of an (N, C, S) tensor whose classes are dim 1; a flat
row r is n * S + s. Masked lanes load 0 (and weight 0); statistics mask them to -inf themselves.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softcap_of(x, cap):
    # cap * tanh(x / cap) through exp, which every Triton backend (and the interpreter) has;
    # saturates to +-cap without overflow trouble: exp(+inf) gives 1 - 0, exp(-inf) gives 1 - 2.
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))


@triton.jit
def transformed_of(x, logit_scale, cap, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """softcap(logit_scale * x) in ACC."""
    x = x.to(ACC) * logit_scale
    if HAS_SOFTCAP:
        x = softcap_of(x, cap)
    return x


@triton.jit
def logits_of(ptrs, mask, logit_scale, cap, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """The transformed logits of a tile; masked lanes read 0."""
    return transformed_of(tl.load(ptrs, mask=mask, other=0.0), logit_scale, cap, HAS_SOFTCAP, ACC)


@triton.jit
def rows_of(r, S, S_ONE: tl.constexpr):
    """(n, s) of flat rows r = n * S + s. With S_ONE (S == 1 at compile time) n is r itself, so
    row offsets keep the alignment the compiler knows of the strides and loads vectorise."""
    if S_ONE:
        n = r
        s = r * 0
    else:
        n = r // S
        s = r % S
    return n, s


@triton.jit
def columns_of(start, C, row_mask, BLOCK_C: tl.constexpr):
    """Columns [start, start + BLOCK_C) of a tile: (cols, cols < C, the tile's (R, B) mask)."""
    cols = start + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    return cols, col_mask, row_mask[:, None] & col_mask[None, :]


@triton.jit
def offsets_of(row_off, cols, stride, CONTIGUOUS: tl.constexpr):
    """(R, B) element offsets; with CONTIGUOUS the column stride is 1 at compile time (loads vectorise)."""
    if CONTIGUOUS:
        off = row_off[:, None] + cols[None, :]
    else:
        off = row_off[:, None] + cols.to(tl.int64)[None, :] * stride
    return off


@triton.jit
def class_weights_of(w_ptr, cols, col_mask, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """(1, B) class weights of the columns, 0 past the last class."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    else:
        w = col_mask.to(ACC)
    return w[None, :]


@triton.jit
def merge_softmax(m, d, m2, d2):
    """Online softmax: (max, sum-exp) of two parts of a row."""
    m_new = tl.maximum(m, m2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, d * tl.exp(m - m_safe) + d2 * tl.exp(m2 - m_safe)


@triton.jit
def block_start(i, blocks, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr):
    """The first column of a second pass's i-th block. In reverse, the blocks read last in the
    first pass (likeliest still in L2) come first."""
    if REVERSE:
        start = (blocks - 1 - i) * BLOCK_C
    else:
        start = i * BLOCK_C
    return start
