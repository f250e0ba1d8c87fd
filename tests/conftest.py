import os

import torch

# Triton kernels run on CPU only through the interpreter, which is read when @triton.jit decorates:
# it must be on before any smoothce kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles from scratch: no cached graphs or recompile counters leak between tests.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
