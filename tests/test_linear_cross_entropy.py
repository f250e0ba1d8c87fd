"""smoothce::linear_cross_entropy against eager PyTorch (F.linear + cross-entropy) in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from smoothce.kernels.linear_cross_entropy import chunk_rows, fused_linear_cross_entropy

N, D, V = 13, 8, 11  # 13 rows: not a multiple of the forced chunk sizes below
CHUNK = 4  # forced small chunk: 13 = 4 + 4 + 4 + 1


def reference(h, w, bias, target, class_weight=None, *, ignore_index=-100, reduction="mean", a=1.0, b=0.0,
              c=0.0, z=0.0, softcap=None, logit_scale=1.0):
    """The op's math written out with full logits (the general a, b, c form), differentiable."""
    x = F.linear(h, w, bias) * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(x, dim=-1)
    logp = x - lse.unsqueeze(-1)
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    cw = torch.ones(x.shape[-1], dtype=x.dtype) if class_weight is None else class_weight.to(x.dtype)
    wy = cw[y] * valid
    ce = -(a * cw[y] * logp.gather(-1, y.unsqueeze(-1)).squeeze(-1) + b * (logp * cw).sum(-1)) + c
    ce = torch.where(valid, ce, 0.0)
    zr = torch.where(valid, z * lse * lse, 0.0)
    if reduction == "none":
        return ce + zr
    if reduction == "sum":
        return ce.sum() + zr.sum()
    return ce.sum() / wy.sum() + zr.sum() / valid.sum()


def make(dtype=torch.float64, bias=True, ignore=True, seed=0, n=N, d=D, v=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[[1, 5, n - 1]] = -100  # one ignored row inside the last, ragged chunk too
    return h, w, b, t


def grads(loss, params, seed=1):
    """Gradients for a random, non-unit grad_output (per row for reduction='none')."""
    g = torch.Generator().manual_seed(seed)
    go = (torch.rand(loss.shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(loss.dtype)
    return torch.autograd.grad(loss, [p for p in params if p is not None], go)


def assert_same(h, w, b, t, kwargs_ours, loss_ref, rtol=1e-10, atol=1e-12):
    loss = fused_linear_cross_entropy(h, w, b, t, **kwargs_ours)
    assert loss.shape == loss_ref.shape and loss.dtype == h.dtype
    torch.testing.assert_close(loss.double(), loss_ref.double(), rtol=rtol, atol=atol)
    for ours, ref in zip(grads(loss, (h, w, b)), grads(loss_ref, (h, w, b))):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours.double(), ref.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# against F.cross_entropy itself
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_cross_entropy(reduction, eps, weighted, bias):
    h, w, b, t = make(bias=bias)
    cw = torch.rand(V, dtype=torch.float64) + 0.5 if weighted else None
    ref = F.cross_entropy(F.linear(h, w, b), t, weight=cw, reduction=reduction, label_smoothing=eps)
    ours = dict(class_weight=cw, reduction=reduction, label_smoothing=eps, chunk_size=CHUNK)
    assert_same(h, w, b, t, ours, ref)


def test_reference_matches_f_cross_entropy():
    # Anchors the general-form reference used below on PyTorch itself.
    h, w, b, t = make()
    cw = torch.rand(V, dtype=torch.float64) + 0.5
    for reduction in ("none", "sum", "mean"):
        ref = F.cross_entropy(F.linear(h, w, b), t, weight=cw, reduction=reduction, label_smoothing=0.2)
        ours = reference(h, w, b, t, cw, reduction=reduction, a=0.8, b=0.2 / V)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# the general (a, b, c) form, z-loss, softcap, logit_scale
# ---------------------------------------------------------------------------------------------------
EPS = 0.1


def kl_constant(eps):
    """sum_j p_j log p_j of PyTorch's smoothed distribution (1 - eps + eps / V on the label, eps / V elsewhere)."""
    return (1 - eps + eps / V) * math.log(1 - eps + eps / V) + (V - 1) * (eps / V) * math.log(eps / V)


# (the op's keywords, the reference's general-form coefficients)
CASES = {
    # eps spread over the other V - 1 classes
    "eps_over_v_minus_1": (dict(label_smoothing=EPS, smoothing="others"), dict(a=1 - EPS - EPS / (V - 1), b=EPS / (V - 1))),
    # KL divergence against the smoothed distribution: c = sum_j p_j log p_j
    "kl_constant": (dict(label_smoothing=EPS, kl=True), dict(a=1 - EPS, b=EPS / V, c=kl_constant(EPS))),
    "z_loss": (dict(label_smoothing=EPS, z_loss=1e-2), dict(a=1 - EPS, b=EPS / V, z=1e-2)),
    "softcap": (dict(label_smoothing=EPS, softcap=2.5), dict(a=1 - EPS, b=EPS / V, softcap=2.5)),
    "softcap_z_scale": (dict(z_loss=0.1, softcap=3.0, logit_scale=0.7), dict(z=0.1, softcap=3.0, logit_scale=0.7)),
    "uniform_only": (dict(label_smoothing=1.0), dict(a=0.0, b=1.0 / V)),
    "scaled": (dict(label_smoothing=EPS, scale=0.5), dict(a=0.5 * (1 - EPS), b=0.5 * EPS / V)),
}


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weighted", [False, True])
def test_general_form(case, reduction, weighted):
    words, p = CASES[case]
    h, w, b, t = make(seed=3)
    cw = torch.rand(V, dtype=torch.float64) + 0.5 if weighted else None
    ref = reference(h, w, b, t, cw, reduction=reduction, **p)
    ours = dict(class_weight=cw, reduction=reduction, chunk_size=CHUNK, **words)
    assert_same(h, w, b, t, ours, ref)


def test_return_z_loss():
    h, w, b, t = make()
    for reduction in ("none", "mean"):
        loss, z_term = fused_linear_cross_entropy(h, w, b, t, reduction=reduction, z_loss=0.05,
                                                  return_z_loss=True, chunk_size=CHUNK)
        ref_z = reference(h, w, b, t, reduction=reduction, a=0.0, z=0.05)
        torch.testing.assert_close(z_term, ref_z.detach(), rtol=1e-12, atol=1e-12)
        assert not z_term.requires_grad
        torch.testing.assert_close(loss, reference(h, w, b, t, reduction=reduction, z=0.05), rtol=1e-12,
                                   atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# chunking
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5, N - 1, N, N + 3, None])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_chunk_boundaries(chunk, reduction):
    h, w, b, t = make(seed=4)
    ref = reference(h, w, b, t, reduction=reduction, a=0.9, b=0.1 / V, z=1e-3)
    ours = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=chunk)
    assert_same(h, w, b, t, ours, ref)


@pytest.mark.parametrize("block_rows", [1, 3])
@pytest.mark.parametrize("softcap", [None, 4.0])  # softmax-factored gradients / explicit gradient
def test_cache_block_boundaries(monkeypatch, block_rows, softcap):
    # The torch path's elementwise blocks inside a chunk: 3 rows per block splits a 5-row chunk 3 + 2.
    import smoothce.kernels.linear_cross_entropy as lce

    monkeypatch.setattr(lce, "_CE_BLOCK_ELEMENTS", block_rows * V)
    h, w, b, t = make(seed=6)
    cw = torch.rand(V, dtype=torch.float64) + 0.5
    for reduction in ("none", "mean"):
        ref = reference(h, w, b, t, cw, reduction=reduction, a=0.9, b=0.1 / V, z=1e-3, softcap=softcap)
        ours = dict(class_weight=cw, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                    softcap=softcap, chunk_size=5)
        assert_same(h, w, b, t, ours, ref)


def test_chunk_rows_rule():
    # Rows per chunk = D (fp32 chunk logits as large as the fp32 weight gradient), at least 2^20
    # logits per chunk, a multiple of 8, <= N.
    assert chunk_rows(4096, 32768, 256) == 256
    assert chunk_rows(4096, 128256, 4096) == 4096
    assert chunk_rows(100, 50000, 4096) == 100
    assert chunk_rows(4096, 100000, 250) == 256
    assert chunk_rows(4096, 1000, 250) == 1056  # 2^20 / 1000 = 1048.6 rows, rounded up to 8
    assert chunk_rows(4096, 1000, 3) == 1056
    assert chunk_rows(1024, 1024, 64) == 1024  # a small head is one chunk


# ---------------------------------------------------------------------------------------------------
# edge cases, dtypes, autograd composition
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_all_ignored_mean_is_nan_with_zero_grad(eps):
    h, w, b, t = make()
    t[:] = -100
    loss = fused_linear_cross_entropy(h, w, b, t, label_smoothing=eps, chunk_size=CHUNK)
    ref = F.cross_entropy(F.linear(h, w, b), t, label_smoothing=eps)
    assert torch.isnan(loss) and torch.isnan(ref)
    for ours, theirs in zip(torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(ours, theirs)
        assert not ours.abs().sum()


def test_custom_ignore_index_and_int32_target():
    h, w, b, t = make(ignore=False)
    t[[0, 7]] = 3
    ref = F.cross_entropy(F.linear(h, w, b), t, ignore_index=3, label_smoothing=0.1)
    ours = dict(ignore_index=3, label_smoothing=0.1, chunk_size=CHUNK)
    assert_same(h, w, b, t.int(), ours, ref)


def test_no_ignore_index():
    # ignore_index=None: -100 is an ordinary (out-of-range) label, every in-range row counts.
    h, w, b, t = make(ignore=False)
    ref = F.cross_entropy(F.linear(h, w, b), t, ignore_index=-1000, label_smoothing=0.1, reduction="sum")
    assert_same(h, w, b, t, dict(ignore_index=None, label_smoothing=0.1, reduction="sum", chunk_size=CHUNK), ref)
    t[2] = -100
    with pytest.raises(IndexError, match="target -100 is out of bounds"):
        fused_linear_cross_entropy(h, w, b, t, ignore_index=None)


def test_loss_dtype():
    # The loss in the dtype the user's code produced (an upcast head: float32 from bf16), not rounded
    # through bf16 first: float32 agreement with the float64 loss of the same bf16 inputs (the torch
    # path computes the chunk logits in float32).
    h, w, b, t = make(dtype=torch.bfloat16)
    loss = fused_linear_cross_entropy(h, w, b, t, label_smoothing=0.1, loss_dtype=torch.float32, chunk_size=CHUNK)
    ref = F.cross_entropy(F.linear(h.double(), w.double(), b.double()), t, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_leading_dims_reduction_none():
    h, w, b, t = make(n=12)
    h3 = h.detach().view(3, 4, D).requires_grad_()
    t3 = t.view(3, 4)
    loss = fused_linear_cross_entropy(h3, w, b, t3, reduction="none", label_smoothing=0.1,
                                      chunk_size=5)
    assert loss.shape == (3, 4)
    ref = F.cross_entropy(F.linear(h3, w, b).transpose(1, 2), t3, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads(loss, (h3, w, b)), grads(ref, (h3, w, b))):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_tied_embedding_accumulates_both_uses():
    # An embedding and an LM head sharing one weight: autograd sums the embedding's scatter gradient and
    # the op's grad_weight.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, D, dtype=torch.float64)
    tokens = torch.randint(0, V, (2, 7))
    target = torch.roll(tokens, -1, dims=1)
    target[:, -1] = -100

    def step(loss_fn):
        emb.zero_grad(set_to_none=True)
        h = torch.tanh(emb(tokens))
        loss = loss_fn(h, emb.weight, target)
        loss.backward()
        return loss.detach(), emb.weight.grad.clone()

    ours = step(lambda h, w, t: fused_linear_cross_entropy(h, w, None, t, label_smoothing=0.1,
                                                           chunk_size=CHUNK))
    ref = step(lambda h, w, t: F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten(), label_smoothing=0.1))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 2e-2, 2e-2)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_low_precision(dtype, rtol, atol, reduction):
    # Reference: the same rounded inputs in float64. bf16 gradients keep their dtype; the weight
    # gradient is accumulated in fp32 over the chunks and rounded once.
    h, w, b, t = make(dtype=dtype, n=40, d=16, v=50)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    loss = fused_linear_cross_entropy(h, w, b, t, chunk_size=8, **kw)
    ref = reference(h64, w64, b64, t, reduction=reduction, a=0.9, b=0.1 / 50, z=1e-3)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=atol)
    for ours, theirs, p in zip(grads(loss, (h, w, b)), grads(ref, (h64, w64, b64)), (h, w, b)):
        assert ours.dtype == p.dtype
        torch.testing.assert_close(ours.double(), theirs, rtol=rtol, atol=atol)


def test_bf16_weight_gradient_accumulates_in_fp32():
    # 300 identical rows, one per chunk, add the same contribution 300 times to grad_weight. A bf16
    # running sum (8-bit mantissa) rounds each addition once its ulp nears the increment and ends
    # percents off (300 x 0.0123 sums to 4.0, not 3.69); an fp32 accumulator does not.
    # (The Triton path shares the fp32 accumulator; 300 interpreted launches are too slow to test.)
    n = 300
    h = torch.randn(1, D, dtype=torch.float64).expand(n, D).to(torch.bfloat16).contiguous().requires_grad_()
    w = (torch.randn(V, D, dtype=torch.float64) / math.sqrt(D)).to(torch.bfloat16).requires_grad_()
    t = torch.full((n,), 3)
    loss = fused_linear_cross_entropy(h, w, None, t, reduction="sum", label_smoothing=0.1,
                                      chunk_size=1)
    (gw,) = torch.autograd.grad(loss, w)
    w64 = w.detach().double().requires_grad_()
    ref = reference(h.detach().double(), w64, None, t, reduction="sum", a=0.9, b=0.1 / V)
    (gw_ref,) = torch.autograd.grad(ref, w64)
    assert gw.dtype == torch.bfloat16
    torch.testing.assert_close(gw.double(), gw_ref, rtol=2e-2, atol=1e-2 * gw_ref.abs().max().item())


def test_no_grad_returns_no_gradients():
    h, w, b, t = make()
    with torch.no_grad():
        out = torch.ops.smoothce.linear_cross_entropy(h, w, b, t, None, -100, "mean", 0.0, "all", 1.0, False,
                                                      0.0, None, 1.0, None, None, False, CHUNK)
        loss = fused_linear_cross_entropy(h, w, b, t, chunk_size=CHUNK)
    assert [x.numel() for x in out[2:]] == [0, 0, 0]
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w, b), t).detach())


def test_backward_without_compute_grad_raises():
    h, w, b, t = make()
    loss = torch.ops.smoothce.linear_cross_entropy(h, w, b, t, None, -100, "mean", 0.0, "all", 1.0, False, 0.0,
                                                   None, 1.0, None, None, False, CHUNK)[0]
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()


def test_out_of_range_label_raises_on_cpu():
    h, w, b, t = make()
    t[4] = V
    with pytest.raises(IndexError, match=f"target {V} is out of bounds for {V} classes"):
        fused_linear_cross_entropy(h, w, b, t)


# ---------------------------------------------------------------------------------------------------
# the Triton kernel of kernels/cross_entropy.py per chunk (the CUDA path), here through the interpreter
# ---------------------------------------------------------------------------------------------------
# (the op's keywords, the reference's general-form coefficients)
TRITON_CASES = {
    "smoothing": (dict(label_smoothing=0.1), dict(a=0.9, b=0.1 / V)),
    "weight_z_softcap": (dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0), dict(a=0.9, b=0.1 / V, z=1e-2, softcap=3.0)),
    "kl_scale": (dict(label_smoothing=0.2, kl=True, logit_scale=0.6), dict(a=0.8, b=0.2 / V, c=kl_constant(0.2), logit_scale=0.6)),
}


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("case", list(TRITON_CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_triton_chunks(monkeypatch, case, reduction, dtype, tol):
    import smoothce.kernels.cross_entropy_triton as ce_kernels

    monkeypatch.setenv("SMOOTHCE_KERNEL", "triton")
    launches = []
    launch = ce_kernels.launch_cross_entropy
    monkeypatch.setattr(ce_kernels, "launch_cross_entropy",
                        lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    words, p = TRITON_CASES[case]
    cw = torch.rand(V, dtype=torch.float64) + 0.5 if case == "weight_z_softcap" else None
    h, w, b, t = make(dtype=dtype, seed=7)
    p64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = reference(*p64, t, cw, reduction=reduction, **p)
    loss = fused_linear_cross_entropy(h, w, b, t, cw, reduction=reduction, chunk_size=CHUNK, **words)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    for ours, theirs, param in zip(grads(loss, (h, w, b)), grads(ref, p64), (h, w, b)):
        assert ours.dtype == param.dtype
        torch.testing.assert_close(ours.double(), theirs, rtol=tol, atol=tol)
    # one launch per chunk (13 rows in chunks of 4), twice for 'none' (its backward recomputes)
    assert len(launches) == 4 * (2 if reduction == "none" else 1)


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,error,match", [
    (dict(reduction="avg"), ValueError, "reduction='avg' is not one of 'none', 'sum', 'mean'"),
    (dict(hidden=torch.randn(N, D + 1)), ValueError, r"weight's D = 8: hidden \(13, 9\)"),
    (dict(weight=torch.randn(V)), ValueError, r"weight must have shape \(V, D\), got \(11,\)"),
    (dict(target=torch.zeros(N + 1, dtype=torch.long)), ValueError, r"target shape \(14,\) does not match .*\(13,\)"),
    (dict(target=torch.zeros(N, dtype=torch.int16)), TypeError, "target dtype torch.int16 is not supported"),
    (dict(weight=torch.randn(V, D, dtype=torch.float64)), TypeError, "weight dtype torch.float64"),
    (dict(hidden=torch.zeros(N, D, dtype=torch.long)), TypeError, "hidden dtype torch.int64 is not supported"),
    (dict(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \(11,\), got \(12,\)"),
    (dict(class_weight=torch.ones(3)), ValueError, r"class_weight must have shape \(11,\) \(one per class\), got \(3,\)"),
    (dict(z_loss=-1e-4), ValueError, "z_loss=-0.0001 must be >= 0"),
    (dict(softcap=0.0), ValueError, "softcap=0.0 must be None or > 0"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale=inf must be finite"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing=nan must be finite"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a number, got str '0.1'"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int or None, got 1.5"),
    (dict(chunk_size=0), ValueError, "chunk_size=0 must be a positive int or None"),
    (dict(uniform_rows=torch.ones(N, dtype=torch.bool), reduction="sum"), ValueError,
     "does not take uniform_rows yet"),
])
def test_validation(change, error, match):
    args = dict(hidden=torch.randn(N, D), weight=torch.randn(V, D), bias=None,
                target=torch.zeros(N, dtype=torch.long))
    kwargs = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(args["hidden"], args["weight"], args["bias"], args["target"], **kwargs)


# ---------------------------------------------------------------------------------------------------
# custom-op registration and torch.compile
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(reduction, bias):
    h, w, b, t = make(dtype=torch.float32, bias=bias)
    cw = torch.rand(V) + 0.5
    # ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss, softcap, logit_scale,
    # uniform_rows, loss_dtype, compute_grad, chunk_size
    args = (h, w, b, t, cw, -100, reduction, 0.1, "all", 1.0, False, 1e-3, 4.0, 1.0, None, None, True, CHUNK)
    torch.library.opcheck(torch.ops.smoothce.linear_cross_entropy.default, args)
    go = torch.rand(N)
    bw_args = (go, h.detach(), w.detach(), b if b is None else b.detach(), t, cw, -100, 0.1, "all", 1.0, False,
               1e-3, 4.0, 1.0, None, CHUNK)
    torch.library.opcheck(torch.ops.smoothce.linear_cross_entropy_backward.default, bw_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _compiled_step(backend, reduction, dynamic=None):
    def step(h, w, b, t):
        loss = fused_linear_cross_entropy(h, w, b, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=CHUNK)
        return loss

    return torch.compile(step, backend=backend, fullgraph=True, dynamic=dynamic)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_compile(backend, reduction):
    h, w, b, t = make(dtype=torch.float32)
    ref = fused_linear_cross_entropy(h, w, b, t, reduction=reduction, label_smoothing=0.1,
                                     z_loss=1e-3, chunk_size=CHUNK)
    loss = _compiled_step(backend, reduction)(h, w, b, t)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads(loss, (h, w, b)), grads(ref, (h, w, b))):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def _check_against_reference(loss, h, w, b, t, reduction, rtol=1e-5, atol=1e-5):
    p64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = reference(*p64, t, reduction=reduction, a=0.9, b=0.1 / V, z=1e-3)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=atol)
    for ours, theirs in zip(grads(loss, (h, w, b)), grads(ref, p64)):
        torch.testing.assert_close(ours.double(), theirs, rtol=rtol, atol=atol)


def test_compile_dynamic_shapes():
    step = _compiled_step("aot_eager", "none", dynamic=True)
    for n in (13, 21):
        h, w, b, t = make(dtype=torch.float32, n=n)
        loss = step(h, w, b, t)
        assert loss.shape == (n,)
        _check_against_reference(loss, h, w, b, t, "none")


@pytest.mark.inductor
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_inductor(reduction):
    h, w, b, t = make(dtype=torch.float32)
    loss = _compiled_step("inductor", reduction)(h, w, b, t)
    _check_against_reference(loss, h, w, b, t, reduction)
