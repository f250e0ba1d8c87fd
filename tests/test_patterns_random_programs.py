"""Random programs over log-probs (tests/random_programs.py): the detector never fails on them and
never changes what they compute, values and gradients (or the exception eager raises).

``SMOOTHCE_RANDOM_PROGRAMS=N`` runs N programs instead of the CI's few, from
``SMOOTHCE_RANDOM_PROGRAMS_SEED``.
"""

import functools
import os

import torch

import random_programs
from rewrite_check import Recorder, assert_raises_as_eager

CI_PROGRAMS = 30
# Of the CI's programs, at least this many have a loss rewritten and this many raise, compiled as
# in eager: a detector that rewrote nothing, or a test that never met an exception, fails.
REWRITTEN_AT_LEAST, RAISING_AT_LEAST = 12, 2


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


@functools.cache
def checked(seed: int) -> tuple[int, bool]:
    """Program ``seed`` compiled with the detector against eager: (losses rewritten, whether it raised)."""
    torch._dynamo.reset()
    fn = random_programs.function(seed)
    x, y, m, w = random_programs.inputs(seed)
    context = f"seed {seed}:\n{random_programs.program(seed)}"
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    rec = Recorder()
    compiled = torch.compile(fn, backend=rec)
    try:
        expected = fn(xe, y, m, w)
    except (RuntimeError, IndexError) as err:
        # Dynamo drops what no output reads: a line that raised in eager may not run compiled.
        # Without the detector, torch.compile either raises too or gives the values to expect.
        try:
            expected = torch.compile(fn, backend="aot_eager")(xe, y, m, w)
        except type(err):
            assert_raises_as_eager(lambda: compiled(xc, y, m, w), err)
            return sum(len(r.matches) for r in rec.results), True
    got = compiled(xc, y, m, w)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, context
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda s: f"{s}\n{context}")
    ge, gg = _grads(expected, xe), _grads(got, xc)
    assert (ge is None) == (gg is None), context
    if ge is not None:
        torch.testing.assert_close(gg, ge, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda s: f"{s}\n{context}")
    return sum(len(r.matches) for r in rec.results), False


def test_random_program(seed):
    checked(seed)


def test_the_programs_have_losses_to_rewrite_and_programs_that_raise():
    outcomes = [checked(seed) for seed in range(CI_PROGRAMS)]
    rewritten = [seed for seed, (matches, _) in enumerate(outcomes) if matches]
    raising = [seed for seed, (_, raised) in enumerate(outcomes) if raised]
    assert len(rewritten) >= REWRITTEN_AT_LEAST, f"rewritten: programs {rewritten}"
    assert len(raising) >= RAISING_AT_LEAST, f"raising: programs {raising}"
