"""Argument checks shared by the smoothce ops (kept free of triton so CPU callers stay light)."""

import torch


def check_labels_on_cpu(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Raise IndexError for a label outside [0, classes) that is not ignore_index.

    On CPU a data check costs no device sync, so bad labels raise like F.cross_entropy does
    instead of only poisoning the loss with nan (what the kernels do where a check would sync).
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(
            f"smoothce: target {value} is out of bounds for {classes} classes "
            f"(expected 0 <= target < {classes}, or ignore_index={ignore_index})"
        )
