"""A head fused into its loss under torch.autocast computes as autocast would, in the loss's dtype.

Autocast runs the head's matmul in its dtype, casting hidden states, weight and bias to it; the
loss after it is float32. The fused op gets the same casts (so a float32 weight meets bf16
activations as autocast's own cast would make it), and returns the loss in the user's dtype.
Its head matmul runs in the autocast dtype too, so the loss is that of the same rounded logits;
gradients differ from eager's by the autocast dtype's rounding (eager rounds the logits'
gradient to it, the op keeps it in float32).
"""

import pytest
import torch
import torch.nn.functional as F

from rewrite_check import EPS, N, V, Recorder, labels, logits
from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy

D = 5


def loss_after_the_region(h, w, b, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        out = F.linear(h, w, b)
    return F.cross_entropy(out.float(), y, label_smoothing=EPS)


def loss_inside_the_region(h, w, b, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        return F.cross_entropy(F.linear(h, w, b), y, label_smoothing=EPS)


def matmul_head_inside_the_region(h, w, b, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        return F.cross_entropy(h @ w.t() + 0 * b.sum(), y, label_smoothing=EPS)


def _fused(rec):
    return [n for gm in rec.graphs for n in gm.graph.nodes if n.target is fused_linear_cross_entropy]


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
    ref = fn(h, w, b, y, dtype)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    (call,) = _fused(rec)
    # autocast's casts: hidden, weight and bias in the autocast dtype; the loss in float32
    assert [a.meta["example_value"].dtype for a in call.args[:3]] == [dtype] * 3
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # the same logits: float32 rounding
    tol = dict(rtol=1e-2, atol=1e-2)  # the autocast dtype's rounding of the logits' gradient
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_head_under_autocast_compiles(dtype):
    h, w, b, y = logits(N, D), logits(V, D, seed=3), logits(V, seed=4), labels(N)
    rec = Recorder()
    out = torch.compile(matmul_head_inside_the_region, backend=rec)(h, w, b, y, dtype)
    torch.testing.assert_close(out, matmul_head_inside_the_region(h, w, b, y, dtype), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_head_under_cuda_autocast():
    h, w, b, y = (t.cuda() for t in (logits(N, D), logits(V, D, seed=3), logits(V, seed=4), labels(N)))

    def fn(h, w, b, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.cross_entropy(F.linear(h, w, b), y, label_smoothing=EPS)

    rec = Recorder()
    out = torch.compile(fn, backend=rec)(h, w, b, y)
    torch.testing.assert_close(out, fn(h, w, b, y), rtol=1e-2, atol=1e-2)
    assert len(_fused(rec)) == 1


def test_upcast_head_logits_give_a_float32_loss():
    # F.cross_entropy(F.linear(h, W).float(), y) on bf16: the user's loss is float32, so is ours
    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y, label_smoothing=EPS)

    h, w, y = logits(N, D).bfloat16(), logits(V, D, seed=3).bfloat16().requires_grad_(), labels(N)
    rec = Recorder()
    out = torch.compile(fn, backend=rec)(h, w, y)
    ref = fn(h, w, y)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    (call,) = _fused(rec)
    assert call.kwargs["loss_dtype"] == torch.float32


@pytest.mark.inductor
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_under_cpu_autocast_through_inductor_equals_inductor(dtype):
    # Both ways users reach the rewrite, compiled by Inductor: no compile error, the fused op runs,
    # and loss and gradients are Inductor's within the autocast dtype's rounding.
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

    ref, ref_grads, _ = step("inductor")
    runs = {"backend": step("smoothce")}
    smoothce.register_patterns()
    try:
        runs["register_patterns"] = step("inductor")
    finally:
        smoothce.unregister_patterns()
    for name, (loss, grads, ran) in runs.items():
        assert ran == {"smoothce::linear_cross_entropy"}, name
        assert loss.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5, msg=name)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2, msg=name)
