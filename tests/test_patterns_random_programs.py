"""Random programs over log-probs (tests/random_programs.py): the detector never fails on them and
never changes what they compute, values and gradients (or the exception eager raises).

``SMOOTHCE_RANDOM_PROGRAMS=N`` runs N programs instead of the CI's few, from
``SMOOTHCE_RANDOM_PROGRAMS_SEED``.
"""

import os

import pytest
import torch

import random_programs
from rewrite_check import Recorder

CI_PROGRAMS = 30


def pytest_generate_tests(metafunc):
    if "seed" in metafunc.fixturenames:
        n = int(os.environ.get("SMOOTHCE_RANDOM_PROGRAMS", CI_PROGRAMS))
        start = int(os.environ.get("SMOOTHCE_RANDOM_PROGRAMS_SEED", 0))
        metafunc.parametrize("seed", range(start, start + n))


def _grads(outs, x):
    """d(sum_k (k + 1) out_k) / dx, over the outputs that have a gradient."""
    total = sum((o.double() * (k + 1)).sum() for k, o in enumerate(outs) if o.requires_grad)
    if not isinstance(total, torch.Tensor):
        return None
    (g,) = torch.autograd.grad(total, x, allow_unused=True)
    return g


def test_random_program(seed):
    fn = random_programs.function(seed)
    x, y, m, w = random_programs.inputs(seed)
    context = f"seed {seed}:\n{random_programs.program(seed)}"
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(fn, backend=Recorder())
    try:
        expected = fn(xe, y, m, w)
    except (RuntimeError, IndexError) as err:
        with pytest.raises(type(err)):
            compiled(xc, y, m, w)
        return
    got = compiled(xc, y, m, w)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, context
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda s: f"{s}\n{context}")
    ge, gg = _grads(expected, xe), _grads(got, xc)
    assert (ge is None) == (gg is None), context
    if ge is not None:
        torch.testing.assert_close(gg, ge, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda s: f"{s}\n{context}")
