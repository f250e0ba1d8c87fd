"""Triton kernels and the torch.ops.smoothce custom ops they back."""
