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
and the smoothing part of the loss is written apart, to be reduced by its own divisor.

Layout, low to high: jit helpers -> the three modes (tiles of rows in one or two passes; split
rows) -> the kernel -> autotuned versions -> the backward's scaling -> the launcher -> the
statistics and gradient kernels and their launchers. Which mode and block sizes run where is the
tuning table's business (kernels/cross_entropy_tuning.py).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from smoothce.kernels import cross_entropy_tuning as tuning
from smoothce.kernels.cross_entropy_tuning import ONE_PASS, SPLIT, TWO_PASS, KernelConfig
# The tile helpers the soft-target kernel shares, under the names this file has always used.
from smoothce.kernels.triton_tiles import (
    class_weights_of as _class_weights,
    columns_of as _columns,
    logits_of as _logits,
    merge_softmax as _merge,
    offsets_of as _offsets,
    rows_of as _rows_of,
    transformed_of as _transformed,
)

# --------------------------------------------------------------------------------------------
# jit helpers: one tile of logits, per-row statistics, per-row results, one tile of gradient
# --------------------------------------------------------------------------------------------


@triton.jit
def _label_logit(ptrs, mask, logit_scale, cap, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """The transformed logit of each row's label (a gather, one per row)."""
    return _transformed(tl.load(ptrs, mask=mask, other=0.0), logit_scale, cap, HAS_SOFTCAP, ACC)


@triton.jit
def _store_grad(ptrs, g, mask):
    """A tile of gradient, in the gradient's dtype."""
    tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _tile_stats(x, mask, w, HAS_SMOOTHING: tl.constexpr):
    """Per row of an (R, B) tile: max, sum exp(x - max), sum w x and sum w (the last two only
    with smoothing). A row of -inf gives max -inf and sum 0, never nan."""
    xm = tl.where(mask, x, float("-inf"))
    m = tl.max(xm, 1)
    d = tl.sum(tl.exp(xm - tl.where(m == float("-inf"), 0.0, m)[:, None]), 1)
    if HAS_SMOOTHING:  # masked lanes hold x = 0 and w = 0
        sum_wx = tl.sum(w * x, 1)
        sum_w = tl.sum(tl.where(mask, w, 0.0), 1)
    else:
        sum_wx = tl.zeros_like(d)
        sum_w = tl.zeros_like(d)
    return m, d, sum_wx, sum_w


@triton.jit
def _row_labels(y_ptrs, u_ptrs, row_mask, C, ignore_index, HAS_IGNORE: tl.constexpr,
                HAS_UNIFORM_ROWS: tl.constexpr, ACC: tl.constexpr):
    """Labels of a tile's rows: (y, y clamped into [0, C), label_on, uniform_on)."""
    y = tl.load(y_ptrs, mask=row_mask, other=0).to(tl.int64)
    in_range = (y >= 0) & (y < C)
    y_safe = tl.where(in_range, y, 0)
    label_on = tl.where(in_range, 1.0, float("nan")).to(ACC)
    if HAS_IGNORE:
        label_on = tl.where(y == ignore_index, 0.0, label_on)
    if HAS_UNIFORM_ROWS:
        uniform_on = tl.load(u_ptrs, mask=row_mask, other=0).to(ACC)
    else:
        uniform_on = label_on
    return y, y_safe, label_on, uniform_on


@triton.jit
def _row_results(lse, x_y, w_y, sum_w, sum_wx, label_on, uniform_on, scale_ptr, a, b, c, zc, logit_scale,
                 HAS_UNIFORM_ROWS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """Per row: the cross-entropy part, the smoothing part when it is kept apart (uniform_rows:
    it is reduced by its own divisor), the z part, and the gradient's coefficients (of p, of
    [j == y], of w_j); see the module docstring."""
    ce = label_on * (a * w_y * (lse - x_y) + c)
    smooth = tl.zeros_like(ce)
    if HAS_SMOOTHING:
        smooth = uniform_on * b * (sum_w * lse - sum_wx)
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
def _grad_tile(x, lse, cols, y, w, coef_p, coef_y, coef_w, cap, HAS_SMOOTHING: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr):
    """d(loss)/d(logits) of an (R, B) tile from its transformed logits x."""
    g = coef_p[:, None] * tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == y[:, None], coef_y[:, None], 0.0)
    if HAS_SMOOTHING:
        g -= coef_w[:, None] * w
    if HAS_SOFTCAP:
        g *= 1.0 - (x / cap) * (x / cap)
    return g


# --------------------------------------------------------------------------------------------
# The modes
# --------------------------------------------------------------------------------------------


@triton.jit
def _tiles(
    x_ptr, y_ptr, u_ptr, w_ptr, scale_ptr, loss_ptr, smooth_ptr, z_ptr, g_ptr,
    N, C, S,
    stride_xn, stride_xc, stride_xs, stride_yn, stride_ys, stride_un, stride_us, stride_gn, stride_gc, stride_gs,
    ignore_index, a, b, c, zc, cap, logit_scale,
    HAS_IGNORE: tl.constexpr, HAS_UNIFORM_ROWS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    S_ONE: tl.constexpr, ROWS_ALONG_S: tl.constexpr, CONTIGUOUS: tl.constexpr, ACC: tl.constexpr,
    ONE_READ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr,
):
    """ONE_PASS (ONE_READ: the tile is the whole row) and TWO_PASS: tiles of BLOCK_R rows.

    Rows are (n, s) pairs. ROWS_ALONG_S: a tile is BLOCK_R consecutive s of one n, which are
    adjacent in memory (stride_xs == 1, the class-dim-1 layout), so its loads coalesce across
    rows. Otherwise a tile is BLOCK_R consecutive flat rows n * S + s. CONTIGUOUS: the class
    stride is 1 (known at compile time, so loads vectorise). A grid smaller than the number of
    tiles makes the programs persistent: each walks every nprog-th tile.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if ROWS_ALONG_S:
        tiles_s = tl.cdiv(S, BLOCK_R)
        num_tiles = N * tiles_s
    else:
        num_tiles = tl.cdiv(N * S, BLOCK_R)
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
        y, y_safe, label_on, uniform_on = _row_labels(
            y_ptr + n * stride_yn + s * stride_ys, u_ptr + n * stride_un + s * stride_us, row_mask, C, ignore_index,
            HAS_IGNORE, HAS_UNIFORM_ROWS, ACC)
        x_y = _label_logit(x_ptr + x_row + y_safe * stride_xc, row_mask, logit_scale, cap, HAS_SOFTCAP, ACC)
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y_safe, mask=row_mask, other=0.0).to(ACC)
        else:
            w_y = tl.full((BLOCK_R,), 1.0, ACC)

        if ONE_READ:
            cols, col_mask, mask = _columns(0, C, row_mask, BLOCK_C)
            x = _logits(x_ptr + _offsets(x_row, cols, stride_xc, CONTIGUOUS), mask, logit_scale, cap, HAS_SOFTCAP, ACC)
            w = _class_weights(w_ptr, cols, col_mask, HAS_WEIGHT, ACC)
            m, d, sum_wx, sum_w = _tile_stats(x, mask, w, HAS_SMOOTHING)
        else:
            m = tl.full((BLOCK_R,), float("-inf"), ACC)
            d = tl.zeros((BLOCK_R,), ACC)
            sum_wx = tl.zeros((BLOCK_R,), ACC)
            sum_w = tl.zeros((BLOCK_R,), ACC)
            for start in range(0, C, BLOCK_C):
                cols, col_mask, mask = _columns(start, C, row_mask, BLOCK_C)
                xb = _logits(x_ptr + _offsets(x_row, cols, stride_xc, CONTIGUOUS), mask, logit_scale, cap, HAS_SOFTCAP,
                             ACC)
                wb = _class_weights(w_ptr, cols, col_mask, HAS_WEIGHT, ACC)
                m_b, d_b, sum_wx_b, sum_w_b = _tile_stats(xb, mask, wb, HAS_SMOOTHING)
                m, d = _merge(m, d, m_b, d_b)
                sum_wx += sum_wx_b
                sum_w += sum_w_b
        # rows past the end of the tile's range: finite garbage, never stored
        lse = tl.where(row_mask, m, 0.0) + tl.log(tl.where(row_mask, d, 1.0))
        ce, smooth, z, coef_p, coef_y, coef_w = _row_results(
            lse, x_y, w_y, sum_w, sum_wx, label_on, uniform_on, scale_ptr, a, b, c, zc, logit_scale,
            HAS_UNIFORM_ROWS, HAS_SMOOTHING, HAS_ZLOSS)
        tl.store(loss_ptr + flat, ce, mask=row_mask)
        if HAS_UNIFORM_ROWS:
            tl.store(smooth_ptr + flat, smooth, mask=row_mask)
        if HAS_ZLOSS:
            tl.store(z_ptr + flat, z, mask=row_mask)

        if COMPUTE_GRAD:
            if ONE_READ:
                g = _grad_tile(x, lse, cols, y, w, coef_p, coef_y, coef_w, cap, HAS_SMOOTHING, HAS_SOFTCAP)
                _store_grad(g_ptr + _offsets(g_row, cols, stride_gc, CONTIGUOUS), g, mask)
            else:
                # Second read. In reverse, the blocks read last in pass 1 (likeliest still in L2)
                # come first.
                blocks = tl.cdiv(C, BLOCK_C)
                for i in range(0, blocks):
                    if REVERSE:
                        start = (blocks - 1 - i) * BLOCK_C
                    else:
                        start = i * BLOCK_C
                    cols, col_mask, mask = _columns(start, C, row_mask, BLOCK_C)
                    xb = _logits(x_ptr + _offsets(x_row, cols, stride_xc, CONTIGUOUS), mask, logit_scale, cap,
                                 HAS_SOFTCAP, ACC)
                    wb = _class_weights(w_ptr, cols, col_mask, HAS_WEIGHT, ACC)
                    g = _grad_tile(xb, lse, cols, y, wb, coef_p, coef_y, coef_w, cap, HAS_SMOOTHING, HAS_SOFTCAP)
                    _store_grad(g_ptr + _offsets(g_row, cols, stride_gc, CONTIGUOUS), g, mask)


@triton.jit
def _slice_stats(x_ptr, w_ptr, x_row, j, C, logit_scale, cap, HAS_WEIGHT: tl.constexpr,
                 HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Slice j of a contiguous row, as a (1, BLOCK_C) tile, and its statistics. The owner and a
    partner standing in for it run this same code, so both get the same bits."""
    cols, col_mask, mask = _columns(j * BLOCK_C, C, x_row >= 0, BLOCK_C)
    x = _logits(x_ptr + _offsets(x_row, cols, 1, True), mask, logit_scale, cap, HAS_SOFTCAP, ACC)
    w = _class_weights(w_ptr, cols, col_mask, HAS_WEIGHT, ACC)
    m, d, sum_wx, sum_w = _tile_stats(x, mask, w, HAS_SMOOTHING)
    return x, w, cols, mask, m, d, sum_wx, sum_w


@triton.jit
def _split_rows(
    x_ptr, y_ptr, u_ptr, w_ptr, scale_ptr, loss_ptr, smooth_ptr, z_ptr, g_ptr, flags_ptr, part_ptr,
    N, C, S,
    stride_xn, stride_xs, stride_yn, stride_ys, stride_un, stride_us, stride_gn, stride_gs,
    ignore_index, a, b, c, zc, cap, logit_scale,
    HAS_IGNORE: tl.constexpr, HAS_UNIFORM_ROWS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    S_ONE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, SPIN: tl.constexpr,
):
    """SPLIT: P = cdiv(C, BLOCK_C) programs per row, each with one slice in registers.

    Each program publishes its slice's (max, sum-exp, sum w x, sum w) to the workspace
    (release), then reads its partners' (acquire, bypassing L1) and merges all P in slice order,
    so every program of a row finds the same lse, and writes its slice's gradient from
    registers: one read and one write of every logit.

    Work ids come from a ticket counter (flags_ptr[0]), not program_id: a program only ever
    waits for partners that took their tickets, i.e. started, or will start once a slot frees
    up, so nothing deadlocks while P programs fit on the device. A partner that has not
    published after SPIN polls is computed from memory instead (same code, same bits); under the
    interpreter, which runs programs one after another, SPIN is 0 and that is the rule.
    """
    ticket = tl.atomic_add(flags_ptr, 1)
    P = tl.cdiv(C, BLOCK_C)
    row = ticket // P
    j = ticket % P
    r = row.to(tl.int64) + tl.zeros((1,), tl.int64)  # the row as a 1-row tile
    n, s = _rows_of(r, S, S_ONE)
    x_row = n * stride_xn + s * stride_xs
    x, w, cols, mask, m, d, sum_wx, sum_w = _slice_stats(
        x_ptr, w_ptr, x_row, j, C, logit_scale, cap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC, BLOCK_C)
    part = part_ptr + ticket.to(tl.int64) * 4 + tl.zeros((1,), tl.int64)
    tl.store(part, m)
    tl.store(part + 1, d)
    tl.store(part + 2, sum_wx)
    tl.store(part + 3, sum_w)
    # Every thread's stores happen before the flag: the barrier orders them before the thread that
    # releases it (release is cumulative over what that thread has synchronised with).
    tl.debug_barrier()
    tl.atomic_xchg(flags_ptr + 1 + ticket, 1, sem="release")

    row_m = tl.full((1,), float("-inf"), ACC)
    row_d = tl.zeros((1,), ACC)
    row_wx = tl.zeros((1,), ACC)
    row_w = tl.zeros((1,), ACC)
    for q in range(0, P):
        if q == j:
            q_m, q_d, q_wx, q_w = m, d, sum_wx, sum_w
        else:
            slot = row * P + q
            flag = tl.atomic_add(flags_ptr + 1 + slot, 0, sem="acquire")
            polls = tl.zeros((), tl.int32)
            while (flag == 0) & (polls < SPIN):
                flag = tl.atomic_add(flags_ptr + 1 + slot, 0, sem="acquire")
                polls += 1
            tl.debug_barrier()  # the acquire happens before every thread's loads below
            if flag != 0:
                q_part = part_ptr + slot.to(tl.int64) * 4 + tl.zeros((1,), tl.int64)
                q_m = tl.load(q_part, volatile=True)
                q_d = tl.load(q_part + 1, volatile=True)
                q_wx = tl.load(q_part + 2, volatile=True)
                q_w = tl.load(q_part + 3, volatile=True)
            else:
                _x, _w, _cols, _mask, q_m, q_d, q_wx, q_w = _slice_stats(
                    x_ptr, w_ptr, x_row, q, C, logit_scale, cap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC,
                    BLOCK_C)
        row_m, row_d = _merge(row_m, row_d, q_m, q_d)
        row_wx += q_wx
        row_w += q_w
    lse = row_m + tl.log(row_d)

    y, y_safe, label_on, uniform_on = _row_labels(
        y_ptr + n * stride_yn + s * stride_ys, u_ptr + n * stride_un + s * stride_us, r >= 0, C, ignore_index,
        HAS_IGNORE, HAS_UNIFORM_ROWS, ACC)
    x_y = _label_logit(x_ptr + x_row + y_safe, r >= 0, logit_scale, cap, HAS_SOFTCAP, ACC)
    if HAS_WEIGHT:
        w_y = tl.load(w_ptr + y_safe).to(ACC)
    else:
        w_y = tl.full((1,), 1.0, ACC)
    ce, smooth, z, coef_p, coef_y, coef_w = _row_results(
        lse, x_y, w_y, row_w, row_wx, label_on, uniform_on, scale_ptr, a, b, c, zc, logit_scale,
        HAS_UNIFORM_ROWS, HAS_SMOOTHING, HAS_ZLOSS)
    first = (r * 0 + j) == 0  # one program stores the row's results
    tl.store(loss_ptr + r, ce, mask=first)
    if HAS_UNIFORM_ROWS:
        tl.store(smooth_ptr + r, smooth, mask=first)
    if HAS_ZLOSS:
        tl.store(z_ptr + r, z, mask=first)
    if COMPUTE_GRAD:
        g = _grad_tile(x, lse, cols, y, w, coef_p, coef_y, coef_w, cap, HAS_SMOOTHING, HAS_SOFTCAP)
        g_row = n * stride_gn + s * stride_gs
        _store_grad(g_ptr + _offsets(g_row, cols, 1, True), g, mask)


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
    scale_ptr,  # (2,) gradient scales in ACC: [cross-entropy part, z part]; (3,) with uniform_rows: + smoothing part
    loss_ptr,  # (N * S,) per-row cross-entropy part, in ACC (without the smoothing part when HAS_UNIFORM_ROWS)
    smooth_ptr,  # (N * S,) per-row smoothing part, in ACC; written only when HAS_UNIFORM_ROWS
    z_ptr,  # (N * S,) per-row z part, in ACC; written only when HAS_ZLOSS
    g_ptr,  # (N, C, S) gradient; written only when COMPUTE_GRAD (may be x_ptr: in place)
    flags_ptr,  # (1 + N * S * P,) int32, zeroed: SPLIT's ticket counter and published flags
    part_ptr,  # (N * S * P * 4,) ACC: SPLIT's partial statistics
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
    SPIN: tl.constexpr,
    # tuning (KernelConfig)
    MODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    REVERSE: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # read by the grid only
):
    if MODE == 2:  # SPLIT
        _split_rows(
            x_ptr, y_ptr, u_ptr, w_ptr, scale_ptr, loss_ptr, smooth_ptr, z_ptr, g_ptr, flags_ptr, part_ptr, N, C, S,
            stride_xn, stride_xs, stride_yn, stride_ys, stride_un, stride_us, stride_gn, stride_gs,
            ignore_index, a, b, c, zc, cap, logit_scale,
            HAS_IGNORE, HAS_UNIFORM_ROWS, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, HAS_SOFTCAP, COMPUTE_GRAD,
            S_ONE, ACC, BLOCK_C, SPIN)
    else:
        _tiles(
            x_ptr, y_ptr, u_ptr, w_ptr, scale_ptr, loss_ptr, smooth_ptr, z_ptr, g_ptr, N, C, S,
            stride_xn, stride_xc, stride_xs, stride_yn, stride_ys, stride_un, stride_us, stride_gn, stride_gc,
            stride_gs, ignore_index, a, b, c, zc, cap, logit_scale,
            HAS_IGNORE, HAS_UNIFORM_ROWS, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, HAS_SOFTCAP, COMPUTE_GRAD,
            S_ONE, ROWS_ALONG_S, CONTIGUOUS, ACC, MODE == 0, BLOCK_R, BLOCK_C, REVERSE)


_TUNING_KEY = ["C", "HAS_IGNORE", "HAS_UNIFORM_ROWS", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_ZLOSS", "HAS_SOFTCAP",
               "COMPUTE_GRAD", "S_ONE", "ROWS_ALONG_S", "CONTIGUOUS"]


@functools.cache
def _autotuned(in_place: bool):
    """The kernel under triton.autotune (CUDA). Trials start from zeroed SPLIT flags; a gradient
    written over the logits gets them back before every trial."""
    return triton.autotune(
        configs=[cfg.triton_config() for cfg in tuning.candidates()],
        key=_TUNING_KEY,
        prune_configs_by={"early_config_prune": tuning.prune_for(in_place)},
        reset_to_zero=["flags_ptr"],
        restore_value=["x_ptr"] if in_place else None,
    )(_cross_entropy_kernel)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small persistent grid still walks several tiles per program
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grid(N, C, S, rows_along_s, sms, meta):
    if meta["MODE"] == SPLIT:
        return (N * S * triton.cdiv(C, meta["BLOCK_C"]),)
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

    if config is not None and not config.fits(C, rows_along_s, contiguous, in_place):
        raise ValueError(f"smoothce: kernel config {config} does not fit logits {tuple(x3.shape)} with strides "
                         f"{x3.stride()} (in place: {in_place})")
    tune = config is None and not interpreted and N * S * C >= tuning.AUTOTUNE_MIN_ELEMENTS
    if tune:
        may_run = tuning.pick(tuning.candidates(), C, rows_along_s, contiguous, in_place)
    else:
        config = config or tuning.default_config(C, rows_along_s, contiguous, in_place)
        may_run = [config]
    # SPLIT's workspace, for the most slices a configuration that may run has (tiny next to the
    # logits); a single zeroed counter otherwise.
    slices = max((triton.cdiv(C, cfg.block_c) for cfg in may_run if cfg.mode == SPLIT), default=0)
    flags = torch.zeros(1 + N * S * slices, dtype=torch.int32, device=x3.device)
    parts = torch.empty(max(N * S * slices * 4, 1), dtype=acc_dtype, device=x3.device)

    args = (
        x3, y2, u, weight if weight is not None else x3, scales, ce_rows,
        smooth_rows if smooth_rows is not None else ce_rows, z_rows, g, flags, parts,
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
        SPIN=0 if interpreted else 1 << 14,
    )
    if tune:
        kernel, launch = _autotuned(in_place), features
    else:
        kernel = _cross_entropy_kernel
        launch = dict(features, **config.kwargs(), num_warps=config.num_warps, num_stages=config.num_stages)
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
    m = tl.full((BLOCK_R,), float("-inf"), ACC)
    d = tl.zeros((BLOCK_R,), ACC)
    sum_wx = tl.zeros((BLOCK_R,), ACC)
    for start in range(0, C, BLOCK_C):  # one read: max and sum-exp merged online
        cols, col_mask, mask = _columns(start, C, row_mask, BLOCK_C)
        xb = _logits(x_ptr + _offsets(x_row, cols, stride_xc, CONTIGUOUS), mask, logit_scale, cap, HAS_SOFTCAP, ACC)
        wb = _class_weights(w_ptr, cols, col_mask, HAS_WEIGHT, ACC)
        m_b, d_b, sum_wx_b, _ = _tile_stats(xb, mask, wb, WEIGHTED_SUM)
        m, d = _merge(m, d, m_b, d_b)
        sum_wx += sum_wx_b
    local, here = _local_labels(y_ptr, flat, row_mask, S, stride_yn, stride_ys, class_offset, C)
    x_y = _logits(x_ptr + x_row + tl.where(here, local, 0) * stride_xc, here, logit_scale, cap, HAS_SOFTCAP, ACC)
    M = N * S
    tl.store(out_ptr + flat, m + tl.log(tl.where(row_mask, d, 1.0)), mask=row_mask)  # no log(0) past the end
    tl.store(out_ptr + M + flat, x_y, mask=row_mask)
    if WEIGHTED_SUM:
        tl.store(out_ptr + 2 * M + flat, sum_wx, mask=row_mask)


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
    lse = tl.load(lse_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    coef_p = tl.load(gs_ptr + flat, mask=row_mask, other=0.0).to(ACC) * logit_scale
    coef_y = -tl.load(gs_ptr + M + flat, mask=row_mask, other=0.0).to(ACC) * logit_scale
    if WEIGHTED_SUM:
        coef_w = -tl.load(gs_ptr + 2 * M + flat, mask=row_mask, other=0.0).to(ACC) * logit_scale
    else:
        coef_w = tl.zeros_like(coef_p)
    local, _ = _local_labels(y_ptr, flat, row_mask, S, stride_yn, stride_ys, class_offset, C)
    cols, col_mask, mask = _columns(tl.program_id(1) * BLOCK_C, C, row_mask, BLOCK_C)
    x = _logits(x_ptr + _offsets(x_row, cols, stride_xc, CONTIGUOUS), mask, logit_scale, cap, HAS_SOFTCAP, ACC)
    w = _class_weights(w_ptr, cols, col_mask, HAS_WEIGHT, ACC)
    g = _grad_tile(x, lse, cols, local, w, coef_p, coef_y, coef_w, cap, WEIGHTED_SUM, HAS_SOFTCAP)
    tl.store(g_ptr + _offsets(g_row, cols, stride_gc, CONTIGUOUS), g.to(g_ptr.dtype.element_ty), mask=mask)


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
