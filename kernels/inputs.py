"""What both smoothce ops do with their inputs before a kernel runs.

Check them (every message reads "smoothce: <name> <value> ..." and names the bad value), read
the labels once into per-row quantities (Labels), and choose the kernel (kernel_choice).
Nothing here imports triton, so CPU callers stay light.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32, or float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


class TargetOutOfBoundsError(IndexError, RuntimeError):
    """A label outside [0, classes) that is not ignore_index.

    Both an IndexError (what F.cross_entropy and nll_loss raise) and a RuntimeError (what gather
    and indexing raise), so whichever spelling the user's loss had, the rewritten loss raises an
    exception of the type eager raised.
    """


def check_labels_on_cpu(target: torch.Tensor, classes: int, ignore_index: Optional[int]) -> None:
    """Raise TargetOutOfBoundsError for a label outside [0, classes) that is not ignore_index.

    On CPU a data check costs no device sync, so bad labels raise like F.cross_entropy does
    instead of only poisoning the loss with nan (what the kernels do where a check would sync).
    """
    bad = (target < 0) | (target >= classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        value = int(target[bad][0])
        allowed = f"expected 0 <= target < {classes}" + (
            f", or ignore_index={ignore_index}" if ignore_index is not None else "; no ignore_index")
        raise TargetOutOfBoundsError(
            f"smoothce: target {value} is out of bounds for {classes} classes ({allowed})")


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_tensors(**tensors) -> None:
    """Each named argument is a tensor."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"smoothce: {name} must be a tensor, got {type(t).__name__}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple, expected: str) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"smoothce: {name} dtype {t.dtype} is not supported; expected {expected}")


def check_labels(target: torch.Tensor, shape: tuple, source: str) -> None:
    """Class-index labels of the given shape (``source`` says where the shape comes from)."""
    if target.dtype.is_floating_point:
        raise TypeError(f"smoothce: target dtype {target.dtype} looks like class probabilities; this op takes "
                        "class indices (int64 or int32): probabilities go to smoothce.cross_entropy or "
                        "fused_soft_cross_entropy")
    check_dtype("target", target, LABEL_DTYPES, "int64 or int32")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"smoothce: target shape {tuple(target.shape)} does not match {source} "
                         f"(expected {tuple(shape)})")


def check_per_class(name: str, t, classes: int) -> None:
    """A (classes,) floating-point tensor that needs no gradient (class weights)."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (classes,):
        raise ValueError(f"smoothce: {name} must have shape ({classes},) (one per class), got {_shape(t)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"smoothce: {name} dtype {t.dtype} must be floating point")
    if t.requires_grad:
        raise ValueError(f"smoothce: a {name} that requires grad is not supported (its gradient would be "
                         f"dropped); pass {name}.detach()")


def check_uniform_rows(uniform_rows, target: torch.Tensor, form) -> None:
    if not isinstance(uniform_rows, torch.Tensor) or uniform_rows.dtype != torch.bool:
        got = uniform_rows.dtype if isinstance(uniform_rows, torch.Tensor) else type(uniform_rows).__name__
        raise TypeError(f"smoothce: uniform_rows must be a bool tensor, got {got}")
    if tuple(uniform_rows.shape) != tuple(target.shape):
        raise ValueError(f"smoothce: uniform_rows shape {tuple(uniform_rows.shape)} must equal target shape "
                         f"{tuple(target.shape)}")
    if form.kl:
        raise ValueError("smoothce: kl=True with uniform_rows is not supported (the KL constant belongs to "
                         "rows where both terms count)")


def check_loss_dtype(loss_dtype) -> None:
    if loss_dtype is not None and (not isinstance(loss_dtype, torch.dtype) or not loss_dtype.is_floating_point):
        raise TypeError(f"smoothce: loss_dtype={loss_dtype!r} must be None or a floating point dtype")


def is_dtensor(t) -> bool:
    """Whether t is a DTensor (torch.distributed.tensor is imported only for tensor subclasses)."""
    if type(t) is torch.Tensor or not isinstance(t, torch.Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def class_split(logits, class_dim: int = 1) -> tuple[Optional[int], str]:
    """(the mesh dim that shards the classes, "") for DTensor logits smoothce takes, else (None, why
    not): the class dim sharded over exactly one mesh dim, the others replicated."""
    placements = logits.placements
    dims = [i for i, p in enumerate(placements) if p.is_shard() and p.dim % logits.dim() == class_dim % logits.dim()]
    others = [p for i, p in enumerate(placements) if i not in dims and not p.is_replicate()]
    if len(dims) != 1 or others:
        return None, (f"the logits are a DTensor placed {tuple(placements)}: smoothce takes DTensor logits sharded "
                      f"on the classes (dim {class_dim % logits.dim()}) over one mesh dim, replicated over the others")
    return dims[0], ""


def dtensor_reason(t, role: str, logits, mesh_dim: int) -> Optional[str]:
    """Why smoothce cannot read the DTensor ``t`` (the ``role`` of the loss: labels, class weights,
    a mask) next to DTensor logits whose classes mesh dim ``mesh_dim`` shards; None when it can:
    replicated, or for class weights and a head's bias sharded like the classes."""
    if t.device_mesh != logits.device_mesh:
        return f"{role} are a DTensor on another device mesh than the logits'"
    if all(p.is_replicate() for p in t.placements):
        return None
    per_class = role in ("class weights", "the bias")
    if per_class and all(p.is_shard(0) if i == mesh_dim else p.is_replicate()
                                       for i, p in enumerate(t.placements)):
        return None
    alike = " or sharded like the classes" if per_class else ""
    return f"{role} are a DTensor placed {tuple(t.placements)}: smoothce takes them replicated{alike}"


def check_same_device(first: str, **tensors) -> None:
    """Every tensor given (None skipped) is on the device of the one named ``first``."""
    device = tensors[first].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"smoothce: {name} is on {t.device} but {first} is on {device}")


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


def _once(compute):
    """A property computed on first read and kept, that an assignment replaces as it would a
    functools.cached_property (whose lock torch.compile cannot trace on Python < 3.12)."""
    name = "_" + compute.__name__

    @functools.wraps(compute)
    def get(self):
        value = getattr(self, name, None)
        if value is None:
            value = compute(self)
            setattr(self, name, value)
        return value

    def put(self, value):
        setattr(self, name, value)

    return property(get, put)


class Labels:
    """What the labels say about each row, for any shape of target (no host sync).

    Computed when first read, so a kernel that reads the labels itself pays only for what the
    reduction needs. ``valid``: the label counts (it is not ignore_index). ``y``: the label
    clamped into [0, classes), a safe index. ``row_mask`` (acc): 1, 0 on ignored rows, nan for a
    label out of range; it multiplies the label term, c and z. ``uniform_mask``: multiplies the
    smoothing term (row_mask, or uniform_rows). ``wy``: w[y] on valid rows, 0 elsewhere.
    ``count`` / ``wy_sum``: the 'mean' divisors of the z part and the cross-entropy part;
    ``uniform_count``: with uniform_rows, the smoothing part's own (the number of its rows).
    """

    def __init__(self, target: torch.Tensor, class_weight: Optional[torch.Tensor], ignore_index: Optional[int],
                 classes: int, acc: torch.dtype, uniform_rows: Optional[torch.Tensor] = None):
        self.target = target
        self.ignore_index = ignore_index
        self.classes = classes
        self.acc = acc
        self.uniform_rows = uniform_rows
        self.class_weight = None if class_weight is None else class_weight.to(acc)

    @_once
    def valid(self) -> torch.Tensor:
        if self.ignore_index is None:
            return torch.ones_like(self.target, dtype=torch.bool)
        return self.target != self.ignore_index

    @_once
    def in_range(self) -> torch.Tensor:
        return (self.target >= 0) & (self.target < self.classes)

    @_once
    def y(self) -> torch.Tensor:
        return torch.where(self.valid & self.in_range, self.target, 0).long()

    @_once
    def row_mask(self) -> torch.Tensor:
        return torch.where(self.valid, torch.where(self.in_range, 1.0, math.nan), 0.0).to(self.acc)

    @_once
    def uniform_mask(self) -> torch.Tensor:
        return self.row_mask if self.uniform_rows is None else self.uniform_rows.to(self.acc)

    @_once
    def wy(self) -> torch.Tensor:
        if self.class_weight is None:
            return self.valid.to(self.acc)
        return torch.where(self.valid, self.class_weight[self.y], 0.0)

    @_once
    def w_sum(self):
        return float(self.classes) if self.class_weight is None else self.class_weight.sum()

    @_once
    def count(self) -> torch.Tensor:
        return self.valid.sum(dtype=self.acc)

    @_once
    def wy_sum(self) -> torch.Tensor:
        return self.count if self.class_weight is None else self.wy.sum()

    @_once
    def uniform_count(self) -> torch.Tensor:
        return self.uniform_rows.sum(dtype=self.acc)

    def scales(self, reduction: str) -> torch.Tensor:
        """d(reduced loss) / d(per-row loss) on counted rows: [cross-entropy part, z part], and with
        uniform_rows a third, the smoothing part's (its own 'mean' divisor: the number of its rows)."""
        parts = 2 if self.uniform_rows is None else 3
        if reduction != "mean":
            return torch.ones(parts, dtype=self.acc, device=self.target.device)
        # All rows ignored: 1 / 0, kept off the gradient by the row masks (0 gradient, nan loss,
        # as PyTorch).
        divisors = [self.wy_sum, self.count] + ([self.uniform_count] if parts == 3 else [])
        return 1.0 / torch.stack(divisors)

    def reduce(self, ce_rows: torch.Tensor, z_rows: torch.Tensor, reduction: str, z_loss: float,
               smooth_rows: Optional[torch.Tensor] = None):
        """(loss, z part) from per-row parts shaped like the target; 'mean' as PyTorch. smooth_rows:
        the smoothing part kept apart (uniform_rows), which 'mean' divides by its own row count."""
        if reduction == "none":
            ce = ce_rows if smooth_rows is None else ce_rows + smooth_rows
            return ce + z_rows, z_rows
        if reduction == "sum":
            z = z_rows.sum()
            ce = ce_rows.sum() if smooth_rows is None else ce_rows.sum() + smooth_rows.sum()
            return ce + z, z
        z = z_rows.sum() / self.count if z_loss else z_rows.sum()
        loss = ce_rows.sum() / self.wy_sum + z  # every row ignored: 0 / 0 = nan, as PyTorch
        if smooth_rows is not None:
            loss = loss + smooth_rows.sum() / self.uniform_count
        return loss, z


# --------------------------------------------------------------------------------------------
# kernel choice
# --------------------------------------------------------------------------------------------


def kernel_choice(t: torch.Tensor) -> str:
    """'triton' or 'torch' for tensors like ``t``: SMOOTHCE_KERNEL when set, else triton on CUDA."""
    forced = os.environ.get("SMOOTHCE_KERNEL", "").strip().lower()
    if forced not in ("", "auto", "triton", "torch"):
        raise ValueError(f"smoothce: SMOOTHCE_KERNEL={forced!r}: expected 'triton', 'torch' or 'auto'")
    if forced == "torch" or t.dtype == torch.float64 and forced != "triton":
        return "torch"
    if forced == "triton":
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"smoothce: SMOOTHCE_KERNEL=triton on a {t.device.type} tensor needs TRITON_INTERPRET=1 set "
                "before smoothce's kernels are imported")
        return "triton"
    return "triton" if t.device.type == "cuda" else "torch"
