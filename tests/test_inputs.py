"""kernels/inputs.py's choice of path (kernel_choice, which both ops ask before they run).

Fake CUDA tensors carry a device and a dtype without a GPU, so the choice shows on any machine;
on a GPU machine the ops themselves show it.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from smoothce.kernels.inputs import kernel_choice


def like(device: str, dtype: torch.dtype) -> torch.Tensor:
    if device == "cuda":
        with FakeTensorMode():
            return torch.empty(2, 3, dtype=dtype, device="cuda")
    return torch.empty(2, 3, dtype=dtype)


@pytest.mark.parametrize("forced, device, dtype, path", [
    ("", "cuda", torch.bfloat16, "triton"),  # the kernel on CUDA
    ("", "cuda", torch.float32, "triton"),
    ("", "cuda", torch.float64, "torch"),  # float64 runs the torch path
    ("auto", "cuda", torch.float64, "torch"),
    ("", "cpu", torch.float32, "torch"),
    ("torch", "cuda", torch.bfloat16, "torch"),  # SMOOTHCE_KERNEL forces a path
    ("triton", "cuda", torch.float64, "triton"),
])
def test_kernel_choice(monkeypatch, forced, device, dtype, path):
    monkeypatch.setenv("SMOOTHCE_KERNEL", forced)
    assert kernel_choice(like(device, dtype)) == path


def test_a_forced_triton_path_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("SMOOTHCE_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="SMOOTHCE_KERNEL=triton on a cpu tensor needs TRITON_INTERPRET=1"):
        kernel_choice(torch.empty(2, 3))


@pytest.mark.gpu
def test_float64_runs_the_torch_path_on_cuda(monkeypatch):
    import smoothce.kernels.cross_entropy_triton as kernel
    import smoothce.kernels.linear_cross_entropy_triton as chunk_loop
    from smoothce.kernels.cross_entropy import fused_cross_entropy
    from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path ran on float64")

    monkeypatch.delenv("SMOOTHCE_KERNEL", raising=False)
    monkeypatch.setattr(kernel, "launch_cross_entropy", refuse)
    monkeypatch.setattr(chunk_loop, "triton_chunks", refuse)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64).cuda().requires_grad_()
    y = torch.randint(0, 7, (4,), generator=g).cuda()
    fused_cross_entropy(x, y, label_smoothing=0.1).backward()
    w = torch.randn(7, 5, generator=g, dtype=torch.float64).cuda().requires_grad_()
    fused_linear_cross_entropy(x[:, :5].detach(), w, None, y, label_smoothing=0.1).backward()
