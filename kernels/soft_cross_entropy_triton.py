"""The Triton kernel of smoothce::soft_cross_entropy: a row's loss against its target and its
gradient in one launch.

The math is kernels/soft_cross_entropy_torch.py's (its docstring derives the gradient); the
per-row coefficients k_y, k_yb, k_u, k_z, k_f, k_r come from kernels/soft_inputs.py. Per row, one
pass over the columns gathers, with online rescaling by a running max where a softmax is involved:

    the student's softmax at the primary scale (1 with a label term, else soft_logit_scale):
        max m, sum-exp d; and at soft_logit_scale too when both kinds of term differ in scale
    sum_j w_j x_j (label smoothing on either part)
    the target's mass sum_j w_j q_j and sum_j w_j q_j x_j, its entropy sum_j q_j log q_j (soft_kl);
        for a teacher's logits u, q = exp(tau u - m_t) / d_t: these three are rescaled with the
        teacher's running max m_t as d_t is, so its softmax is never stored
    sum_j exp(s_j - m_s) (s_j - log q_j) for the reverse KL, rescaled as the soft d is

then the loss, and the gradient from the same tile (ONE_PASS: the tiles of both tensors held in
registers, 3 N V accesses in all) or from a second pass over the columns (TWO_PASS). A gradient
deferred to backward runs this kernel again with the statistics forward kept (FROM_STATS: the
first pass is skipped) and coefficients that carry grad_output.

Masked lanes: the student loads 0 and the target 0 (weights 0); every sum that could meet
0 * inf there (the entropy, the reverse KL, the teacher's softmax) masks them itself. In lanes
that count, products are as eager computes them (a probability of 0 against a logit of -inf is nan).

Layout, low to high: jit helpers -> the kernel -> the launcher.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from smoothce.kernels import soft_cross_entropy_tuning as tuning
from smoothce.kernels.cross_entropy_tuning import ONE_PASS, KernelConfig
from smoothce.kernels.soft_inputs import COEFFICIENTS, STATISTICS, Terms
from smoothce.kernels.triton_tiles import (
    LOG2E, block_start, class_weights_tile, columns_of, logits_tile, offsets_of, rows_of, store_gradient_tile,
    transformed,
)

PROBS, LOG_PROBS, LOGITS = 0, 1, 2
_TARGET_CODES = {"probs": PROBS, "log_probs": LOG_PROBS, "logits": LOGITS}

# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _safe(m):
    """A running max as a shift for exp: 0 for a row (so far) of -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rescale(m, m_new):
    """exp(m - m_new): what sums shifted by the old max are multiplied by under the new one."""
    return tl.where(m == float("-inf"), 0.0, tl.exp(m - _safe(m_new)))


@triton.jit
def _term(k, v):
    """k v, and an exact 0 on rows where the term does not count (k = 0), whatever v is."""
    return tl.where(k == 0.0, 0.0, k * v)


@triton.jit
def _target_of(t, tau, lse_t, TARGET: tl.constexpr):
    """(q, log q) of a tile of targets, given the teacher's logsumexp for logits. Masked lanes
    give garbage the caller never stores."""
    if TARGET == 0:
        q = t
        log_q = tl.log(t)
    elif TARGET == 1:
        q = tl.exp(t)
        log_q = t
    else:
        log_q = tau * t - lse_t[:, None]
        q = tl.exp(log_q)
    return q, log_q


@triton.jit
def _target_tile(ptrs, mask, ACC: tl.constexpr):
    """A tile of the target as stored, in ACC; masked lanes read 0."""
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _constants(logit_scale, cap, ACC: tl.constexpr):
    """(k, c1, c2) of triton_tiles.transformed for the logits themselves (this kernel's math is in
    natural-log units): x = raw k without a softcap; e = exp2(raw c1), x = c2 (1 - 2r). In ACC."""
    k = tl.zeros((), ACC) + logit_scale
    cap = tl.zeros((), ACC) + cap
    return k, 2.0 * k * LOG2E / cap, cap


@triton.jit
def _label_logit(ptrs, mask, k, c1, c2, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """The transformed logit of each row's label (one per row, not a tile)."""
    x, _ = transformed(tl.load(ptrs, mask=mask, other=0.0), k, c1, c2, HAS_SOFTCAP, ACC)
    return x


@triton.jit
def _load_block(x_ptr, t_ptr, w_ptr, x_row, t_row, start, C, row_mask, stride_xc, stride_tc, k, c1, c2,
                HAS_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                CONTIGUOUS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns [start, start + BLOCK_C) of a tile: (cols, mask, the student's logits transformed
    and the softcap's r (triton_tiles.transformed), the target as stored (the logits again without
    one: never read), the class weights in the tile's shape (or the columns' mask, (1, B)))."""
    cols, col_mask, mask = columns_of(start, C, row_mask, BLOCK_C)
    x, r = logits_tile(x_ptr + offsets_of(x_row, cols, stride_xc, CONTIGUOUS), mask, k, c1, c2, True, HAS_SOFTCAP,
                       ACC)
    t = x
    if HAS_TARGET:
        t = _target_tile(t_ptr + offsets_of(t_row, cols, stride_tc, CONTIGUOUS), mask, ACC)
    if HAS_WEIGHT:
        w = class_weights_tile(w_ptr, tl.broadcast_to(cols[None, :], (BLOCK_R, BLOCK_C)), mask, True, ACC)
    else:
        w = col_mask.to(ACC)[None, :]
    return cols, mask, x, r, t, w


@triton.jit
def _block_stats(x, t, w, mask, sig1, sigma, tau,
                 TARGET: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_KL: tl.constexpr, HAS_REVERSE: tl.constexpr,
                 TWO_SCALES: tl.constexpr, SMOOTHING_SUM: tl.constexpr):
    """Per row of an (R, B) tile, each sum shifted by the tile's own max where it has one:
    (m1, d1) the student's softmax at sig1, (m2, d2) at sigma (TWO_SCALES), sum w x, the teacher's
    (m_t, d_t) (logits), the target's mass, sum w q x, entropy, and the reverse KL's sum."""
    xs = tl.where(mask, x * sig1, float("-inf"))
    m1 = tl.max(xs, 1)
    e1 = tl.exp(xs - _safe(m1)[:, None])
    d1 = tl.sum(e1, 1)
    m2 = m1
    d2 = d1
    e2 = e1
    if TWO_SCALES:
        xs2 = tl.where(mask, x * sigma, float("-inf"))
        m2 = tl.max(xs2, 1)
        e2 = tl.exp(xs2 - _safe(m2)[:, None])
        d2 = tl.sum(e2, 1)
    zero = tl.zeros_like(d1)
    swx = zero
    if SMOOTHING_SUM:
        swx = tl.sum(w * x, 1)
    m_t = zero
    d_t = zero + 1.0
    mass = zero
    wqx = zero
    ent = zero
    rev = zero
    if HAS_TARGET:
        if TARGET == 2:
            u = tl.where(mask, tau * t, float("-inf"))
            m_t = tl.max(u, 1)
            q = tl.exp(u - _safe(m_t)[:, None])  # unnormalised: divided by d_t at the end
            d_t = tl.sum(q, 1)
            log_q = u  # up to the teacher's logsumexp, added at the end
        elif TARGET == 1:
            q = tl.where(mask, tl.exp(t), 0.0)
            log_q = t
        else:
            q = t
            log_q = tl.log(t)
        mass = tl.sum(w * q, 1)
        wqx = tl.sum(w * q * x, 1)
        if HAS_KL:
            if TARGET == 0:
                ent = tl.sum(tl.where(q == 0.0, 0.0, q * log_q), 1)  # xlogy: 0 log 0 = 0
            else:
                ent = tl.sum(tl.where(mask, q * log_q, 0.0), 1)
        if HAS_REVERSE:
            rev = tl.sum(tl.where(mask, e2 * (x * sigma - log_q), 0.0), 1)
    return m1, d1, m2, d2, swx, m_t, d_t, mass, wqx, ent, rev


@triton.jit
def _grad_tile(x, r, t, w, cols, y, yb, lse1, lse_s, lse_t, mass, rev, k_y, k_yb, k_u, k_z, k_f, k_r, W,
               sig1, sigma, tau, alpha, beta, logit_scale,
               TARGET: tl.constexpr, HAS_LABEL: tl.constexpr, HAS_MIXUP: tl.constexpr, HAS_UNIFORM: tl.constexpr,
               HAS_Z: tl.constexpr, HAS_FORWARD: tl.constexpr, HAS_REVERSE: tl.constexpr, HARD: tl.constexpr,
               TWO_SCALES: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """d(sum of the rows' losses) / d(logits) of an (R, B) tile (see the torch path's docstring)."""
    p1 = tl.exp(x * sig1 - lse1[:, None])
    g = tl.zeros_like(p1)
    if HARD:
        coef_p = k_y + k_yb + k_u * W + 2.0 * k_z * lse1
        g = coef_p[:, None] * p1
        if HAS_LABEL:
            g -= tl.where(cols[None, :] == y[:, None], k_y[:, None], 0.0)
            if HAS_MIXUP:
                g -= tl.where(cols[None, :] == yb[:, None], k_yb[:, None], 0.0)
        if HAS_UNIFORM:
            g -= k_u[:, None] * w
    if HAS_FORWARD or HAS_REVERSE:
        ps = p1
        if TWO_SCALES:
            ps = tl.exp(x * sigma - lse_s[:, None])
        q, log_q = _target_of(t, tau, lse_t, TARGET)
        gs = tl.zeros_like(p1)
        if HAS_FORWARD:
            gs = (k_f * (alpha * mass + beta * W))[:, None] * ps - k_f[:, None] * w * (alpha * q + beta)
        if HAS_REVERSE:
            gs += k_r[:, None] * ps * (x * sigma - lse_s[:, None] - log_q - rev[:, None])
        g += sigma * gs
    g *= logit_scale
    if HAS_SOFTCAP:
        g *= 4.0 * r * (1.0 - r)  # 1 - tanh^2
    return g


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _soft_cross_entropy_kernel(
    # pointers
    x_ptr,  # (N, C, S) the student's logits
    t_ptr,  # (N, C, S) the target; read only when HAS_TARGET
    y_ptr,  # (N * S,) labels; read only when HAS_LABEL
    yb_ptr,  # (N * S,) mixup's second labels; read only when HAS_MIXUP
    k_ptr,  # (N * S, 6) per-row coefficients in ACC: k_y, k_yb, k_u, k_z, k_f, k_r
    w_ptr,  # (C,) class weights; read only when HAS_WEIGHT
    wsum_ptr,  # () their sum in ACC; read only when HAS_WEIGHT
    loss_ptr,  # (N * S,) per-row loss in ACC; written unless FROM_STATS
    g_ptr,  # (N, C, S) gradient; written only when COMPUTE_GRAD
    st_ptr,  # (N * S, 5) statistics in ACC: lse, soft lse, mass, reverse KL, target lse; WRITE_STATS / FROM_STATS
    # shapes
    N,
    C,
    S,
    # strides
    stride_xn,
    stride_xc,
    stride_xs,
    stride_tn,
    stride_tc,
    stride_ts,
    stride_gn,
    stride_gc,
    stride_gs,
    # constants
    cap,
    logit_scale,
    sig1,  # the primary softmax's scale: 1 with label terms, else sigma
    sigma,  # soft_logit_scale
    tau,  # target_logit_scale
    alpha,
    beta,
    # features
    TARGET: tl.constexpr,  # 0 probabilities, 1 log-probabilities, 2 logits
    HAS_TARGET: tl.constexpr,
    HAS_LABEL: tl.constexpr,
    HAS_MIXUP: tl.constexpr,
    HAS_UNIFORM: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_FORWARD: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_REVERSE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HARD: tl.constexpr,
    TWO_SCALES: tl.constexpr,
    SMOOTHING_SUM: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    FROM_STATS: tl.constexpr,
    # layout
    S_ONE: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    ACC: tl.constexpr,
    # tuning (KernelConfig)
    MODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    REVERSE: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # unused: one program per tile
):
    ONE_READ: tl.constexpr = MODE == 0
    k, c1, c2 = _constants(logit_scale, cap, ACC)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = r < N * S
    n, s = rows_of(r, S, S_ONE)
    x_row = n * stride_xn + s * stride_xs
    t_row = n * stride_tn + s * stride_ts
    g_row = n * stride_gn + s * stride_gs

    zero = tl.zeros((BLOCK_R,), ACC)
    k_y = zero
    k_yb = zero
    k_u = zero
    k_z = zero
    k_f = zero
    k_r = zero
    k_row = k_ptr + r * 6
    if HAS_LABEL:
        k_y = tl.load(k_row, mask=row_mask, other=0.0)
    if HAS_MIXUP:
        k_yb = tl.load(k_row + 1, mask=row_mask, other=0.0)
    if HAS_UNIFORM:
        k_u = tl.load(k_row + 2, mask=row_mask, other=0.0)
    if HAS_Z:
        k_z = tl.load(k_row + 3, mask=row_mask, other=0.0)
    if HAS_FORWARD:
        k_f = tl.load(k_row + 4, mask=row_mask, other=0.0)
    if HAS_REVERSE:
        k_r = tl.load(k_row + 5, mask=row_mask, other=0.0)
    if HAS_WEIGHT:
        W = tl.load(wsum_ptr).to(ACC)
    else:
        W = C * 1.0
    y = tl.zeros((BLOCK_R,), tl.int64)
    yb = y
    if HAS_LABEL:
        y = tl.load(y_ptr + r, mask=row_mask, other=0).to(tl.int64)
        y = tl.where((y >= 0) & (y < C), y, 0)  # never read out of bounds; k_y is nan on such rows
        if HAS_MIXUP:
            yb = tl.load(yb_ptr + r, mask=row_mask, other=0).to(tl.int64)
            yb = tl.where((yb >= 0) & (yb < C), yb, 0)

    st_row = st_ptr + r * 5
    if FROM_STATS:
        lse1 = tl.load(st_row, mask=row_mask, other=0.0)
        lse_s = tl.load(st_row + 1, mask=row_mask, other=0.0)
        mass = tl.load(st_row + 2, mask=row_mask, other=0.0)
        rev = tl.load(st_row + 3, mask=row_mask, other=0.0)
        lse_t = tl.load(st_row + 4, mask=row_mask, other=0.0)
        if ONE_READ:
            cols, mask, x, rx, t, w = _load_block(x_ptr, t_ptr, w_ptr, x_row, t_row, 0, C, row_mask, stride_xc,
                                                  stride_tc, k, c1, c2, HAS_TARGET, HAS_WEIGHT, HAS_SOFTCAP,
                                                  CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)
    else:
        # pass 1: the row's statistics
        if ONE_READ:
            cols, mask, x, rx, t, w = _load_block(x_ptr, t_ptr, w_ptr, x_row, t_row, 0, C, row_mask, stride_xc,
                                                  stride_tc, k, c1, c2, HAS_TARGET, HAS_WEIGHT, HAS_SOFTCAP,
                                                  CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)
            m1, d1, m2, d2, swx, m_t, d_t, mass, wqx, ent, rev = _block_stats(
                x, t, w, mask, sig1, sigma, tau, TARGET, HAS_TARGET, HAS_KL, HAS_REVERSE, TWO_SCALES, SMOOTHING_SUM)
        else:
            m1 = zero + float("-inf")
            d1 = zero
            m2 = m1
            d2 = zero
            swx = zero
            m_t = zero + float("-inf")
            d_t = zero
            mass = zero
            wqx = zero
            ent = zero
            rev = zero
            for start in range(0, C, BLOCK_C):
                cols, mask, xb, rb, tb, wb = _load_block(x_ptr, t_ptr, w_ptr, x_row, t_row, start, C, row_mask,
                                                         stride_xc, stride_tc, k, c1, c2, HAS_TARGET, HAS_WEIGHT,
                                                         HAS_SOFTCAP, CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)
                m1b, d1b, m2b, d2b, swxb, m_tb, d_tb, massb, wqxb, entb, revb = _block_stats(
                    xb, tb, wb, mask, sig1, sigma, tau, TARGET, HAS_TARGET, HAS_KL, HAS_REVERSE, TWO_SCALES,
                    SMOOTHING_SUM)
                m1n = tl.maximum(m1, m1b)
                d1 = d1 * _rescale(m1, m1n) + d1b * _rescale(m1b, m1n)
                if TWO_SCALES:
                    m2n = tl.maximum(m2, m2b)
                    f_old = _rescale(m2, m2n)
                    f_new = _rescale(m2b, m2n)
                    d2 = d2 * f_old + d2b * f_new
                else:
                    m2n = m1n
                    f_old = _rescale(m1, m1n)
                    f_new = _rescale(m1b, m1n)
                rev = rev * f_old + revb * f_new  # shifted by the soft softmax's max
                m1 = m1n
                m2 = m2n
                swx += swxb
                if TARGET == 2:
                    m_tn = tl.maximum(m_t, m_tb)
                    ft_old = _rescale(m_t, m_tn)
                    ft_new = _rescale(m_tb, m_tn)
                    d_t = d_t * ft_old + d_tb * ft_new
                    mass = mass * ft_old + massb * ft_new
                    wqx = wqx * ft_old + wqxb * ft_new
                    ent = ent * ft_old + entb * ft_new
                    m_t = m_tn
                else:
                    mass += massb
                    wqx += wqxb
                    ent += entb
            if not TWO_SCALES:
                d2 = d1
        # the row's results; rows past the end: finite garbage, never stored
        lse1 = tl.where(row_mask, m1, 0.0) + tl.log(tl.where(row_mask, d1, 1.0))
        lse_s = lse1
        if TWO_SCALES:
            lse_s = tl.where(row_mask, m2, 0.0) + tl.log(tl.where(row_mask, d2, 1.0))
        lse_t = zero
        if HAS_TARGET:
            if TARGET == 2:
                lse_t = tl.where(row_mask, m_t, 0.0) + tl.log(tl.where(row_mask, d_t, 1.0))
                d_safe = tl.where(row_mask, d_t, 1.0)
                mass = mass / d_safe
                wqx = wqx / d_safe
                ent = ent / d_safe - lse_t  # sum q (tau u - m_t) - log d_t, as sum q = 1
        loss = zero
        if HARD:
            if HAS_LABEL:
                x_y = _label_logit(x_ptr + x_row + y * stride_xc, row_mask, k, c1, c2, HAS_SOFTCAP, ACC)
                loss += _term(k_y, lse1 - x_y)
                if HAS_MIXUP:
                    x_yb = _label_logit(x_ptr + x_row + yb * stride_xc, row_mask, k, c1, c2, HAS_SOFTCAP, ACC)
                    loss += _term(k_yb, lse1 - x_yb)
            if HAS_UNIFORM:
                loss += _term(k_u, W * lse1 - swx)
            if HAS_Z:
                loss += _term(k_z, lse1 * lse1)
        if HAS_FORWARD:
            f = (alpha * mass + beta * W) * lse_s - alpha * sigma * wqx
            if SMOOTHING_SUM:
                f -= beta * sigma * swx
            if HAS_KL:
                f += ent
            loss += _term(k_f, f)
        if HAS_REVERSE:
            d_s = tl.where(row_mask, d2, 1.0)
            rev = rev / d_s - lse_s
            if TARGET == 2:
                rev += lse_t
            loss += _term(k_r, rev)
        tl.store(loss_ptr + r, loss, mask=row_mask)
        if WRITE_STATS:
            tl.store(st_row, lse1, mask=row_mask)
            tl.store(st_row + 1, lse_s, mask=row_mask)
            tl.store(st_row + 2, mass, mask=row_mask)
            tl.store(st_row + 3, rev, mask=row_mask)
            tl.store(st_row + 4, lse_t, mask=row_mask)

    if COMPUTE_GRAD:
        if ONE_READ:
            g = _grad_tile(x, rx, t, w, cols, y, yb, lse1, lse_s, lse_t, mass, rev, k_y, k_yb, k_u, k_z, k_f, k_r,
                           W, sig1, sigma, tau, alpha, beta, logit_scale, TARGET, HAS_LABEL, HAS_MIXUP,
                           HAS_UNIFORM, HAS_Z, HAS_FORWARD, HAS_REVERSE, HARD, TWO_SCALES, HAS_SOFTCAP)
            store_gradient_tile(g_ptr + offsets_of(g_row, cols, stride_gc, CONTIGUOUS), g, mask, True)
        else:
            blocks = tl.cdiv(C, BLOCK_C)
            for i in range(0, blocks):  # the second read
                start = block_start(i, blocks, BLOCK_C, REVERSE)
                cols, mask, xb, rb, tb, wb = _load_block(x_ptr, t_ptr, w_ptr, x_row, t_row, start, C, row_mask,
                                                         stride_xc, stride_tc, k, c1, c2, HAS_TARGET, HAS_WEIGHT,
                                                         HAS_SOFTCAP, CONTIGUOUS, ACC, BLOCK_R, BLOCK_C)
                g = _grad_tile(xb, rb, tb, wb, cols, y, yb, lse1, lse_s, lse_t, mass, rev, k_y, k_yb, k_u, k_z, k_f,
                               k_r, W, sig1, sigma, tau, alpha, beta, logit_scale, TARGET, HAS_LABEL,
                               HAS_MIXUP, HAS_UNIFORM, HAS_Z, HAS_FORWARD, HAS_REVERSE, HARD, TWO_SCALES,
                               HAS_SOFTCAP)
                store_gradient_tile(g_ptr + offsets_of(g_row, cols, stride_gc, CONTIGUOUS), g, mask, True)


# --------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------


def launch_soft_cross_entropy(x3, t3, ya, yb, coef, weight, loss_rows, grad3, stats, *, terms: Terms,
                              from_stats: bool = False, config: Optional[KernelConfig] = None, compile_for=None):
    """Same contract as kernels/soft_cross_entropy_torch.py's torch_soft_cross_entropy. ``config``
    forces a variant (tests); by default CUDA autotunes large problems and everything else takes
    the tuning table's fixed choice. ``compile_for`` (a ``triton_target.GPUTarget``) runs nothing:
    the call compiles its fixed choice for that GPU and returns the compiled kernel (the static
    report, on tensors never touched)."""
    N, C, S = x3.shape
    if N * S == 0:
        return
    acc = torch.float64 if x3.dtype == torch.float64 else torch.float32
    t = t3 if t3 is not None else x3  # never read without HAS_TARGET
    g = grad3 if grad3 is not None else x3  # never written without COMPUTE_GRAD
    contiguous = x3.stride(1) == 1 and t.stride(1) == 1 and g.stride(1) == 1
    rows = lambda y: y.reshape(-1).contiguous() if y is not None else coef  # noqa: E731
    coef = coef.contiguous()
    assert coef.shape == (N * S, COEFFICIENTS)
    st = stats if stats is not None else coef
    assert stats is None or stats.shape == (N * S, STATISTICS) and stats.is_contiguous()
    wsum = weight.to(acc).sum() if weight is not None else coef
    sig1 = 1.0 if terms.hard else terms.soft_logit_scale
    args = (
        x3, t, rows(ya), rows(yb), coef, weight if weight is not None else coef, wsum,
        loss_rows if loss_rows is not None else coef, g, st,
        N, C, S,
        x3.stride(0), x3.stride(1), x3.stride(2), t.stride(0), t.stride(1), t.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        terms.softcap or 1.0, terms.logit_scale, sig1, terms.soft_logit_scale, terms.target_logit_scale,
        terms.alpha, terms.beta,
    )
    features = dict(
        TARGET=_TARGET_CODES[terms.target_kind],
        HAS_TARGET=terms.soft,
        HAS_LABEL=terms.label,
        HAS_MIXUP=terms.mixup,
        HAS_UNIFORM=terms.uniform,
        HAS_Z=terms.z,
        HAS_FORWARD=terms.forward,
        HAS_KL=terms.forward and terms.kl,
        HAS_REVERSE=terms.reverse,
        HAS_WEIGHT=weight is not None,
        HAS_SOFTCAP=terms.softcap is not None,
        HARD=terms.hard,
        TWO_SCALES=terms.two_scales,
        SMOOTHING_SUM=terms.smoothing_sum,
        COMPUTE_GRAD=grad3 is not None,
        WRITE_STATS=stats is not None and not from_stats,
        FROM_STATS=from_stats,
        S_ONE=S == 1,
        CONTIGUOUS=contiguous,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
    )
    if config is not None and config.mode == ONE_PASS and config.block_c < C:
        raise ValueError(f"smoothce: kernel config {config} does not fit rows of {C} classes")
    if compile_for is not None:
        from smoothce.kernels.triton_target import compile_for as compile_kernels

        config = config or tuning.default_config(C)
        return compile_kernels(compile_for, _soft_cross_entropy_kernel, args,
                               dict(features, **config.kwargs(), num_warps=config.num_warps,
                                    num_stages=config.num_stages))
    tune = config is None and x3.device.type == "cuda" and N * S * C >= tuning.AUTOTUNE_MIN_ELEMENTS
    if tune:
        _autotuned()[lambda meta: (triton.cdiv(N * S, meta["BLOCK_R"]),)](*args, **features)
        return
    config = config or tuning.default_config(C)
    _soft_cross_entropy_kernel[(triton.cdiv(N * S, config.block_r),)](
        *args, **features, **config.kwargs(), num_warps=config.num_warps, num_stages=config.num_stages)


_TUNING_KEY = ["C", "TARGET", "HAS_TARGET", "HAS_LABEL", "HAS_MIXUP", "HAS_UNIFORM", "HAS_Z", "HAS_FORWARD", "HAS_KL",
               "HAS_REVERSE", "HAS_WEIGHT", "HAS_SOFTCAP", "TWO_SCALES", "COMPUTE_GRAD", "FROM_STATS", "S_ONE",
               "CONTIGUOUS"]


@functools.cache
def _autotuned():
    """The kernel under triton.autotune (CUDA), among the configurations that fit the call's C."""
    configs = {cfg: cfg.triton_config() for cfg in tuning.candidates()}

    def prune(triton_configs, named_args, **kwargs):
        return [configs[cfg] for cfg in tuning.pick(list(configs), named_args["C"])]

    return triton.autotune(configs=list(configs.values()), key=_TUNING_KEY,
                           prune_configs_by={"early_config_prune": prune})(_soft_cross_entropy_kernel)
