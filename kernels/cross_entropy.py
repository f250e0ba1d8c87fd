"""Fused (label-smoothed) cross-entropy: one pass computes the loss AND d(loss)/d(logits).

Every way people write cross-entropy reduces to a cross-entropy against a target distribution
built from the labels. For a row i with label y_i, class weights w (all ones without weight) and
x = logits (after the optional softcap x -> cap * tanh(x / cap)):

    q_ij   = a * w[y_i] * [j == y_i] + b * w_j                     (target distribution)
    loss_i = sum_j q_ij * (lse_i - x_ij) + c + z * lse_i^2
           = Q_i * lse_i - a * w[y_i] * x_iy - b * sum_j w_j x_ij + c + z * lse_i^2,
    Q_i    = a * w[y_i] + b * sum_j w_j.

F.cross_entropy(label_smoothing=eps) is a = 1 - eps, b = eps / C; "eps / (C - 1) on the other
classes" is a = 1 - eps - eps / (C - 1), b = eps / (C - 1); a KL divergence against a smoothed
distribution p adds c = sum_j p_j log p_j. Since d lse_i / d x_ij = softmax_ij = p_ij,

    d loss_i / d x_ij = (Q_i + 2 z lse_i) * p_ij - a * w[y_i] * [j == y_i] - b * w_j,

times 1 - (x_ij / cap)^2 under a softcap. Rows whose label is ignore_index contribute 0.
'mean' divides the cross-entropy part by sum of w[y_i] over non-ignored rows (PyTorch's rule,
which keeps smoothing and weights consistent) and the z part by the count of non-ignored rows.
Those divisors depend only on the labels, so they are computed before the logits are read and
the kernel writes the finished gradient in the same launch: backward only scales it by
grad_output. Nothing here synchronises with the device.

Layout: low to high. Triton kernel -> its launcher -> the torch implementation (CPU) ->
the torch.ops.smoothce.cross_entropy custom op, its fake and autograd -> public functionals.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from smoothce.kernels.checks import check_labels_on_cpu

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# --------------------------------------------------------------------------------------------
# Triton kernel: one program per row
# --------------------------------------------------------------------------------------------


@triton.jit
def _softcap(x, cap):
    # cap * tanh(x / cap) through exp, which every Triton backend (and the interpreter) has;
    # saturates to +-cap without overflow trouble: exp(+inf) gives 1 - 0, exp(-inf) gives 1 - 2.
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))


@triton.jit
def _cross_entropy_kernel(
    # pointers
    x_ptr,  # (N, C, S) logits, any strides
    y_ptr,  # (N, S) labels
    w_ptr,  # (C,) class weights; read only when HAS_WEIGHT
    scale_ptr,  # (2,) gradient scales in ACC: [cross-entropy part, z part]
    loss_ptr,  # (N * S,) per-row cross-entropy part, in ACC
    z_ptr,  # (N * S,) per-row z part, in ACC; written only when HAS_ZLOSS
    g_ptr,  # (N, C, S) gradient, any strides; written only when COMPUTE_GRAD
    # shapes
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
    ignore_index,
    a,
    b,
    c,
    zc,
    cap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 row offsets: N * C passes 2^31 at LLM sizes (8192 x 262144).
    row = tl.program_id(0).to(tl.int64)
    n = row // S
    s = row % S
    x_row = x_ptr + n * stride_xn + s * stride_xs
    y = tl.load(y_ptr + n * stride_yn + s * stride_ys).to(tl.int64)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < C)
    # Out-of-range labels are never dereferenced: they read column 0 and poison the row with nan.
    y_safe = tl.where(in_range, y, 0)

    # Pass 1: online max / sum-exp, and the weighted sums the smoothing term needs.
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((), ACC)
    sum_wx = tl.zeros((), ACC)
    sum_w = tl.zeros((), ACC)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=mask, other=0.0).to(ACC)
        if HAS_SOFTCAP:
            x = _softcap(x, cap)
        if HAS_SMOOTHING:  # masked lanes hold x = 0 and w = 0 here
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
            else:
                w = mask.to(ACC)
            sum_wx += tl.sum(w * x, 0)
            sum_w += tl.sum(w, 0)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)

    x_y = tl.load(x_row + y_safe * stride_xc).to(ACC)
    if HAS_SOFTCAP:
        x_y = _softcap(x_y, cap)
    if HAS_WEIGHT:
        w_y = tl.load(w_ptr + y_safe).to(ACC)
    else:
        w_y = 1.0
    q_sum = a * w_y
    ce = q_sum * lse - a * w_y * x_y + c
    if HAS_SMOOTHING:
        q_sum += b * sum_w
        ce += b * (sum_w * lse - sum_wx)
    # 0 for ignored rows, nan for labels out of range (as loud as we can be without a sync).
    row_mask = tl.where(ignored, 0.0, tl.where(in_range, 1.0, float("nan")))
    tl.store(loss_ptr + row, ce * row_mask)
    if HAS_ZLOSS:
        tl.store(z_ptr + row, zc * lse * lse * row_mask)

    if COMPUTE_GRAD:
        # Ignored rows get an exact 0 gradient even when 'mean' found no row (1 / 0 scale), as in
        # PyTorch, whose loss is nan there but whose gradient is 0.
        ce_scale = tl.where(ignored, 0.0, tl.load(scale_ptr) * row_mask)
        coef_p = ce_scale * q_sum
        if HAS_ZLOSS:
            coef_p += tl.where(ignored, 0.0, tl.load(scale_ptr + 1) * row_mask) * 2.0 * zc * lse
        coef_y = ce_scale * a * w_y
        coef_w = ce_scale * b
        g_row = g_ptr + n * stride_gn + s * stride_gs
        # Pass 2: re-read the row (mostly from L2) and write the finished gradient.
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < C
            x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=mask, other=0.0).to(ACC)
            if HAS_SOFTCAP:
                x = _softcap(x, cap)
            g = coef_p * tl.exp(x - lse) - tl.where(cols == y, coef_y, 0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
                    g -= coef_w * w
                else:
                    g -= coef_w
            if HAS_SOFTCAP:
                g *= 1.0 - (x / cap) * (x / cap)
            tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(g_ptr.dtype.element_ty), mask=mask)


def _launch_triton(x3, y2, weight, scales, ce_rows, z_rows, grad3, ignore_index, a, b, c, zc, cap):
    """Runs the kernel over the (N, C, S) view; fills ce_rows, z_rows and grad3 (if given)."""
    N, C, S = x3.shape
    block = min(triton.next_power_of_2(C), 4096 if x3.element_size() >= 4 else 8192)
    g = grad3 if grad3 is not None else x3  # never written when COMPUTE_GRAD is off
    _cross_entropy_kernel[(N * S,)](
        x3, y2, weight if weight is not None else x3, scales, ce_rows, z_rows, g,
        C, S,
        x3.stride(0), x3.stride(1), x3.stride(2), y2.stride(0), y2.stride(1),
        g.stride(0), g.stride(1), g.stride(2),
        ignore_index, a, b, c, zc, cap,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=b != 0.0,
        HAS_ZLOSS=zc != 0.0,
        HAS_SOFTCAP=cap > 0.0,
        COMPUTE_GRAD=grad3 is not None,
        ACC=tl.float64 if x3.dtype == torch.float64 else tl.float32,
        BLOCK=block,
        num_warps=16 if block >= 8192 else 8,
    )


# --------------------------------------------------------------------------------------------
# torch implementation (CPU, and SMOOTHCE_KERNEL=torch anywhere)
# --------------------------------------------------------------------------------------------

# Rows are processed in chunks of about this many elements: a chunk's fp32 working copy stays in
# cache while the dozen elementwise passes run over it, and no N x C temporary ever exists.
_TORCH_CHUNK_ELEMENTS = 1 << 19


def _torch_rows(x3, y2, weight, scales, ce_rows, z_rows, grad3, ignore_index, a, b, c, zc, cap):
    """Same contract as _launch_triton, in torch ops, chunk by chunk over the batch dim."""
    N, C, S = x3.shape
    acc = torch.float64 if x3.dtype == torch.float64 else torch.float32
    rows_per_chunk = max(1, _TORCH_CHUNK_ELEMENTS // max(C * S, 1))
    # Work on (N, C) when S == 1: a trailing size-1 dim sends reductions over dim 1 down a slow
    # strided path (about 20x slower on CPU). Everything below reduces over dim 1 either way.
    if S == 1:
        x3, y3, grad3 = x3.view(N, C), y2, grad3.view(N, C) if grad3 is not None else None
        row_shape, w_shape = (N, 1), (1, C)
    else:
        y3 = y2.unsqueeze(1)
        row_shape, w_shape = (N, 1, S), (1, C, 1)
    w3 = weight.to(acc).view(w_shape) if weight is not None else None
    sum_w = w3.sum() if w3 is not None else float(C)
    ce_scale, z_scale = scales[0], scales[1]
    for n0 in range(0, N, rows_per_chunk):
        n1 = min(N, n0 + rows_per_chunk)
        y = y3[n0:n1].long()  # (n, 1, S) or (n, 1)
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < C)
        y_safe = torch.where(in_range, y, 0)
        row_mask = torch.where(ignored, 0.0, torch.where(in_range, 1.0, float("nan"))).to(acc)

        # The chunk's working buffer: the gradient rows themselves when they are in acc already
        # (fp32 input with grad), so the finished gradient needs no final copy. Passes over the
        # (cache-resident) chunk: max, [smoothing sum], x - max, exp, sum, and the gradient's one
        # multiply-add.
        in_place = grad3 is not None and grad3.dtype == acc
        src = x3[n0:n1]
        work = grad3[n0:n1] if in_place else torch.empty(src.shape, dtype=acc)
        if cap > 0.0:
            src = src.to(acc, copy=True).div_(cap).tanh_().mul_(cap)
        x_y = src.gather(1, y_safe).to(acc)
        w_y = w3.view(-1)[y_safe] if w3 is not None else 1.0
        q_sum = a * w_y
        ce = a * w_y * -x_y + c
        if b != 0.0:
            sum_wx = (src * w3).sum(1, keepdim=True) if w3 is not None else src.sum(1, keepdim=True, dtype=acc)
            q_sum = q_sum + b * sum_w
            ce = ce - b * sum_wx
        m = src.amax(1, keepdim=True).to(acc)
        torch.sub(src, m, out=work).exp_()  # work = exp(x - m)
        d = work.sum(1, keepdim=True)
        lse = m + d.log()
        ce = (ce + q_sum * lse) * row_mask
        ce_rows.view(row_shape)[n0:n1] = ce
        if zc != 0.0:
            z_rows.view(row_shape)[n0:n1] = zc * lse * lse * row_mask
        if grad3 is None:
            continue

        # Ignored rows: exactly 0 even when 'mean' found no row at all (1 / 0 scale), as PyTorch.
        live_ce = torch.where(ignored, 0.0, ce_scale * row_mask)
        coef_p = live_ce * q_sum
        if zc != 0.0:
            coef_p = coef_p + torch.where(ignored, 0.0, z_scale * row_mask) * 2.0 * zc * lse
        # (Q + 2 z lse) * softmax - b w, in one pass where w is uniform.
        coef_w = live_ce * b
        if b != 0.0 and w3 is None:
            torch.addcmul(-coef_w, work, coef_p / d, out=work)
        else:
            work.mul_(coef_p / d)
            if b != 0.0:
                work.addcmul_(coef_w, w3, value=-1.0)
        work.scatter_add_(1, y_safe, -(live_ce * a * w_y).expand_as(y_safe).to(acc))
        if cap > 0.0:
            t = x3[n0:n1].to(acc, copy=True).div_(cap).tanh_()  # never in place on the input
            work.mul_(t.mul_(t).neg_().add_(1.0))
        if not in_place:
            grad3[n0:n1] = work


def _kernel_choice(logits: torch.Tensor) -> str:
    forced = os.environ.get("SMOOTHCE_KERNEL", "").strip().lower()
    if forced not in ("", "auto", "triton", "torch"):
        raise ValueError(f"SMOOTHCE_KERNEL={forced!r}: expected 'triton', 'torch' or 'auto'")
    if forced == "torch" or logits.dtype == torch.float64 and forced != "triton":
        return "torch"
    if forced == "triton":
        if logits.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"SMOOTHCE_KERNEL=triton on a {logits.device.type} tensor needs TRITON_INTERPRET=1 "
                "set before smoothce's kernels are imported"
            )
        return "triton"
    return "triton" if logits.device.type == "cuda" else "torch"


# --------------------------------------------------------------------------------------------
# The custom op
# --------------------------------------------------------------------------------------------


def _as_rows(logits, target):
    """(N, C, d1, ...) -> an (N, C, S) view and (N, S) labels; C is dim 1 as in F.cross_entropy."""
    N, C = logits.shape[0], logits.shape[1]
    x3 = logits.reshape(N, C, -1)
    y2 = target.reshape(N, -1)
    return x3, y2


def _divisors(y2, weight, ignore_index, C, acc):
    """Mean divisors from the labels alone: sum of w[y] and count over non-ignored rows."""
    valid = y2 != ignore_index
    count = valid.sum(dtype=acc)
    if weight is None:
        return count, count
    w_y = weight.to(acc)[torch.where(valid & (y2 >= 0) & (y2 < C), y2, 0).long()]
    return torch.where(valid, w_y, 0.0).sum(), count


@torch.library.custom_op("smoothce::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: int,
    target_coef: float,
    uniform_coef: float,
    constant: float,
    z_loss: float,
    softcap: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x3, y2 = _as_rows(logits, target)
    N, C, S = x3.shape
    if logits.device.type == "cpu":
        check_labels_on_cpu(y2, C, ignore_index)
    # Per-row results and scales in the accumulation dtype: fp32, or fp64 for fp64 input.
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ce_div, z_div = _divisors(y2, weight, ignore_index, C, acc)
    one = torch.ones((), device=logits.device, dtype=acc)
    scales = torch.stack([one / ce_div, one / z_div]) if reduction == 2 else torch.stack([one, one])
    ce_rows = torch.empty(N * S, device=logits.device, dtype=acc)
    z_rows = torch.zeros(N * S, device=logits.device, dtype=acc)
    grad = torch.empty_like(logits) if compute_grad else None
    grad3 = grad.view(N, C, S) if grad is not None else None
    run = _launch_triton if _kernel_choice(logits) == "triton" else _torch_rows
    run(x3, y2, weight, scales, ce_rows, z_rows, grad3, ignore_index,
        target_coef, uniform_coef, constant, z_loss, softcap)

    if reduction == 0:
        z = z_rows.view(target.shape)
        loss = ce_rows.view(target.shape) + z
    elif reduction == 1:
        z = z_rows.sum()
        loss = ce_rows.sum() + z
    else:
        z = z_rows.sum() / z_div if z_loss != 0.0 else z_rows.sum()
        loss = ce_rows.sum() / ce_div + z
    dtype = logits.dtype
    empty = logits.new_empty(0)
    return loss.to(dtype), z.to(dtype), grad if grad is not None else empty


@_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, reduction, target_coef, uniform_coef, constant, z_loss,
      softcap, compute_grad):
    shape = target.shape if reduction == 0 else ()
    loss = logits.new_empty(shape)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, logits.new_empty(shape), grad


def _setup_context(ctx, inputs, output):
    _, grad = output[0], output[2]
    ctx.reduction = inputs[4]
    ctx.compute_grad = inputs[10]
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(output[1], output[2])
    # Otherwise autograd hands backward a zeros((N, C)) "gradient" for the unused grad output:
    # a whole extra logits-sized buffer.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_z, grad_grad):
    if not ctx.compute_grad:
        raise RuntimeError(
            "smoothce::cross_entropy ran with compute_grad=False (no gradient was stored); "
            "call it with compute_grad=True to differentiate it"
        )
    (grad,) = ctx.saved_tensors
    scale = grad_loss.unsqueeze(1) if ctx.reduction == 0 else grad_loss
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        # Traced (fake / functional tensors) or a tensor subclass: out of place, since the
        # partitioner rejects a mutated saved tensor; Inductor may still reuse the saved buffer,
        # which is donated to backward.
        return (grad * scale,) + (None,) * 10
    # Eager: in place, so the stored gradient becomes the logits' gradient and backward allocates
    # no second N x C buffer. A second backward through the same graph raises (version counter)
    # instead of scaling twice.
    return (grad.mul_(scale),) + (None,) * 10


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------


def _validate(logits, target, weight, reduction, target_coef, uniform_coef, z_loss, softcap):
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"smoothce: input and target must be tensors, got {type(logits).__name__} "
                        f"and {type(target).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"smoothce: input dtype {logits.dtype} is not supported; expected one of "
                        "float16, bfloat16, float32, float64")
    if target.dtype.is_floating_point:
        raise TypeError(f"smoothce: target dtype {target.dtype} looks like class probabilities; "
                        "smoothce takes class indices (int64 or int32)")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"smoothce: target dtype {target.dtype} is not supported; expected int64 or int32")
    if logits.dim() < 2:
        raise ValueError(f"smoothce: input must have shape (N, C) or (N, C, d1, ...), got {tuple(logits.shape)}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"smoothce: target shape {tuple(target.shape)} does not match input shape "
                         f"{tuple(logits.shape)} (expected {expected}: the class dim is 1)")
    if target.device != logits.device:
        raise ValueError(f"smoothce: target is on {target.device} but input is on {logits.device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != logits.shape[1]:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"smoothce: weight must have shape ({logits.shape[1]},) (one per class), got {got}")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"smoothce: weight dtype {weight.dtype} must be floating point")
        if weight.device != logits.device:
            raise ValueError(f"smoothce: weight is on {weight.device} but input is on {logits.device}")
        if weight.requires_grad:
            raise ValueError("smoothce: a weight that requires grad is not supported (its gradient "
                             "would be dropped); pass weight.detach()")
    if reduction not in REDUCTIONS:
        raise ValueError(f"smoothce: reduction={reduction!r} is not one of 'none', 'sum', 'mean'")
    for name, value in (("target_coef", target_coef), ("uniform_coef", uniform_coef), ("z_loss", z_loss)):
        if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"smoothce: {name}={value!r} must be a finite number")
    if z_loss < 0:
        raise ValueError(f"smoothce: z_loss={z_loss!r} must be >= 0")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"smoothce: softcap={softcap!r} must be None or a positive finite number")


def fused_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    target_coef: float = 1.0,
    uniform_coef: float = 0.0,
    constant: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
):
    """Cross-entropy in the general form (see the module docstring) through smoothce::cross_entropy.

    The gradient is computed in the forward launch only when autograd will need it.
    """
    _validate(logits, target, weight, reduction, target_coef, uniform_coef, z_loss, softcap)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, z, _ = torch.ops.smoothce.cross_entropy(
        logits, target, weight, int(ignore_index), REDUCTIONS[reduction], float(target_coef),
        float(uniform_coef), float(constant), float(z_loss), float(softcap or 0.0), compute_grad,
    )
    return (loss, z) if return_z_loss else loss


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
):
    """Drop-in for F.cross_entropy with class-index targets, plus z-loss and softcap.

    With return_z_loss=True returns (loss, z_term): the loss includes z_loss * lse^2 (reduced like
    the loss), z_term is that part alone for logging.
    """
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"smoothce: label_smoothing={label_smoothing!r} must be in [0, 1]")
    if isinstance(input, torch.Tensor) and input.dim() == 1:  # unbatched (C,) with a scalar label
        out = cross_entropy(input.unsqueeze(0), target.unsqueeze(0), weight, ignore_index, reduction,
                            label_smoothing, z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss)
        if reduction != "none":
            return out
        return tuple(t.squeeze(0) for t in out) if return_z_loss else out.squeeze(0)
    C = input.shape[1] if isinstance(input, torch.Tensor) and input.dim() >= 2 else 1
    eps = float(label_smoothing)
    return fused_cross_entropy(
        input, target, weight, ignore_index=ignore_index, reduction=reduction,
        target_coef=1.0 - eps, uniform_coef=eps / C, z_loss=z_loss, softcap=softcap,
        return_z_loss=return_z_loss,
    )


class CrossEntropyLoss(torch.nn.Module):
    """nn.CrossEntropyLoss twin backed by the fused op (class-index targets)."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                 z_loss=0.0, softcap=None, return_z_loss=False):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"smoothce: reduction={reduction!r} is not one of 'none', 'sum', 'mean'")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"smoothce: label_smoothing={label_smoothing!r} must be in [0, 1]")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_z_loss = return_z_loss

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             return_z_loss=self.return_z_loss)
