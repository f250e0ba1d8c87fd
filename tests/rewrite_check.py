"""Helpers of the detector's tests: compile a loss with the detector, compare it with eager in float64.

Shapes are tiny (N=6 rows, V=11 classes: odd, so eps/V and eps/(V-1) differ visibly).
"""

import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.debugging import aot_eager

from smoothce.kernels.cross_entropy import fused_cross_entropy
from smoothce.kernels.inputs import TargetOutOfBoundsError
from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy
from smoothce.kernels.linear_soft_cross_entropy import fused_linear_soft_cross_entropy
from smoothce.kernels.soft_cross_entropy import fused_soft_cross_entropy
from smoothce.patterns.cross_entropy import rewrite_cross_entropy
from smoothce.patterns.ops import op_name

N, V = 6, 11
B, T = 2, 4
EPS = 0.1


# ops that must be gone once a loss is rewritten
ORIGINAL_OPS = {"log_softmax", "nll_loss", "cross_entropy", "kl_div", "gather", "logsumexp", "one_hot",
                "scatter", "full_like", "softmax"}


class Recorder:
    """A torch.compile backend: the detector, then aot_eager. Keeps each graph and result."""

    def __init__(self, **options):
        self.graphs, self.results, self.options = [], [], options

    def __call__(self, gm, example_inputs):
        self.results.append(rewrite_cross_entropy(gm, **self.options))
        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    @property
    def result(self):
        assert len(self.results) == 1, f"expected one graph, got {len(self.results)}"
        return self.results[0]

    @property
    def gm(self):
        return self.graphs[0]


# What eager says of a label outside the classes: gather and indexing, nll_loss, one_hot
LABEL_OUT_OF_BOUNDS = re.compile(r"index -?\d+ is out of bounds for dimension \d+ with size \d+"
                                 r"|Target -?\d+ is out of bounds|Class values must be (non-negative|smaller than)")


def assert_raises_as_eager(call, err: Exception):
    """call() raises what eager raised (err): an exception of err's type, with err's message (Dynamo,
    meeting it while tracing with fake tensors, quotes it), or, where eager rejected a label outside
    the classes, the op's error for that label. A failure of Dynamo or of the backend itself (a
    RuntimeError too) does not pass."""
    with pytest.raises(type(err)) as info:
        call()
    got = info.value
    if isinstance(got, TargetOutOfBoundsError):
        assert LABEL_OUT_OF_BOUNDS.search(str(err)), f"eager raised {err!r}, compiled {got!r}"
    else:
        assert str(err) in str(got), f"eager raised {err!r}, compiled {got!r}"


def normalize(code: str) -> str:
    lines = [line.rstrip() for line in code.strip().splitlines() if line.strip()]
    return "\n".join(lines)


def fused_calls(gm) -> int:
    ops = (fused_cross_entropy, fused_linear_cross_entropy, fused_soft_cross_entropy, fused_linear_soft_cross_entropy)
    return sum(n.op == "call_function" and n.target in ops for n in gm.graph.nodes)


def left_ops(gm) -> set:
    return {op_name(n) for n in gm.graph.nodes} & ORIGINAL_OPS


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def tolerance(dtype: torch.dtype, scale: float = 0.0) -> dict:
    """rtol / atol of a result computed in ``dtype`` against float64 eager on the same input values.

    float32 and float64: float32 math (the op computes in float32), sums over a few rows of terms of
    size ~log(V): 1e-5 is some 80 float32 roundings, and a thousandth of one bfloat16 rounding of
    such a loss (2^-8 of it). A 16-bit result is rounded to its dtype at most twice (the op's gradient when stored and
    when scaled by grad_output): 2u of itself, u = 2^-8 for bfloat16, and one rounding of ``scale``
    (the largest value of the quantity) where partial results in that dtype add up.
    """
    if dtype in (torch.float32, torch.float64):
        return dict(rtol=1e-5, atol=1e-5)
    u = torch.finfo(dtype).eps / 2
    return dict(rtol=2 * u, atol=u * scale + 1e-5)


def check(fn, *inputs, grad=(0,), dtype=torch.float32, grad_dtype=None, no_grad=False, matches=1, calls=None,
          reference=None, kept=frozenset(), fuse_linear=False):
    """Compile fn with the detector, compare with float64 eager; returns the Recorder.

    inputs: float tensors are cast to `dtype` (compiled) and float64 (eager, from the same rounded
    values); the ones at positions `grad` require grad. A fixed random cotangent (rounded to each
    output's dtype) weights each output so reduction='none' gradients are checked row by row.
    Each quantity is held to tolerance() of the dtype it is computed in: an output to its own (a
    float32 loss from bfloat16 logits to float32 math), a gradient to its input's, or to
    ``grad_dtype`` where the program casts the input before the loss (autocast's head runs in its
    dtype, so the gradient reaching a float32 weight was computed, and rounded, in that dtype).
    ``calls``: op calls expected (default: one per match).
    """
    ours = [_cast(t, dtype) for t in inputs]
    ref = [_cast(t, torch.float64) for t in ours]
    for i in grad:
        ours[i] = ours[i].detach().requires_grad_(not no_grad)
        ref[i] = ref[i].detach().requires_grad_(not no_grad)
    rec = Recorder(fuse_linear=fuse_linear)
    compiled = torch.compile(fn, backend=rec, fullgraph=True)
    with torch.set_grad_enabled(not no_grad):
        out_ref = (reference or fn)(*ref)
        out = compiled(*ours)
        with torch.no_grad():
            out_same = fn(*ours)  # eager at the compiled precision: the dtypes to expect
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    out = out if isinstance(out, tuple) else (out,)
    out_same = out_same if isinstance(out_same, tuple) else (out_same,)
    gen = torch.Generator().manual_seed(7)
    loss_ref, loss = 0, 0
    for o, r, e in zip(out, out_ref, out_same):
        if not r.is_floating_point():
            torch.testing.assert_close(o, r)
            continue
        assert o.dtype == e.dtype and o.shape == e.shape, (o, e)
        # nan where eager's float64 gives nan (a mean over no row) is the same value
        tol = tolerance(o.dtype, r.detach().abs().nan_to_num().max().item() if r.numel() else 0.0)
        torch.testing.assert_close(o.double(), r.double(), **tol, equal_nan=True)
        if r.requires_grad:
            cot = torch.randn(r.shape, generator=gen, dtype=torch.float64).to(o.dtype)
            loss_ref = loss_ref + (r * cot.double()).sum()
            loss = loss + (o * cot).sum()
    if not no_grad and grad:
        loss_ref.backward()
        loss.backward()
        for i in grad:
            expected = ref[i].grad.double()
            tol = tolerance(grad_dtype or ours[i].dtype, expected.abs().max().item())
            torch.testing.assert_close(ours[i].grad.double(), expected, **tol)
    if matches is not None:
        assert len(rec.result.matches) == matches, rec.result
    if matches:
        assert fused_calls(rec.gm) == (calls or matches), rec.gm.code
        assert left_ops(rec.gm) == set(kept), rec.gm.code
    return rec


def autocast_linear(h, w, b, dtype):
    """F.linear(h, w, b) under autocast to ``dtype``, on float64 tensors, as a reference: the values
    autocast computes (inputs rounded to ``dtype``, the product rounded to it once) and, in float64,
    the gradients of the exact product of those rounded inputs."""
    def rounded(t):  # the value rounded, the gradient passed through
        return None if t is None else t + (t.to(dtype).double() - t).detach()

    h, w, b = rounded(h), rounded(w), rounded(b)
    exact = F.linear(h, w, b)
    autocast = F.linear(*(None if t is None else t.detach().to(dtype) for t in (h, w, b)))
    return exact + (autocast.double() - exact).detach()


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def labels(*shape, seed=1, ignore=None, where=(0,)):
    y = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))
    if ignore is not None:
        flat = y.view(-1)
        for i in where:
            flat[i] = ignore
    return y


def assert_equals_eager_in_float64(compiled, fn, *inputs):
    """compiled(x, *rest) and fn in float64: the same loss and gradient of x (inputs[0]), each to the
    tolerance() of its dtype."""
    x, rest = inputs[0].detach().requires_grad_(), inputs[1:]
    out = compiled(x, *rest)
    out.backward()
    xr = x.detach().double().requires_grad_()
    ref = fn(xr, *rest)
    ref.backward()
    torch.testing.assert_close(out.double(), ref.double(), **tolerance(out.dtype, ref.abs().item()))
    torch.testing.assert_close(x.grad.double(), xr.grad, **tolerance(x.dtype, xr.grad.abs().max().item()))
    return out


def parametrize_draws(metafunc, env: str, ci_draws: int):
    """A generator test's ``draw`` parameter: the CI's ``ci_draws`` draws, or ``$env`` of them
    from ``${env}_SEED`` (a failure names the command that reruns it alone)."""
    if "draw" in metafunc.fixturenames:
        n = int(os.environ.get(env, ci_draws))
        start = int(os.environ.get(f"{env}_SEED", 0))
        metafunc.parametrize("draw", range(start, start + n))
