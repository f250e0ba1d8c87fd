"""A head fused into its loss under torch.autocast computes as autocast would, in the loss's dtype.

Autocast runs the head's matmul in its dtype, casting hidden states, weight and bias to it; the
loss after it is float32. The fused op gets the same casts (so a float32 weight meets bf16
activations as autocast's own cast would make it), and returns the loss in the user's dtype.
Its head matmul runs in the autocast dtype too, so the loss is that of the same rounded logits:
against float64 on those logits (``rewrite_check.autocast_linear``) it is held to float32 math, and
the gradients, computed in the autocast dtype, to that dtype's rounding.
"""

import pytest
import torch
import torch.nn.functional as F

from rewrite_check import EPS, N, V, Recorder, autocast_linear, labels, logits, tolerance
from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy

D = 5


def loss_after_the_region(h, w, b, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        out = F.linear(h, w, b)
    return F.cross_entropy(out.float(), y, label_smoothing=EPS)


def loss_inside_the_region(h, w, b, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        return F.cross_entropy(F.linear(h, w, b), y, label_smoothing=EPS)


def matmul_head_inside_the_region(h, w, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        return F.cross_entropy(h @ w.t(), y, label_smoothing=EPS)


def in_float64(h, w, b, y, dtype):
    """Every function above on float64 inputs: autocast's rounded logits, float64 after them."""
    return F.cross_entropy(autocast_linear(h, w, b, dtype), y, label_smoothing=EPS)


def _fused(rec):
    return [n for gm in rec.graphs for n in gm.graph.nodes if n.target is fused_linear_cross_entropy]


def _coarser(*dtypes):
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def assert_equals_float64(out, grads, params, y, dtype):
    """The loss and the gradients of ``params`` against in_float64: the loss to float32 math, each
    gradient to the rounding of the coarser of the autocast dtype and its parameter's."""
    p64 = [None if p is None else p.detach().double().requires_grad_() for p in params]  # on their device
    ref = in_float64(*p64, y, dtype)
    ref_grads = torch.autograd.grad(ref, [p for p in p64 if p is not None])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), **tolerance(out.dtype))
    for g, r, p in zip(grads, ref_grads, [p for p in params if p is not None]):
        assert g.dtype == p.dtype
        torch.testing.assert_close(g.double(), r, **tolerance(_coarser(dtype, p.dtype), r.abs().max().item()))


@pytest.mark.parametrize("fn", [loss_after_the_region, loss_inside_the_region], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_head_under_cpu_autocast(fn, dtype, hidden_dtype):
    h = logits(N, D).to(hidden_dtype).requires_grad_()
    w, b = logits(V, D, seed=3).requires_grad_(), logits(V, seed=4).requires_grad_()
    y = labels(N)
    rec = Recorder()
    out = torch.compile(fn, backend=rec)(h, w, b, y, dtype)
    grads = torch.autograd.grad(out, (h, w, b))
    (call,) = _fused(rec)
    # autocast's casts: hidden, weight and bias in the autocast dtype; the loss in float32
    assert [a.meta["example_value"].dtype for a in call.args[:3]] == [dtype] * 3
    assert out.dtype == fn(h, w, b, y, dtype).dtype
    assert_equals_float64(out, grads, (h, w, b), y, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_head_under_autocast(dtype):
    h, w, y = logits(N, D).requires_grad_(), logits(V, D, seed=3).requires_grad_(), labels(N)
    rec = Recorder()
    out = torch.compile(matmul_head_inside_the_region, backend=rec)(h, w, y, dtype)
    grads = torch.autograd.grad(out, (h, w))
    (call,) = _fused(rec)
    assert [a.meta["example_value"].dtype for a in call.args[:2]] == [dtype] * 2
    assert_equals_float64(out, grads, (h, w, None), y, dtype)


@pytest.mark.gpu
def test_head_under_cuda_autocast():
    h, w, b = (t.cuda().requires_grad_() for t in (logits(N, D), logits(V, D, seed=3), logits(V, seed=4)))
    y = labels(N).cuda()

    def fn(h, w, b, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.cross_entropy(F.linear(h, w, b), y, label_smoothing=EPS)

    rec = Recorder()
    out = torch.compile(fn, backend=rec)(h, w, b, y)
    assert len(_fused(rec)) == 1
    assert_equals_float64(out, torch.autograd.grad(out, (h, w, b)), (h, w, b), y, torch.bfloat16)


def test_upcast_head_logits_give_a_float32_loss():
    # F.cross_entropy(F.linear(h, W).float(), y) on bf16: the user's loss is float32, so is ours,
    # and it is that of F.linear's bf16 logits to float32 math
    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y, label_smoothing=EPS)

    h, w, y = logits(N, D).bfloat16().requires_grad_(), logits(V, D, seed=3).bfloat16().requires_grad_(), labels(N)
    rec = Recorder()
    out = torch.compile(fn, backend=rec)(h, w, y)
    assert out.dtype == fn(h, w, y).dtype == torch.float32
    (call,) = _fused(rec)
    assert call.kwargs["loss_dtype"] == torch.float32
    assert_equals_float64(out, torch.autograd.grad(out, (h, w)), (h, w, None), y, torch.bfloat16)


@pytest.mark.inductor
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_under_cpu_autocast_through_inductor_equals_inductor(dtype):
    # Both ways users reach the rewrite, compiled by Inductor: no compile error, the fused op runs,
    # the loss is Inductor's to float32 rounding, and loss and gradients equal float64's as above.
    import smoothce
    from torch.profiler import profile

    h, w, b, y = logits(N, D), logits(V, D, seed=3), logits(V, seed=4), labels(N)

    def step(compile_with):
        torch._dynamo.reset()
        params = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        with profile() as prof:
            loss = torch.compile(loss_inside_the_region, backend=compile_with)(*params, y, dtype)
            loss.backward()
        ran = {e.name for e in prof.events() if e.name.startswith("smoothce::")}
        return loss.detach(), [p.grad for p in params], ran

    ref, _, _ = step("inductor")
    runs = {"backend": step("smoothce")}
    smoothce.register_patterns()
    try:
        runs["register_patterns"] = step("inductor")
    finally:
        smoothce.unregister_patterns()
    for name, (loss, grads, ran) in runs.items():
        assert ran == {"smoothce::linear_cross_entropy"}, name
        assert loss.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(loss, ref, **tolerance(torch.float32), msg=name)
        assert_equals_float64(loss, grads, (h, w, b), y, dtype)
