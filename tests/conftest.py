import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    # Triton kernels run on CPU only through the interpreter, which is read when @triton.jit
    # decorates: it must be on before any test module imports a kernel module. A CUDA machine
    # runs them compiled, on CUDA tensors.
    if not HAS_CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: CUDA when the machine has it, else the CPU (the
    Triton kernel then runs through the interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles from scratch: no cached graphs or recompile counters leak between tests.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
