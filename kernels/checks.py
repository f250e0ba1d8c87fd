"""Argument checks shared by the smoothce ops (kept free of triton so CPU callers stay light)."""

from __future__ import annotations

from typing import Optional

import torch


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
