"""Whether the Triton kernels can run on CPU tensors in this environment, and why not if they cannot.

Without a GPU they run through Triton's interpreter (tests/conftest.py turns it on). Triton 3.6's
interpreter holds every scalar (a kernel argument, a program id) as a one-element NumPy array and
converts it to a Python int with ``int(array)`` wherever Python needs an index: in every ``for``
loop over a bound known only at run time. NumPy 2.4 turned that conversion (deprecated since
NumPy 1.25) into a TypeError, so under NumPy >= 2.4 Triton 3.6 cannot interpret any kernel with
such a loop, ours included; later Triton releases take the element out first. Only a ``while``
loop avoids the conversion, and it compiles to other code (scf.while, not scf.for: loop
pipelining and tl.range's per-loop options apply to ``for`` loops only), whose cost on a GPU no
CPU can measure; so the tests say why they skip instead, and CI's leg with that Triton installs a
NumPy it supports.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def why_not() -> str | None:
    """None when the kernels run on CPU tensors here, else the reason they cannot."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels on CPU tensors need TRITON_INTERPRET=1 before they are imported"
    import numpy
    import triton
    import triton.language as tl
    from triton.runtime.errors import InterpreterError

    @triton.jit
    def count(out_ptr, n):
        total = 0
        for i in range(0, n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except InterpreterError as err:
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a run-time bound under "
                f"NumPy {numpy.__version__} ({err}: it converts a one-element array to an int, which NumPy "
                "2.4 made an error); install numpy<2.4 to run the kernels on CPU tensors")
    assert out.item() == 3, out
    return None


def require(device) -> None:
    """Skip the calling test when it would run a Triton kernel on CPU tensors that cannot run here."""
    import pytest

    if torch.device(device).type == "cpu" and (reason := why_not()) is not None:
        pytest.skip(reason)
