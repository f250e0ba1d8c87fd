"""Every drawn spelling of a hand-written (label-smoothed) cross-entropy is rewritten, and equals eager.

The generator (tests/spellings.py) composes twelve axes. Each draw is compiled with the detector
(then aot_eager), in training and under no_grad; the loss and the logits' gradient must equal
eager PyTorch in float64, and no log-prob op may be left in any graph.

CI runs a fixed number of draws. ``SMOOTHCE_SPELLINGS=N`` draws N (e.g. 2000), and
``SMOOTHCE_SPELLINGS_SEED=S`` starts at draw S; a failure names its draw and prints its source.
"""

import os
import random

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

import spellings
from smoothce.patterns.cross_entropy import rewrite_cross_entropy
from smoothce.patterns.ops import op_name

CI_DRAWS = 24
LOGPROB_OPS = {"log_softmax", "logsumexp", "softmax", "nll_loss", "gather", "kl_div"}


def pytest_generate_tests(metafunc):
    if "draw" in metafunc.fixturenames:
        n = int(os.environ.get("SMOOTHCE_SPELLINGS", CI_DRAWS))
        start = int(os.environ.get("SMOOTHCE_SPELLINGS_SEED", 0))
        metafunc.parametrize("draw", range(start, start + n))


class Recorder:
    def __init__(self):
        self.graphs, self.results = [], []

    def __call__(self, gm, example_inputs):
        self.results.append(rewrite_cross_entropy(gm))
        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)


def _run(fn, x, y, w, grad: bool, upcast: bool):
    rec = Recorder()
    compiled = torch.compile(fn, backend=rec)
    xc = x.detach().requires_grad_(grad)
    xr = x.detach().double().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = compiled(xc, y, w)
        # a spelling that upcasts to float32 itself computes the reference in float32
        ref = fn(xr, y, w if upcast else w.double())
    if grad:
        out.backward()
        ref.backward()
    return rec, out, ref, xc.grad, xr.grad


def test_spelling(draw):
    s = spellings.draw(random.Random(draw))
    fn = spellings.function(s)
    x, y, w = spellings.inputs(s, draw)
    bf16 = s.dtype.startswith("bfloat16")
    x = x.to(torch.bfloat16 if bf16 else torch.float32)
    context = f"draw {draw}: {s}\n{s.source()}"
    for grad in (True, False):
        torch._dynamo.reset()
        rec, out, ref, gx, gref = _run(fn, x, y, w, grad, upcast=bf16)
        matches = [m for r in rec.results for m in r.matches]
        misses = [n for r in rec.results for n in r.near_misses]
        assert matches, f"not rewritten: {misses}\n{context}"
        left = {op_name(n) for gm in rec.graphs for n in gm.graph.nodes} & LOGPROB_OPS
        assert not left, f"{left} left in the graph\n{context}"
        # the loss as the user's code returned it: same dtype, eager's value
        with torch.no_grad():
            eager = fn(x, y, w)
        assert out.dtype == eager.dtype, context
        torch.testing.assert_close(out.double(), ref.double(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{m}\n{context}")
        if grad:
            tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gx.double(), gref.double(), **tol, msg=lambda m: f"{m}\n{context}")


@pytest.mark.parametrize("axis", sorted(spellings.AXES))
def test_every_value_of_every_axis_is_drawn(axis):
    """The CI draws alone may miss a value; a few hundred draws (no compiling) cover them all."""
    seen = {getattr(spellings.draw(random.Random(i)), axis) for i in range(400)}
    assert seen == set(spellings.AXES[axis])
