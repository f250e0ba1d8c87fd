"""What the ops' backwards share: a gradient computed in forward, scaled by grad_output.

An op that writes its inputs' gradient in forward (for grad_output = 1) returns it to autograd as
a saved tensor; backward multiplies it by grad_output. Eager does that in place, so the stored
gradient becomes the input's gradient and backward allocates no second buffer of its size, and
skips the pass altogether for loss.backward()'s 1 (on CUDA the scaling kernel decides that on the
device, with no sync; on CPU reading the scale costs nothing). Traced (fake or functional tensors,
under torch.compile) it is out of place: the partitioner rejects a mutated saved tensor, and
Inductor may still write the product over the saved buffer, which is donated to backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scale_in_place", "scale_stored"]


def scale_in_place(grad: Tensor, scale: Tensor) -> Tensor:
    """grad *= scale (0-d) in place, as mul_ would (version counter included), with no pass at all
    for a scale of 1."""
    if grad.device.type == "cuda":
        from smoothce.kernels.cross_entropy_triton import scale_in_place as scale_on_device

        torch.autograd.graph.increment_version(scale_on_device(grad, scale))
        return grad
    if scale.device.type == "cpu" and scale.item() == 1.0:
        torch.autograd.graph.increment_version(grad)
        return grad
    return grad.mul_(scale)


def traced(t: Tensor) -> bool:
    """Whether t is being traced (torch.compile, fake or functional tensors, a tensor subclass)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def scale_stored(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """The stored gradient times grad_loss (0-d, or per row, shaped to broadcast against grad)."""
    if traced(grad) or traced(grad_loss):
        return (grad * grad_loss).to(grad.dtype)  # computed in the wider dtype, rounded once
    if grad_loss.dim() == 0:
        return scale_in_place(grad, grad_loss)
    return grad.mul_(grad_loss)
