"""Tile helpers the Triton kernels share: rows of a flat index, a tile's columns, offsets and
mask, its logits transformed (softcap in rsqrt form), class weights in the tile's shape, gradient
stores, and the online softmax's statistics.

A tile is BLOCK_R rows by BLOCK_C columns of an (N, C, S) tensor whose classes are dim 1; a flat
row r is n * S + s. Masked lanes load 0 (and weight 0); statistics mask them to -inf themselves.
"""

from __future__ import annotations

import triton
import triton.language as tl


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def transformed(raw, k, c1, c2, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """(t, r): t = x k / logit_scale for x = softcap(logit_scale raw) (k = logit_scale log2(e):
    log2 units; k = logit_scale: the logits themselves); with a softcap also r = 1 / (e + 1) for
    e = exp(2 logit_scale raw / cap), so that x / cap = tanh = 1 - 2r and 1 - tanh^2 = 4 r (1 - r).
    k, c1, c2: the caller's constants (c1 = 2 logit_scale log2(e) / cap, c2 = cap k / logit_scale).

    1 / (e + 1) is rsqrt(e + 1)^2 (two special-function ops, a few ulp) rather than a division
    (a guarded sequence of eight); e = inf gives r = 0, x = cap; e = 0 gives r = 1, x = -cap."""
    u = raw.to(ACC)
    if HAS_SOFTCAP:
        if ACC == tl.float64:
            r = 1.0 / (tl.exp2(u * c1) + 1.0)
        else:
            q = tl.math.rsqrt(tl.exp2(u * c1) + 1.0)
            r = q * q
        t = c2 - (2.0 * c2) * r
    else:
        r = u
        t = u * k
    return t, r


@triton.jit
def logits_tile(ptrs, mask, k, c1, c2, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """A tile of logits transformed (t, r of ``transformed``); masked lanes read 0, so t = 0."""
    if MASKED:
        raw = tl.load(ptrs, mask=mask, other=0.0)
    else:
        raw = tl.load(ptrs)
    return transformed(raw, k, c1, c2, HAS_SOFTCAP, ACC)


@triton.jit
def store_gradient_tile(ptrs, g, mask, MASKED: tl.constexpr):
    """A tile of gradient, in the gradient's dtype."""
    if MASKED:
        tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, g.to(ptrs.dtype.element_ty))


@triton.jit
def class_weights_tile(w_ptr, cols, mask, MASKED: tl.constexpr, ACC: tl.constexpr):
    """The class weights of a tile's columns, in the tile's own shape (R, B): loaded where the
    logits are, so no exchange of a (1, B) row between threads; 0 on masked lanes."""
    if MASKED:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    else:
        w = tl.load(w_ptr + cols)
    return w.to(ACC)


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
