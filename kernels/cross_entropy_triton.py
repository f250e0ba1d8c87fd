"""The Triton kernels of smoothce's cross-entropy. First the fused kernel: loss and gradient of a
row in one launch (the fused head's chunks, kernels/linear_cross_entropy_triton.py); at the end,
the two one-read kernels of smoothce::cross_entropy_stats and smoothce::cross_entropy_grad.

For a row with label y, class weights w (ones without weight), x = softcap(logit_scale * logits),
lse = logsumexp(x), and the (a, b, c) of LossForm.coefficients(V):

    loss  = label_on * (a w_y (lse - x_y) + c) + smooth
    smooth = uniform_on * b (sum_j w_j lse - sum_j w_j x_j)
    z     = z_loss * lse^2 * label_on
    dx_j  = (A + B sum_k w_k + 2 z_loss lse Z) p_j - A [j == y] - B w_j,   p = softmax(x),

with A = s_ce a w_y label_on, B = s_u b uniform_on, Z = s_z label_on (s_ce, s_z, s_u: the gradient
scales, 1 or the 'mean' divisors), times logit_scale, and times 1 - (x_j / cap)^2 under a
softcap. label_on is 1, 0 on an ignored row, nan for a label outside [0, V) (the loudest result
that needs no host sync; such a label is never dereferenced). uniform_on is label_on and s_u is
s_ce; with uniform_rows, uniform_on is the row's entry of it, s_u the smoothing part's own scale,
and the smoothing part of the loss is written apart, to be reduced by its own divisor. sum_k w_k
is one number per call (V without weights), never reduced per row.

Inside, logits are read in log2 units (t = x log2(e), lse2 = lse log2(e)), so that every
exponential is one special-function op; per-row results are turned back into natural units.

Layout, low to high: jit helpers -> the two modes (tiles of rows in one or two passes) -> the
kernel -> autotuned versions -> the backward's scaling -> the launcher -> the statistics and
gradient kernels and their launchers. Which mode and block sizes run where is the tuning table's
business (kernels/cross_entropy_tuning.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from smoothce.kernels import cross_entropy_tuning as tuning
from smoothce.kernels.cross_entropy_tuning import KernelConfig
# shared with the soft-target kernel
from smoothce.kernels.triton_tiles import LOG2E
from smoothce.kernels.triton_tiles import class_weights_tile as _class_weights
from smoothce.kernels.triton_tiles import logits_tile as _logits
from smoothce.kernels.triton_tiles import rows_of as _rows_of
from smoothce.kernels.triton_tiles import store_gradient_tile as _store_grad
from smoothce.kernels.triton_tiles import transformed as _transform

# --------------------------------------------------------------------------------------------
# jit helpers: logits in log2 units, per-row statistics, per-row results, a tile of gradient
#
# Every exponential is a base-2 one: the logits are read as t = x log2(e), which the scale of
# the logits absorbs (one multiply either way), so exp(x - lse) is exp2(t - lse2) and compiles to
# a single special-function op (natural exp adds a multiply and a denormal guard).
# --------------------------------------------------------------------------------------------

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _constants(logit_scale, cap, ACC: tl.constexpr):
    """(k, c1, c2) of _transform: t = raw k without a softcap; e = exp2(raw c1), t = c2 (1 - 2r).
    In ACC: log2(e) rounded to fp32 would cost fp64 its precision."""
    k = (tl.zeros((), ACC) + logit_scale) * LOG2E
    cap = tl.zeros((), ACC) + cap
    return k, 2.0 * k / cap, cap * LOG2E


@triton.jit
def _label_logit(ptrs, mask, k, c1, c2, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """t of each row's label column (a gather, one per row)."""
    t, _ = _transform(tl.load(ptrs, mask=mask, other=0.0), k, c1, c2, HAS_SOFTCAP, ACC)
    return t


@triton.jit
def _columns(start, C, row_mask, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns [start, start + BLOCK_C) of a tile, as (R, B) indices, and the tile's mask."""
    cols = start + tl.arange(0, BLOCK_C)[None, :] + tl.zeros((BLOCK_R, 1), tl.int32)
    return cols, row_mask[:, None] & (cols < C)


@triton.jit
def _offsets(row_off, cols, stride, CONTIGUOUS: tl.constexpr):
    """(R, B) element offsets; with CONTIGUOUS the column stride is 1 at compile time (loads vectorise)."""
    if CONTIGUOUS:
        off = row_off[:, None] + cols
    else:
        off = row_off[:, None] + cols.to(tl.int64) * stride
    return off


@triton.jit
def _block_stats(t, w, mask, m, d, s, MASKED: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Rows' running (max, sum exp2(t - max)) and smoothing sum (sum w t), merged with a tile.

    Masked lanes hold t = 0 and w = 0: out of the max and sum-exp, 0 in the smoothing sum. A row
    of -inf keeps max -inf and sum 0, never nan."""
    if MASKED:
        tm = tl.where(mask, t, float("-inf"))
    else:
        tm = t
    m_new = tl.maximum(m, tl.max(tm, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp2(m - m_safe) + tl.sum(tl.exp2(tm - m_safe[:, None]), 1)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            s += tl.sum(w * t, 1)
        else:
            s += tl.sum(t, 1)
    return m_new, d, s


@triton.jit
def _row_labels(y_ptrs, u_ptrs, row_mask, C, ignore_index, HAS_IGNORE: tl.constexpr,
                HAS_UNIFORM_ROWS: tl.constexpr, ACC: tl.constexpr):
    """Labels of a tile's rows: (y clamped into [0, C) as int32, label_on, uniform_on)."""
    y = tl.load(y_ptrs, mask=row_mask, other=0).to(tl.int64)
    in_range = (y >= 0) & (y < C)
    y_safe = tl.where(in_range, y, 0).to(tl.int32)
    label_on = tl.where(in_range, 1.0, float("nan")).to(ACC)
    if HAS_IGNORE:
        label_on = tl.where(y == ignore_index, 0.0, label_on)
    if HAS_UNIFORM_ROWS:
        uniform_on = tl.load(u_ptrs, mask=row_mask, other=0).to(ACC)
    else:
        uniform_on = label_on
    return y_safe, label_on, uniform_on


@triton.jit
def _row_results(lse2, t_y, w_y, sum_w, sum_wt, label_on, uniform_on, scale_ptr, a, b, c, zc, logit_scale,
                 HAS_UNIFORM_ROWS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """Per row, from statistics in log2 units: the cross-entropy part, the smoothing part when it
    is kept apart (uniform_rows: it is reduced by its own divisor), the z part, and the
    gradient's coefficients (of p, of [j == y], of w_j); see the module docstring."""
    lse = lse2 * LN2
    ce = label_on * (a * w_y * LN2 * (lse2 - t_y) + c)
    smooth = tl.zeros_like(ce)
    if HAS_SMOOTHING:
        smooth = uniform_on * b * (sum_w * lse - sum_wt * LN2)
        if not HAS_UNIFORM_ROWS:
            ce += smooth
    # Rows that do not count get an exact 0 gradient even when 'mean' found no row (1 / 0 scale),
    # as in PyTorch, whose loss is nan there but whose gradient is 0.
    ce_scale = tl.load(scale_ptr)
    s_label = tl.where(label_on == 0.0, 0.0, ce_scale * label_on) * logit_scale
    if HAS_UNIFORM_ROWS:
        s_uniform = tl.where(uniform_on == 0.0, 0.0, tl.load(scale_ptr + 2) * uniform_on) * logit_scale
    else:
        s_uniform = s_label
    coef_y = s_label * a * w_y
    coef_w = s_uniform * b
    coef_p = coef_y
    if HAS_SMOOTHING:
        coef_p += coef_w * sum_w
    if HAS_ZLOSS:
        z = zc * lse * lse * label_on
        z_scale = tl.load(scale_ptr + 1)
        coef_p += tl.where(label_on == 0.0, 0.0, z_scale * label_on) * logit_scale * 2.0 * zc * lse
    else:
        z = tl.zeros_like(ce)
    return ce, smooth, z, coef_p, coef_y, coef_w


@triton.jit
def _grad_tile(p, r, cols, y, w, coef_p, coef_y, coef_w, HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr):
    """d(loss)/d(logits) of an (R, B) tile: (coef_p p - coef_y [j == y] - coef_w w) dx/dlogits,
    p = softmax, with logit_scale in the coefficients and, under a softcap, 1 - tanh^2 = 4r(1 - r)."""
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            base = -coef_w[:, None] * w
        else:
            base = tl.zeros_like(p) - coef_w[:, None]
    else:
        base = tl.zeros_like(p)
    g = coef_p[:, None] * p + tl.where(cols == y[:, None], base - coef_y[:, None], base)
    if HAS_SOFTCAP:
        r4 = 4.0 * r
        g *= r4 - r4 * r
    return g


# --------------------------------------------------------------------------------------------
# The modes
# --------------------------------------------------------------------------------------------


@triton.jit
def _tiles(
    x_ptr, y_ptr, u_ptr, w_ptr, wsum_ptr, scale_ptr, loss_ptr, smooth_ptr, z_ptr, g_ptr,
    N, C, S,
    stride_xn, stride_xc, stride_xs, stride_yn, stride_ys, stride_un, stride_us, stride_gn, stride_gc, stride_gs,
    ignore_index, a, b, c, zc, cap, logit_scale,
    HAS_IGNORE: tl.constexpr, HAS_UNIFORM_ROWS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    S_ONE: tl.constexpr, ROWS_ALONG_S: tl.constexpr, CONTIGUOUS: tl.constexpr, ACC: tl.constexpr,
    ONE_READ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    """ONE_PASS (ONE_READ: the tile is the whole row) and TWO_PASS: tiles of BLOCK_R rows.

    Rows are (n, s) pairs. ROWS_ALONG_S: a tile is BLOCK_R consecutive s of one n, which are
    adjacent in memory (stride_xs == 1, the class-dim-1 layout), so its loads coalesce across
    rows. Otherwise a tile is BLOCK_R consecutive flat rows n * S + s. CONTIGUOUS: the class
    stride is 1 (known at compile time, so loads vectorise). A grid smaller than the number of
    tiles makes the programs persistent: each walks every nprog-th tile. Masks only where a tile
    can have lanes past the end: partial tiles of rows, and the last block of columns unless
    BLOCK_C divides C (EVEN_C).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ROW_MASKED: tl.constexpr = ROWS_ALONG_S or BLOCK_R > 1
    if ROWS_ALONG_S:
        tiles_s = tl.cdiv(S, BLOCK_R)
        num_tiles = N * tiles_s
    else:
        num_tiles = tl.cdiv(N * S, BLOCK_R)
    k, c1, c2 = _constants(logit_scale, cap, ACC)
    if HAS_SMOOTHING and HAS_WEIGHT:
        sum_w = tl.load(wsum_ptr).to(ACC)  # the class weights' sum: one per call
    else:
        sum_w = tl.zeros((), ACC) + C
    full = C // BLOCK_C * BLOCK_C  # columns in whole blocks
    for tile in range(pid, num_tiles, nprog):
        # int64 offsets: N * C passes 2^31 at LLM sizes (8192 x 262144).
        if ROWS_ALONG_S:
            n = tl.cast(tile // tiles_s, tl.int64)
            s = (tile % tiles_s) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_mask = s < S
            x_row = n * stride_xn + s
            g_row = n * stride_gn + s
        else:
            r = tl.cast(tile, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_mask = r < N * S
            n, s = _rows_of(r, S, S_ONE)
            x_row = n * stride_xn + s * stride_xs
            g_row = n * stride_gn + s * stride_gs
        flat = n * S + s
        y, label_on, uniform_on = _row_labels(
            y_ptr + n * stride_yn + s * stride_ys, u_ptr + n * stride_un + s * stride_us, row_mask, C, ignore_index,
            HAS_IGNORE, HAS_UNIFORM_ROWS, ACC)
        t_y = _label_logit(x_ptr + x_row + y.to(tl.int64) * stride_xc, row_mask, k, c1, c2, HAS_SOFTCAP, ACC)
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y, mask=row_mask, other=0.0).to(ACC)
        else:
            w_y = tl.full((BLOCK_R,), 1.0, ACC)

        m = tl.full((BLOCK_R,), float("-inf"), ACC)
        d = tl.zeros((BLOCK_R,), ACC)
        sum_wt = tl.zeros((BLOCK_R,), ACC)
        if ONE_READ:
            MASKED: tl.constexpr = ROW_MASKED or not EVEN_C
            cols, mask = _columns(0, C, row_mask, BLOCK_R, BLOCK_C)
            t, rr = _logits(x_ptr + _offsets(x_row, cols, stride_xc, CONTIGUOUS), mask, k, c1, c2, MASKED,
                            HAS_SOFTCAP, ACC)
            w = t
            if HAS_WEIGHT:
                w = _class_weights(w_ptr, cols, mask, MASKED, ACC)
            # the row's exponentials stay in registers: p = e / d, no second exp
            tm = t
            if MASKED:
                tm = tl.where(mask, t, float("-inf"))
            m = tl.max(tm, 1)
            m = tl.where(m == float("-inf"), 0.0, m)
            e = tl.exp2(tm - m[:, None])
            d = tl.sum(e, 1)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    sum_wt = tl.sum(w * t, 1)
                else:
                    sum_wt = tl.sum(t, 1)
        else:
            for start in range(0, full, BLOCK_C):
                m, d, sum_wt = _stats_block(x_ptr, w_ptr, x_row, start, C, row_mask, m, d, sum_wt, k, c1, c2,
                                            stride_xc, ROW_MASKED, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
                                            CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)
            if not EVEN_C:
                if full < C:
                    m, d, sum_wt = _stats_block(x_ptr, w_ptr, x_row, full, C, row_mask, m, d, sum_wt, k, c1, c2,
                                                stride_xc, True, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
                                                CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)
            m = tl.where(m == float("-inf"), 0.0, m)
        if ROW_MASKED:  # rows past the end of the tile's range: finite garbage, never stored
            d = tl.where(row_mask, d, 1.0)
        lse2 = m + tl.log2(d)
        ce, smooth, z, coef_p, coef_y, coef_w = _row_results(
            lse2, t_y, w_y, sum_w, sum_wt, label_on, uniform_on, scale_ptr, a, b, c, zc, logit_scale,
            HAS_UNIFORM_ROWS, HAS_SMOOTHING, HAS_ZLOSS)
        tl.store(loss_ptr + flat, ce, mask=row_mask)
        if HAS_UNIFORM_ROWS:
            tl.store(smooth_ptr + flat, smooth, mask=row_mask)
        if HAS_ZLOSS:
            tl.store(z_ptr + flat, z, mask=row_mask)

        if COMPUTE_GRAD:
            if ONE_READ:
                g = _grad_tile(e, rr, cols, y, w, coef_p / d, coef_y, coef_w, HAS_SMOOTHING, HAS_WEIGHT, HAS_SOFTCAP)
                _store_grad(g_ptr + _offsets(g_row, cols, stride_gc, CONTIGUOUS), g, mask, MASKED)
            else:
                # Second read. In reverse, the blocks read last in pass 1 (likeliest still in L2)
                # come first: the partial block, then the whole ones from the last.
                if REVERSE and not EVEN_C:
                    if full < C:
                        _grad_block(x_ptr, w_ptr, g_ptr, x_row, g_row, full, C, row_mask, y, lse2, coef_p, coef_y,
                                    coef_w, k, c1, c2, stride_xc, stride_gc, True, HAS_WEIGHT, HAS_SMOOTHING,
                                    HAS_SOFTCAP, CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)
                blocks = full // BLOCK_C
                for i in range(0, blocks):
                    if REVERSE:
                        start = (blocks - 1 - i) * BLOCK_C
                    else:
                        start = i * BLOCK_C
                    _grad_block(x_ptr, w_ptr, g_ptr, x_row, g_row, start, C, row_mask, y, lse2, coef_p, coef_y,
                                coef_w, k, c1, c2, stride_xc, stride_gc, ROW_MASKED, HAS_WEIGHT, HAS_SMOOTHING,
                                HAS_SOFTCAP, CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)
                if not REVERSE and not EVEN_C:
                    if full < C:
                        _grad_block(x_ptr, w_ptr, g_ptr, x_row, g_row, full, C, row_mask, y, lse2, coef_p, coef_y,
                                    coef_w, k, c1, c2, stride_xc, stride_gc, True, HAS_WEIGHT, HAS_SMOOTHING,
                                    HAS_SOFTCAP, CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)


@triton.jit
def _stats_block(x_ptr, w_ptr, x_row, start, C, row_mask, m, d, sum_wt, k, c1, c2, stride_xc, MASKED: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 CONTIGUOUS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """TWO_PASS's first read of one block: the rows' running statistics merged with it."""
    cols, mask = _columns(start, C, row_mask, BLOCK_R, BLOCK_C)
    t, _ = _logits(x_ptr + _offsets(x_row, cols, stride_xc, CONTIGUOUS), mask, k, c1, c2, MASKED, HAS_SOFTCAP, ACC)
    w = t
    if HAS_WEIGHT:
        w = _class_weights(w_ptr, cols, mask, MASKED, ACC)
    return _block_stats(t, w, mask, m, d, sum_wt, MASKED, HAS_SMOOTHING, HAS_WEIGHT)


@triton.jit
def _grad_block(x_ptr, w_ptr, g_ptr, x_row, g_row, start, C, row_mask, y, lse2, coef_p, coef_y, coef_w, k, c1, c2,
                stride_xc, stride_gc, MASKED: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, CONTIGUOUS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """TWO_PASS's second read of one block: its gradient from the row's lse."""
    cols, mask = _columns(start, C, row_mask, BLOCK_R, BLOCK_C)
    t, r = _logits(x_ptr + _offsets(x_row, cols, stride_xc, CONTIGUOUS), mask, k, c1, c2, MASKED, HAS_SOFTCAP, ACC)
    w = t
    if HAS_WEIGHT:
        w = _class_weights(w_ptr, cols, mask, MASKED, ACC)
    p = tl.exp2(t - lse2[:, None])
    g = _grad_tile(p, r, cols, y, w, coef_p, coef_y, coef_w, HAS_SMOOTHING, HAS_WEIGHT, HAS_SOFTCAP)
    _store_grad(g_ptr + _offsets(g_row, cols, stride_gc, CONTIGUOUS), g, mask, MASKED)


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_kernel(
    # pointers
    x_ptr,  # (N, C, S) logits
    y_ptr,  # (N, S) labels
    u_ptr,  # (N, S) bool: rows whose smoothing term counts; read only when HAS_UNIFORM_ROWS
    w_ptr,  # (C,) class weights; read only when HAS_WEIGHT
    wsum_ptr,  # () their sum, in ACC; read only when HAS_WEIGHT and HAS_SMOOTHING
    scale_ptr,  # (2,) gradient scales in ACC: [cross-entropy part, z part]; (3,) with uniform_rows: + smoothing part
    loss_ptr,  # (N * S,) per-row cross-entropy part, in ACC (without the smoothing part when HAS_UNIFORM_ROWS)
    smooth_ptr,  # (N * S,) per-row smoothing part, in ACC; written only when HAS_UNIFORM_ROWS
    z_ptr,  # (N * S,) per-row z part, in ACC; written only when HAS_ZLOSS
    g_ptr,  # (N, C, S) gradient; written only when COMPUTE_GRAD (may be x_ptr: in place)
    # shapes
    N,
    C,
    S,
    # strides
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_ys,
    stride_un,
    stride_us,
    stride_gn,
    stride_gc,
    stride_gs,
    # constants
    ignore_index,
    a,
    b,
    c,
    zc,
    cap,
    logit_scale,
    # features
    HAS_IGNORE: tl.constexpr,
    HAS_UNIFORM_ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    # layout
    S_ONE: tl.constexpr,
    ROWS_ALONG_S: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    ACC: tl.constexpr,
    # tuning (KernelConfig)
    MODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    REVERSE: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # read by the grid only
    EVEN_C: tl.constexpr,  # BLOCK_C divides C (set by the heuristic below)
):
    _tiles(
        x_ptr, y_ptr, u_ptr, w_ptr, wsum_ptr, scale_ptr, loss_ptr, smooth_ptr, z_ptr, g_ptr, N, C, S,
        stride_xn, stride_xc, stride_xs, stride_yn, stride_ys, stride_un, stride_us, stride_gn, stride_gc,
        stride_gs, ignore_index, a, b, c, zc, cap, logit_scale,
        HAS_IGNORE, HAS_UNIFORM_ROWS, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, HAS_SOFTCAP, COMPUTE_GRAD,
        S_ONE, ROWS_ALONG_S, CONTIGUOUS, ACC, MODE == 0, BLOCK_R, BLOCK_C, REVERSE, EVEN_C)


_cross_entropy_kernel = triton.heuristics({"EVEN_C": lambda args: args["C"] % args["BLOCK_C"] == 0})(
    _cross_entropy_kernel)


_TUNING_KEY = ["C", "HAS_IGNORE", "HAS_UNIFORM_ROWS", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_ZLOSS", "HAS_SOFTCAP",
               "COMPUTE_GRAD", "S_ONE", "ROWS_ALONG_S", "CONTIGUOUS"]


@functools.cache
def _autotuned(in_place: bool):
    """The kernel under triton.autotune (CUDA). A gradient written over the logits gets them back
    before every trial."""
    return triton.autotune(
        configs=[cfg.triton_config() for cfg in tuning.candidates()],
        key=_TUNING_KEY,
        prune_configs_by={"early_config_prune": tuning.prune},
        restore_value=["x_ptr"] if in_place else None,
    )(_cross_entropy_kernel)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small persistent grid still walks several tiles per program
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grid(N, C, S, rows_along_s, sms, meta):
    if rows_along_s:
        tiles = N * triton.cdiv(S, meta["BLOCK_R"])
    else:
        tiles = triton.cdiv(N * S, meta["BLOCK_R"])
    if meta["PROGRAMS_PER_SM"]:
        tiles = min(tiles, sms * meta["PROGRAMS_PER_SM"])
    return (tiles,)


@triton.jit
def _scale_kernel(
    g_ptr,  # (numel,) the gradient's storage, dense
    s_ptr,  # () the scale (grad_output), on the device
    numel,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # g *= s, and nothing at all when s == 1: loss.backward() then costs no pass over the gradient
    # (deciding that on the host would wait for the device).
    s = tl.load(s_ptr).to(ACC)
    if s != 1.0:
        for start in range(tl.program_id(0) * BLOCK, numel, tl.num_programs(0) * BLOCK):
            offs = tl.cast(start, tl.int64) + tl.arange(0, BLOCK)
            mask = offs < numel
            g = tl.load(g_ptr + offs, mask=mask)
            tl.store(g_ptr + offs, (g.to(ACC) * s).to(g_ptr.dtype.element_ty), mask=mask)


def scale_in_place(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale (a 0-d tensor on grad's device) in place, skipped on the device when scale is 1.
    grad must be dense (what empty_like of the logits gives), in any layout."""
    numel = grad.numel()
    if numel:
        flat = grad.as_strided((numel,), (1,), grad.storage_offset())
        block = 4096
        programs = min(triton.cdiv(numel, block), 8 * _sm_count(grad.device))
        acc = tl.float64 if grad.dtype == torch.float64 else tl.float32
        _scale_kernel[(programs,)](flat, scale, numel, ACC=acc, BLOCK=block, num_warps=8)
    return grad


# --------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------


def launch_cross_entropy(x3, y2, weight, scales, ce_rows, z_rows, grad3, *, ignore_index, a, b, c, z_loss,
                         softcap, logit_scale=1.0, uniform_rows=None, smooth_rows=None,
                         config: Optional[KernelConfig] = None, compile_for=None):
    """Runs the kernel over the (N, C, S) view; fills ce_rows, z_rows and grad3 (if given).

    (a, b, c) are LossForm.coefficients(C); softcap is None or > 0; uniform_rows (N, S) bool or
    None; with uniform_rows, scales holds a third entry (the smoothing part's gradient scale) and
    the smoothing part goes to smooth_rows (N * S,) instead of ce_rows. grad3 may be x3 itself
    (the gradient written over the logits). ``config`` forces a
    variant (tests); by default CUDA autotunes large problems and everything else takes the
    tuning table's fixed choice.

    ``compile_for`` (a ``triton_target.GPUTarget``) runs nothing: the call compiles, for that GPU,
    what it would run there (the fixed choice, or every configuration the autotuner keeps), with
    its arguments specialised as that launch would, and returns the compiled kernels. The tensors
    may then live on the CPU: only their dtypes, strides and alignment are read.
    """
    N, C, S = x3.shape
    if N * S == 0:
        return
    g = grad3 if grad3 is not None else x3  # never written when COMPUTE_GRAD is off
    in_place = grad3 is not None and g.data_ptr() == x3.data_ptr()
    rows_along_s = S > 1 and x3.stride(2) == 1 and g.stride(2) == 1
    contiguous = x3.stride(1) == 1 and g.stride(1) == 1
    u = uniform_rows if uniform_rows is not None else y2
    if uniform_rows is not None and (smooth_rows is None or scales.numel() < 3):
        raise ValueError("smoothce: uniform_rows needs smooth_rows and a third scale")
    interpreted = x3.device.type != "cuda" and compile_for is None
    acc_dtype = torch.float64 if x3.dtype == torch.float64 else torch.float32

    if config is not None and not config.fits(C):
        raise ValueError(f"smoothce: kernel config {config} does not fit logits {tuple(x3.shape)}")
    tune = config is None and not interpreted and N * S * C >= tuning.AUTOTUNE_MIN_ELEMENTS
    # the class weights' sum, one per call, for the smoothing term's coefficient
    wsum = weight.sum(dtype=acc_dtype) if weight is not None and b != 0.0 else scales

    args = (
        x3, y2, u, weight if weight is not None else x3, wsum, scales, ce_rows,
        smooth_rows if smooth_rows is not None else ce_rows, z_rows, g,
        N, C, S,
        x3.stride(0), x3.stride(1), x3.stride(2), y2.stride(0), y2.stride(1), u.stride(0), u.stride(1),
        g.stride(0), g.stride(1), g.stride(2),
        ignore_index if ignore_index is not None else 0, a, b, c, z_loss, softcap or 1.0, logit_scale,
    )
    features = dict(
        HAS_IGNORE=ignore_index is not None,
        HAS_UNIFORM_ROWS=uniform_rows is not None,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=b != 0.0,
        HAS_ZLOSS=z_loss != 0.0,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=grad3 is not None,
        S_ONE=S == 1,
        ROWS_ALONG_S=rows_along_s,
        CONTIGUOUS=contiguous,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
    )
    if not tune:
        config = config or tuning.default_config(C, rows_along_s)
    if tune:
        kernel, launch = _autotuned(in_place), features
    else:
        kernel = _cross_entropy_kernel
        launch = dict(features, **config.kwargs(), **config.options())
    if compile_for is not None:
        from smoothce.kernels.triton_target import compile_for as compile_kernels

        return compile_kernels(compile_for, kernel, args, launch)
    sms = _sm_count(x3.device)
    if tune:
        kernel[lambda meta: _grid(N, C, S, rows_along_s, sms, meta)](*args, **launch)
    else:
        kernel[_grid(N, C, S, rows_along_s, sms, config.kwargs())](*args, **launch)


# --------------------------------------------------------------------------------------------
# Per-row statistics, and the gradient from per-row values (smoothce::cross_entropy_stats and
# smoothce::cross_entropy_grad, kernels/cross_entropy.py)
#
# For the columns [class_offset, class_offset + C) of the classes (all of them when the offset
# is 0 and C is V; one rank's shard of a vocabulary-parallel head otherwise), with x the
# transformed logits softcap(logit_scale * logits) and w the columns' class weights:
#
#     lse_i = log sum_j exp(x_ij)    l_i = x_i(y_i) if y_i is one of the columns, else 0
#     u_i   = sum_j w_j x_ij         (only when WEIGHTED_SUM)
#
# and, given per-row g = d(result)/d(lse, l, u) and the lse of the whole row (the same lse on
# one device; the one combined over the shards otherwise),
#
#     d(result)/d(logits_ij) = (g_lse_i p_ij + g_l_i [j == y_i] + g_u_i w_j) dx_ij/dlogits_ij,
#     p_ij = exp(x_ij - lse_i),  dx/dlogits = logit_scale (1 - (x / cap)^2).
#
# Each reads every logit once (the gradient kernel writes each once): no second pass at any V.
# --------------------------------------------------------------------------------------------


@triton.jit
def _stream_rows(pid, N, S, stride_n, stride_s, S_ONE: tl.constexpr, ROWS_ALONG_S: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """Rows of tile ``pid``: (flat row index n * S + s, row mask, the rows' element offsets)."""
    if ROWS_ALONG_S:
        tiles_s = tl.cdiv(S, BLOCK_R)
        n = tl.cast(pid // tiles_s, tl.int64)
        s = (pid % tiles_s) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = s < S
        row_off = n * stride_n + s
    else:
        r = tl.cast(pid, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = r < N * S
        n, s = _rows_of(r, S, S_ONE)
        row_off = n * stride_n + s * stride_s
    return n * S + s, row_mask, row_off


@triton.jit
def _local_labels(y_ptr, flat, row_mask, S, stride_yn, stride_ys, class_offset, C):
    """The rows' labels as columns of this block of classes, and whether they are one of them."""
    y = tl.load(y_ptr + (flat // S) * stride_yn + (flat % S) * stride_ys, mask=row_mask, other=-1).to(tl.int64)
    local = y - class_offset
    return local, row_mask & (local >= 0) & (local < C)


@triton.jit
def _row_stats_kernel(
    # pointers
    x_ptr,  # (N, C, S) logits: columns [class_offset, class_offset + C) of the classes
    y_ptr,  # (N, S) labels, numbered among all the classes
    w_ptr,  # (C,) these columns' class weights; read only when HAS_WEIGHT
    out_ptr,  # (3, N * S) ACC: lse, label logit, weighted sum (the last written only when WEIGHTED_SUM)
    # shapes
    N,
    C,
    S,
    # strides
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_ys,
    # constants
    class_offset,
    cap,
    logit_scale,
    # features
    HAS_WEIGHT: tl.constexpr,
    WEIGHTED_SUM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    # layout
    S_ONE: tl.constexpr,
    ROWS_ALONG_S: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    ACC: tl.constexpr,
    # tuning (cross_entropy_tuning.stream_tile)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    flat, row_mask, x_row = _stream_rows(tl.program_id(0), N, S, stride_xn, stride_xs, S_ONE, ROWS_ALONG_S,
                                         BLOCK_R)
    ROW_MASKED: tl.constexpr = ROWS_ALONG_S or BLOCK_R > 1
    k, c1, c2 = _constants(logit_scale, cap, ACC)
    m = tl.full((BLOCK_R,), float("-inf"), ACC)
    d = tl.zeros((BLOCK_R,), ACC)
    sum_wt = tl.zeros((BLOCK_R,), ACC)
    full = C // BLOCK_C * BLOCK_C  # columns in whole blocks: no column mask there
    for start in range(0, full, BLOCK_C):  # one read: max and sum-exp merged online
        m, d, sum_wt = _stats_block(x_ptr, w_ptr, x_row, start, C, row_mask, m, d, sum_wt, k, c1, c2, stride_xc,
                                    ROW_MASKED, HAS_WEIGHT, WEIGHTED_SUM, HAS_SOFTCAP, CONTIGUOUS, ACC, BLOCK_R,
                                    BLOCK_C)
    if full < C:
        m, d, sum_wt = _stats_block(x_ptr, w_ptr, x_row, full, C, row_mask, m, d, sum_wt, k, c1, c2, stride_xc,
                                    True, HAS_WEIGHT, WEIGHTED_SUM, HAS_SOFTCAP, CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)
    m = tl.where(m == float("-inf"), 0.0, m)
    local, here = _local_labels(y_ptr, flat, row_mask, S, stride_yn, stride_ys, class_offset, C)
    t_y = _label_logit(x_ptr + x_row + tl.where(here, local, 0) * stride_xc, here, k, c1, c2, HAS_SOFTCAP, ACC)
    M = N * S
    # back to natural units; no log(0) past the end
    tl.store(out_ptr + flat, (m + tl.log2(tl.where(row_mask, d, 1.0))) * LN2, mask=row_mask)
    tl.store(out_ptr + M + flat, t_y * LN2, mask=row_mask)
    if WEIGHTED_SUM:
        tl.store(out_ptr + 2 * M + flat, sum_wt * LN2, mask=row_mask)


@triton.jit
def _row_grad_kernel(
    # pointers
    gs_ptr,  # (3, N * S) ACC: d(result)/d(lse, label logit, weighted sum)
    x_ptr,  # (N, C, S) logits, as for the statistics
    y_ptr,  # (N, S) labels, numbered among all the classes
    w_ptr,  # (C,) class weights; read only when HAS_WEIGHT
    lse_ptr,  # (N * S,) ACC: the lse of the whole row
    g_ptr,  # (N, C, S) the gradient
    # shapes
    N,
    C,
    S,
    # strides
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_ys,
    stride_gn,
    stride_gc,
    stride_gs,
    # constants
    class_offset,
    cap,
    logit_scale,
    # features
    HAS_WEIGHT: tl.constexpr,
    WEIGHTED_SUM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    # layout
    S_ONE: tl.constexpr,
    ROWS_ALONG_S: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    ACC: tl.constexpr,
    # tuning (cross_entropy_tuning.stream_tile)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # A 2-D grid: tiles of rows (axis 0) by blocks of columns (axis 1), each independent.
    flat, row_mask, x_row = _stream_rows(tl.program_id(0), N, S, stride_xn, stride_xs, S_ONE, ROWS_ALONG_S,
                                         BLOCK_R)
    _, _, g_row = _stream_rows(tl.program_id(0), N, S, stride_gn, stride_gs, S_ONE, ROWS_ALONG_S, BLOCK_R)
    M = N * S
    k, c1, c2 = _constants(logit_scale, cap, ACC)
    lse2 = tl.load(lse_ptr + flat, mask=row_mask, other=0.0).to(ACC) * LOG2E
    coef_p = tl.load(gs_ptr + flat, mask=row_mask, other=0.0).to(ACC) * logit_scale
    coef_y = -tl.load(gs_ptr + M + flat, mask=row_mask, other=0.0).to(ACC) * logit_scale
    if WEIGHTED_SUM:
        coef_w = -tl.load(gs_ptr + 2 * M + flat, mask=row_mask, other=0.0).to(ACC) * logit_scale
    else:
        coef_w = tl.zeros_like(coef_p)
    local, _ = _local_labels(y_ptr, flat, row_mask, S, stride_yn, stride_ys, class_offset, C)
    cols, mask = _columns(tl.program_id(1) * BLOCK_C, C, row_mask, BLOCK_R, BLOCK_C)
    t, r = _logits(x_ptr + _offsets(x_row, cols, stride_xc, CONTIGUOUS), mask, k, c1, c2, True, HAS_SOFTCAP, ACC)
    w = t
    if HAS_WEIGHT:
        w = _class_weights(w_ptr, cols, mask, True, ACC)
    g = _grad_tile(tl.exp2(t - lse2[:, None]), r, cols, local, w, coef_p, coef_y, coef_w, WEIGHTED_SUM, HAS_WEIGHT,
                   HAS_SOFTCAP)
    _store_grad(g_ptr + _offsets(g_row, cols, stride_gc, CONTIGUOUS), g, mask, True)


def _launch_stream(kernel, pointers, x3, y2, weight, written, *, class_offset, logit_scale, softcap, weighted_sum,
                   tile, by_columns, compile_for=None):
    """Launches a one-read kernel over the (N, C, S) logits x3: ``pointers`` first, then the shapes,
    the strides of x3, y2 and each tensor in ``written``, the constants and the constexprs; a grid of
    row tiles, by blocks of columns too with ``by_columns``. With ``compile_for`` (a
    ``triton_target.GPUTarget``) nothing runs: returns what the launch compiles for that GPU."""
    N, C, S = x3.shape
    tensors = (x3,) + written
    rows_along_s = S > 1 and all(t.stride(2) == 1 for t in tensors)
    contiguous = all(t.stride(1) == 1 for t in tensors)
    tile = tile or tuning.stream_tile(C, rows_along_s)
    row_tiles = N * triton.cdiv(S, tile.block_r) if rows_along_s else triton.cdiv(N * S, tile.block_r)
    grid = (row_tiles, triton.cdiv(C, tile.block_c)) if by_columns else (row_tiles,)
    strides = [st for t in (x3, y2) + written for st in t.stride()]
    args = (*pointers, N, C, S, *strides, class_offset, softcap or 1.0, logit_scale)
    launch = dict(HAS_WEIGHT=weight is not None, WEIGHTED_SUM=weighted_sum, HAS_SOFTCAP=softcap is not None,
                  S_ONE=S == 1, ROWS_ALONG_S=rows_along_s, CONTIGUOUS=contiguous,
                  ACC=tl.float64 if x3.dtype == torch.float64 else tl.float32,
                  BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, num_warps=tile.num_warps)
    if compile_for is not None:
        from smoothce.kernels.triton_target import compile_for as compile_kernels

        return compile_kernels(compile_for, kernel, args, launch)
    kernel[grid](*args, **launch)


def launch_row_stats(x3, y2, weight, out, *, class_offset=0, logit_scale=1.0, softcap=None, weighted_sum=False,
                     tile: Optional[tuning.Tile] = None, compile_for=None):
    """Fills out (3, N * S) with each row's lse, label logit and (with weighted_sum) sum_j w_j x_j
    of the (N, C, S) logits: columns [class_offset, class_offset + C) of the classes, y2 (N, S)
    labels among all of them. ``tile`` forces a tile (tests); ``compile_for``: see _launch_stream."""
    if x3.shape[0] * x3.shape[2] == 0:
        return []
    return _launch_stream(_row_stats_kernel, (x3, y2, weight if weight is not None else x3, out), x3, y2, weight, (),
                          class_offset=class_offset, logit_scale=logit_scale, softcap=softcap,
                          weighted_sum=weighted_sum, tile=tile, by_columns=False, compile_for=compile_for)


def launch_row_grad(grad_stats, x3, y2, weight, lse, grad3, *, class_offset=0, logit_scale=1.0, softcap=None,
                    weighted_sum=False, tile: Optional[tuning.Tile] = None, compile_for=None):
    """Writes grad3 (N, C, S): the gradient of a result whose derivatives with respect to each
    row's (lse, label logit, weighted sum) are grad_stats (3, N * S), given the lse (N * S,) of
    the whole row. Arguments as for launch_row_stats."""
    if grad3.numel() == 0:
        return []
    return _launch_stream(_row_grad_kernel, (grad_stats, x3, y2, weight if weight is not None else x3, lse, grad3),
                          x3, y2, weight, (grad3,), class_offset=class_offset, logit_scale=logit_scale,
                          softcap=softcap, weighted_sum=weighted_sum, tile=tile, by_columns=True,
                          compile_for=compile_for)
