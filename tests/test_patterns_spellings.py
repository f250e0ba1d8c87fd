"""Every drawn spelling of a hand-written (label-smoothed) cross-entropy is rewritten, and equals eager.

The generator (tests/spellings.py) composes twelve axes. Each draw is compiled with the detector
(then aot_eager), in training and under no_grad; the loss and the logits' gradient must equal
eager PyTorch in float64, the graphs must hold the op calls the draw needs (``Spelling.calls``),
and nothing of the loss may be left in them: no log-prob op, and none of the one-hots
(F.one_hot, scatter, arange == y) the user's code built its target with.

A bfloat16 draw upcasts its logits itself (``x.float()``, ``log_softmax(..., dtype=torch.float32)``):
its reference is the same program upcasting to float64 instead, on the same bfloat16 values, so the
bfloat16 run is held to float64 (its loss as closely as float32 math allows, its bfloat16 gradient
within bfloat16 rounding), not to a float32 reference.

CI runs a fixed number of draws. ``SMOOTHCE_SPELLINGS=N`` draws N (e.g. 2000), and
``SMOOTHCE_SPELLINGS_SEED=S`` starts at draw S; a failure names its draw, the command that reruns
it alone, and prints its program.
"""

import os
import random

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

import spellings
from rewrite_check import fused_calls
from smoothce.patterns.cross_entropy import rewrite_cross_entropy
from smoothce.patterns.ops import op_name

CI_DRAWS = 24
LOGPROB_OPS = {"log_softmax", "logsumexp", "softmax", "nll_loss", "gather", "kl_div"}
# bfloat16 keeps 8 significant bits: a value rounded once is off by at most 2 ** -8 of itself
BF16_ROUNDING = torch.finfo(torch.bfloat16).eps / 2


def pytest_generate_tests(metafunc):
    if "draw" in metafunc.fixturenames:
        n = int(os.environ.get("SMOOTHCE_SPELLINGS", CI_DRAWS))
        start = int(os.environ.get("SMOOTHCE_SPELLINGS_SEED", 0))
        metafunc.parametrize("draw", range(start, start + n))


def builds_target(n) -> bool:
    """A node of the user's code that builds the target distribution from the labels."""
    name = op_name(n)
    return name in ("one_hot", "scatter", "arange") or (
        name == "eq" and any(op_name(a) == "arange" for a in n.all_input_nodes))


class Recorder:
    def __init__(self):
        self.graphs, self.results, self.targets = [], [], []

    def __call__(self, gm, example_inputs):
        self.targets += [n for n in gm.graph.nodes if builds_target(n)]  # before the rewrite
        self.results.append(rewrite_cross_entropy(gm))
        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def left(self) -> tuple[set, list]:
        """The log-prob ops in the rewritten graphs, and the user's target-building nodes still there."""
        nodes = [n for gm in self.graphs for n in gm.graph.nodes]
        kept = set(nodes)
        return {op_name(n) for n in nodes} & LOGPROB_OPS, [n.format_node() for n in self.targets if n in kept]


def _run(fn, ref_fn, x, y, w, grad: bool):
    rec = Recorder()
    compiled = torch.compile(fn, backend=rec)
    xc = x.detach().requires_grad_(grad)
    xr = x.detach().double().requires_grad_(grad)  # the same (rounded) values
    with torch.set_grad_enabled(grad):
        out = compiled(xc, y, w)
        ref = ref_fn(xr, y, w.double())
    if grad:
        out.backward()
        ref.backward()
    return rec, out, ref, xc.grad, xr.grad


def describe(draw: int, s: spellings.Spelling) -> str:
    """What a failure prints: the draw, how to rerun it alone, its program (and its reference's)."""
    rerun = (f"SMOOTHCE_SPELLINGS=1 SMOOTHCE_SPELLINGS_SEED={draw} "
             "python -m pytest tests/test_patterns_spellings.py -k test_spelling")
    text = f"draw {draw} (rerun: {rerun}): {s}\n# inputs: spellings.inputs(s, {draw})\n{s.source()}"
    if s.source("float64") != s.source():
        text += f"# the float64 reference:\n{s.source('float64')}"
    return text


def test_spelling(draw):
    s = spellings.draw(random.Random(draw))
    fn, ref_fn = spellings.function(s), spellings.function(s, upcast="float64")
    x, y, w = spellings.inputs(s, draw)
    bf16 = s.dtype.startswith("bfloat16")
    x = x.to(torch.bfloat16 if bf16 else torch.float32)
    context = describe(draw, s)
    for grad in (True, False):
        torch._dynamo.reset()
        rec, out, ref, gx, gref = _run(fn, ref_fn, x, y, w, grad)
        matches = [m for r in rec.results for m in r.matches]
        misses = [n for r in rec.results for n in r.near_misses]
        assert matches, f"not rewritten: {misses}\n{context}"
        calls = sum(fused_calls(gm) for gm in rec.graphs)
        assert calls == s.calls, f"{calls} op calls, expected {s.calls}\n{context}"
        ops, targets = rec.left()
        assert not ops, f"{ops} left in the graph\n{context}"
        assert not targets, f"what built the target (one-hot, row index) left in the graph: {targets}\n{context}"
        # the loss as the user's code returned it: same dtype, eager's value
        with torch.no_grad():
            eager = fn(x, y, w)
        assert out.dtype == eager.dtype, context
        assert ref.dtype == torch.float64, context
        # float32 math on the same values (a bfloat16 softcap or z term before the upcast
        # rounds each row, and the mean of the rows stays well within this)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{m}\n{context}")
        if grad:
            # a bfloat16 gradient: bfloat16 rounding of each entry, and of the gradient's scale
            # where partial gradients add up (one per op call)
            tol = dict(rtol=BF16_ROUNDING, atol=2 * BF16_ROUNDING * gref.abs().max().item()) if bf16 \
                else dict(rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gx.double(), gref, **tol, msg=lambda m: f"{m}\n{context}")


@pytest.mark.parametrize("axis", sorted(spellings.AXES))
def test_every_value_of_every_axis_is_drawn(axis):
    """The CI draws alone may miss a value; a few hundred draws (no compiling) cover them all."""
    seen = {getattr(spellings.draw(random.Random(i)), axis) for i in range(400)}
    assert seen == set(spellings.AXES[axis])
