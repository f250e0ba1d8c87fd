"""smoothce::linear_cross_entropy against eager PyTorch (F.linear + cross-entropy) in float64.

Most tests run both chunk loops (the ``device`` fixture): the torch one on CPU tensors, and the
Triton one on CUDA tensors where a GPU is, through the interpreter on CPU tensors where none is.
"""
import gc
import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.optests import OpCheckError

import triton_cpu
from reference import reference as logits_reference
from smoothce.kernels.cross_entropy import fused_cross_entropy
from smoothce.kernels.linear_cross_entropy import CHUNK_BYTES, chunk_rows, fused_linear_cross_entropy

N, D, V = 13, 8, 11  # 13 rows: not a multiple of the forced chunk sizes below
CHUNK = 4  # forced small chunk: 13 = 4 + 4 + 4 + 1


@pytest.fixture(params=["torch", "triton"])
def device(request, monkeypatch):
    """Where the op runs, by chunk loop: "torch" on CPU tensors; "triton" on CUDA tensors, or on CPU
    tensors through the interpreter (tests/conftest.py turns it on where there is no GPU). Fails the
    test if the Triton loop was asked for and did not launch its kernel. (Overrides conftest's
    ``device`` in this file: the op's tests also run the torch loop.)"""
    monkeypatch.setenv("SMOOTHCE_KERNEL", request.param)
    if request.param == "torch":
        yield torch.device("cpu")
        return
    triton_cpu.require("cuda" if torch.cuda.is_available() else "cpu")
    import smoothce.kernels.linear_cross_entropy_triton as triton_loop

    launches = []
    launch = triton_loop.launch_cross_entropy
    monkeypatch.setattr(triton_loop, "launch_cross_entropy",
                        lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    yield torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert launches, "the Triton chunk loop did not run"


def reference(h, w, bias, target, class_weight=None, **words):
    """LossForm's loss (tests/reference.py, from the op's own keywords) of the logits
    F.linear(h, w, bias), densely in float64."""
    return logits_reference(F.linear(h, w, bias), target, class_weight, **words)


def make(dtype=torch.float64, bias=True, ignore=True, seed=0, n=N, d=D, v=V, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3).to(device, dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[[1, 5, n - 1]] = -100  # one ignored row inside the last, ragged chunk too
    return h, w, b, t.to(device)


def class_weights(device, v=V, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(v, generator=g, dtype=torch.float64) + 0.5).to(device)


def as_reference(*tensors):
    """float64 CPU copies that require grad (None stays None)."""
    return [None if t is None else t.detach().cpu().double().requires_grad_() for t in tensors]


def grads(loss, params, seed=1):
    """Gradients for a random, non-unit grad_output (per row for reduction='none')."""
    g = torch.Generator().manual_seed(seed)
    go = (torch.rand(loss.shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(loss.device, loss.dtype)
    return torch.autograd.grad(loss, [p for p in params if p is not None], go)


def float64_tolerance() -> dict:
    """rtol / atol of the op in float64 against a float64 reference. The Triton kernel takes its
    constants (a, b, c, z_loss, softcap, logit_scale) as fp32 scalars, so in float64 it agrees to
    about 1e-7 relative; the torch loop to rounding."""
    if os.environ.get("SMOOTHCE_KERNEL") == "triton":
        return dict(rtol=1e-6, atol=1e-8)
    return dict(rtol=1e-10, atol=1e-12)


def assert_same(h, w, b, t, kwargs_ours, ref_fn, rtol=None, atol=None):
    """The op on (h, w, b, t) against ``ref_fn(h, w, b, t)`` on float64 CPU copies: the loss, its
    dtype, and the gradients for a random grad_output. Tolerances default to float64_tolerance()."""
    if rtol is None:
        rtol, atol = float64_tolerance().values()
    p64 = as_reference(h, w, b)
    loss_ref = ref_fn(*p64, t.cpu())
    loss = fused_linear_cross_entropy(h, w, b, t, **kwargs_ours)
    assert loss.shape == loss_ref.shape and loss.dtype == (kwargs_ours.get("loss_dtype") or h.dtype)
    torch.testing.assert_close(loss.detach().cpu().double(), loss_ref.detach(), rtol=rtol, atol=atol)
    params = [p for p in (h, w, b) if p is not None]
    for ours, ref, p in zip(grads(loss, params), grads(loss_ref, [p for p in p64 if p is not None]), params):
        assert ours.dtype == p.dtype and ours.device == p.device
        torch.testing.assert_close(ours.cpu().double(), ref, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# against F.cross_entropy itself
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_cross_entropy(device, reduction, eps, weighted, bias):
    h, w, b, t = make(bias=bias, device=device)
    cw = class_weights(device) if weighted else None
    cw64 = None if cw is None else cw.cpu()

    def ref(h, w, b, t):
        return F.cross_entropy(F.linear(h, w, b), t, weight=cw64, reduction=reduction, label_smoothing=eps)

    ours = dict(class_weight=cw, reduction=reduction, label_smoothing=eps, chunk_size=CHUNK)
    assert_same(h, w, b, t, ours, ref)


# ---------------------------------------------------------------------------------------------------
# LossForm's keywords: smoothing conventions, KL, scale, z-loss, softcap, logit_scale
# ---------------------------------------------------------------------------------------------------
EPS = 0.1

# every keyword of LossForm, alone or combined
CASES = {
    "eps_over_v_minus_1": dict(label_smoothing=EPS, smoothing="others"),  # eps over the other V - 1 classes
    "kl": dict(label_smoothing=EPS, kl=True),  # KL divergence to the smoothed distribution
    "kl_others_scaled": dict(label_smoothing=0.2, smoothing="others", kl=True, scale=0.5),
    "z_loss": dict(label_smoothing=EPS, z_loss=1e-2),
    "softcap": dict(label_smoothing=EPS, softcap=2.5),
    "softcap_z_scale": dict(z_loss=0.1, softcap=3.0, logit_scale=0.7),
    "logit_scale": dict(label_smoothing=EPS, logit_scale=1.7),
    "uniform_only": dict(label_smoothing=1.0),
    "scaled": dict(label_smoothing=EPS, scale=0.5),
}


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_forms(device, case, reduction, weighted):
    words = CASES[case]
    h, w, b, t = make(seed=3, device=device)
    cw = class_weights(device) if weighted else None
    cw64 = None if cw is None else cw.cpu()
    ours = dict(class_weight=cw, reduction=reduction, chunk_size=CHUNK, **words)
    assert_same(h, w, b, t, ours, lambda h, w, b, t: reference(h, w, b, t, cw64, reduction=reduction, **words))


def test_return_z_loss(device):
    h, w, b, t = make(device=device)
    h64, w64, b64 = as_reference(h, w, b)
    for reduction in ("none", "mean"):
        loss, z_term = fused_linear_cross_entropy(h, w, b, t, reduction=reduction, z_loss=0.05,
                                                  return_z_loss=True, chunk_size=CHUNK)
        ref_z = reference(h64, w64, b64, t.cpu(), reduction=reduction, scale=0.0, z_loss=0.05)
        torch.testing.assert_close(z_term.cpu(), ref_z.detach(), **float64_tolerance())
        assert not z_term.requires_grad
        ref = reference(h64, w64, b64, t.cpu(), reduction=reduction, z_loss=0.05)
        torch.testing.assert_close(loss.detach().cpu(), ref.detach(), **float64_tolerance())


# ---------------------------------------------------------------------------------------------------
# chunking
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5, N - 1, N, N + 3, None])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_chunk_boundaries(device, chunk, reduction):
    h, w, b, t = make(seed=4, device=device)
    ours = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=chunk)
    assert_same(h, w, b, t, ours,
                lambda h, w, b, t: reference(h, w, b, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3))


@pytest.mark.parametrize("block_rows", [1, 3])
def test_cache_block_boundaries(monkeypatch, block_rows):
    # The torch loop's elementwise blocks inside a chunk (with a softcap): 3 rows per block splits a
    # 5-row chunk 3 + 2.
    import smoothce.kernels.linear_cross_entropy_torch as torch_loop

    monkeypatch.setattr(torch_loop, "_CE_BLOCK_ELEMENTS", block_rows * V)
    h, w, b, t = make(seed=6)
    cw = class_weights("cpu")
    for reduction in ("none", "mean"):
        ours = dict(class_weight=cw, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
                    chunk_size=5)
        assert_same(h, w, b, t, ours, lambda h, w, b, t: reference(
            h, w, b, t, cw, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=4.0))


def test_chunk_rows_rule():
    # At most D rows (chunk logits no larger than the weight gradient) and at most CHUNK_BYTES of
    # them, at least about 2^20 logits per chunk, a multiple of 8, <= N.
    assert chunk_rows(16384, 131072, 4096, 2) == 896  # an LM head in bf16: the byte budget binds
    assert 896 * 131072 * 2 <= CHUNK_BYTES < 904 * 131072 * 2
    assert chunk_rows(8192, 128256, 2048, 2) == 912  # 915.7 rows fit, rounded down to 8
    assert chunk_rows(4096, 32768, 256, 4) == 256  # fp32 on CPU: D binds
    assert chunk_rows(100, 50000, 4096, 4) == 100
    assert chunk_rows(4096, 100000, 250, 4) == 248
    assert chunk_rows(4096, 1000, 250, 4) == 1048  # 2^20 / 1000 = 1048.6 rows
    assert chunk_rows(4096, 1000, 3, 4) == 1048
    assert chunk_rows(1024, 1024, 64, 4) == 1024  # a small head is one chunk
    assert chunk_rows(4096, 8, 3, 4) == 4096


# ---------------------------------------------------------------------------------------------------
# edge cases, dtypes, autograd composition
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_all_ignored_mean_is_nan_with_zero_grad(device, eps):
    h, w, b, t = make(device=device)
    t[:] = -100
    loss = fused_linear_cross_entropy(h, w, b, t, label_smoothing=eps, chunk_size=CHUNK)
    ref = F.cross_entropy(F.linear(h, w, b), t, label_smoothing=eps)
    assert torch.isnan(loss) and torch.isnan(ref)
    for ours, theirs in zip(torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(ours, theirs)
        assert not ours.abs().sum()


def test_custom_ignore_index_and_int32_target(device):
    h, w, b, t = make(ignore=False, device=device)
    t[[0, 7]] = 3
    ours = dict(ignore_index=3, label_smoothing=0.1, chunk_size=CHUNK)
    assert_same(h, w, b, t.int(), ours, lambda h, w, b, t: F.cross_entropy(
        F.linear(h, w, b), t.long(), ignore_index=3, label_smoothing=0.1))


def test_no_ignore_index(device):
    # ignore_index=None: -100 is an ordinary (out-of-range) label, every in-range row counts.
    h, w, b, t = make(ignore=False, device=device)
    assert_same(h, w, b, t, dict(ignore_index=None, label_smoothing=0.1, reduction="sum", chunk_size=CHUNK),
                lambda h, w, b, t: F.cross_entropy(F.linear(h, w, b), t, ignore_index=-1000, label_smoothing=0.1,
                                                   reduction="sum"))
    if device.type == "cpu":  # elsewhere a bad label poisons the loss with nan instead (no host sync)
        t[2] = -100
        with pytest.raises(IndexError, match="target -100 is out of bounds"):
            fused_linear_cross_entropy(h, w, b, t, ignore_index=None)


def test_loss_dtype(device):
    # The loss in the dtype the user's code produced: an upcast bf16 head, F.cross_entropy(F.linear(h,
    # W, b).float(), y), returns float32, with the value of that code: both loops take F.linear's
    # bf16 logits, so they agree with it to float32 rounding, while the float64 loss of the exact
    # logits is a bf16 rounding away (about 1e-4 relative here).
    h, w, b, t = make(dtype=torch.bfloat16, device=device)
    loss = fused_linear_cross_entropy(h, w, b, t, label_smoothing=0.1, loss_dtype=torch.float32, chunk_size=CHUNK)
    assert loss.dtype == torch.float32
    user = F.cross_entropy(F.linear(h, w, b).float(), t, label_smoothing=0.1)
    exact = F.cross_entropy(F.linear(*[x.double() for x in (h, w, b)]), t, label_smoothing=0.1)
    torch.testing.assert_close(loss, user, rtol=2e-6, atol=2e-6)
    assert abs(loss.double() - exact) > 10 * abs(loss - user)  # the rounding of the logits counts


def test_leading_dims_reduction_none(device):
    h, w, b, t = make(n=12, device=device)
    h3 = h.detach().view(3, 4, D).requires_grad_()
    t3 = t.view(3, 4)
    loss = fused_linear_cross_entropy(h3, w, b, t3, reduction="none", label_smoothing=0.1,
                                      chunk_size=5)
    assert loss.shape == (3, 4)
    ref = F.cross_entropy(F.linear(h3, w, b).transpose(1, 2), t3, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, **float64_tolerance())
    for ours, theirs in zip(grads(loss, (h3, w, b)), grads(ref, (h3, w, b))):
        torch.testing.assert_close(ours, theirs, **float64_tolerance())


def test_tied_embedding_accumulates_both_uses(device):
    # An embedding and an LM head sharing one weight: autograd sums the embedding's scatter gradient and
    # the op's grad_weight.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, D, dtype=torch.float64, device=device)
    tokens = torch.randint(0, V, (2, 7), device=device)
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
    torch.testing.assert_close(ours, ref, **float64_tolerance())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_low_precision(device, dtype, tol, reduction):
    # Reference: the same rounded inputs in float64. Gradients keep their dtype; errors are measured
    # against each result's largest entry ('none' with grad_output ~1.5 per row has gradients 50x
    # those of 'mean'): bf16 is 8 bits, and the Triton loop rounds grad_weight once per chunk.
    h, w, b, t = make(dtype=dtype, n=40, d=16, v=50, device=device)
    h64, w64, b64 = as_reference(h, w, b)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    loss = fused_linear_cross_entropy(h, w, b, t, chunk_size=8, **kw)
    ref = reference(h64, w64, b64, t.cpu(), **kw)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=tol, atol=tol * ref.abs().max().item())
    for ours, theirs, p in zip(grads(loss, (h, w, b)), grads(ref, (h64, w64, b64)), (h, w, b)):
        assert ours.dtype == p.dtype
        torch.testing.assert_close(ours.cpu().double(), theirs, rtol=tol, atol=tol * theirs.abs().max().item())


def test_torch_loop_accumulates_half_precision_weight_gradient_in_fp32():
    # The torch loop (CPU) sums grad_weight in fp32 whatever the weight's dtype. 300 identical rows,
    # one per chunk, add the same contribution 300 times: a bf16 running sum (8-bit mantissa) rounds
    # each addition once its ulp nears the increment and ends percents off (300 x 0.0123 sums to 4.0,
    # not 3.69); an fp32 accumulator does not.
    n = 300
    h = torch.randn(1, D, dtype=torch.float64).expand(n, D).to(torch.bfloat16).contiguous().requires_grad_()
    w = (torch.randn(V, D, dtype=torch.float64) / math.sqrt(D)).to(torch.bfloat16).requires_grad_()
    t = torch.full((n,), 3)
    loss = fused_linear_cross_entropy(h, w, None, t, reduction="sum", label_smoothing=0.1,
                                      chunk_size=1)
    (gw,) = torch.autograd.grad(loss, w)
    w64 = w.detach().double().requires_grad_()
    ref = reference(h.detach().double(), w64, None, t, reduction="sum", label_smoothing=0.1)
    (gw_ref,) = torch.autograd.grad(ref, w64)
    assert gw.dtype == torch.bfloat16
    torch.testing.assert_close(gw.double(), gw_ref, rtol=2e-2, atol=1e-2 * gw_ref.abs().max().item())


@pytest.mark.parametrize("chunks", [1, 4, 16])
def test_triton_loop_weight_gradient_error_bound(chunks):
    # The Triton loop accumulates grad_weight in its own bf16 buffer, one rounding per chunk (see
    # kernels/linear_cross_entropy_triton.py): |error| <= u sum_k |S_k| over the running sums S_k,
    # u = 2^-8, plus the rounding of the chunk gradient g itself to bf16 (u sum_i |g_i h_i|).
    # Identical rows make every chunk add the same P, so S_k = k P and the accumulation's share of
    # the bound is u P K (K + 1) / 2: at 16 chunks 8.5 times a single rounding. Checked against
    # float64 sums of the kernel's own bf16 chunk gradients, so only the accumulation is measured.
    triton_cpu.require("cuda" if torch.cuda.is_available() else "cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import smoothce.kernels.linear_cross_entropy_triton as triton_loop

    n, d, v = 64, 32, 24
    rows = n // chunks
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, d, generator=g, dtype=torch.float64).expand(n, d).to(device, torch.bfloat16).contiguous()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(device, torch.bfloat16)
    t = torch.full((n,), 3, device=device)
    chunk_grads = []
    launch = triton_loop.launch_cross_entropy

    def spy(x3, *args, **kwargs):
        launch(x3, *args, **kwargs)
        chunk_grads.append(x3[:, :, 0].double().cpu())  # g of this chunk, as the GEMMs will read it

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOOTHCE_KERNEL", "triton")
        mp.setattr(triton_loop, "launch_cross_entropy", spy)
        (gw,) = torch.autograd.grad(fused_linear_cross_entropy(
            h.requires_grad_(), w.requires_grad_(), None, t, reduction="sum", label_smoothing=0.1,
            chunk_size=rows), w)
    assert gw.dtype == torch.bfloat16 and len(chunk_grads) == chunks
    h64 = h.detach().double().cpu()
    contributions = [gk.t() @ h64[:rows] for gk in chunk_grads]  # P_k in float64
    running = torch.stack(contributions).cumsum(0)  # S_k
    u = 2.0 ** -8
    bound = u * running.abs().sum(0) * 1.01 + 1e-6 * running[-1].abs()
    err = (gw.double().cpu() - running[-1]).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g}"
    # and the bound is not vacuous: far below the size of the gradient itself
    assert bound.max() < 0.06 * running[-1].abs().max()


def test_gradients_are_the_stored_buffers(device):
    # Eager backward scales the stored gradients in place and autograd keeps them as .grad: no
    # second (V, D) or (N, D) buffer.
    h, w, b, t = make(dtype=torch.float32, device=device)

    def op():
        return torch.ops.smoothce.linear_cross_entropy(h, w, b, t, None, -100, "mean", 0.1, "all", 1.0, False,
                                                       0.0, None, 1.0, None, None, True, CHUNK)

    out = op()
    loss, stored = out[0], [x.data_ptr() for x in out[2:5]]
    del out
    (loss * 3.0).backward()
    assert [p.grad.data_ptr() for p in (h, w, b)] == stored
    # A second backward through the same graph raises instead of scaling the gradients twice.
    loss = op()[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_eager_backward_changes_what_the_op_returned():
    # The contract this op does not keep (README, "The op"): the gradients it returns for an
    # incoming gradient of 1 are scaled in place by eager backward, so after a backward with any
    # other incoming gradient they hold the scaled ones. opcheck sees it only when the loss it
    # backpropagates through is negative (its cotangent is the sign of the loss's sum), here
    # through scale=-1; test_opcheck's positive losses pass.
    h, w, b, t = make(dtype=torch.float32)
    args = [h, w, b, t, None, -100, "mean", 0.1, "all", 1.0, False, 1e-3, None, 1.0, None, None, True, CHUNK]
    out = torch.ops.smoothce.linear_cross_entropy(*args)
    returned = [g.clone() for g in out[2:5]]
    (out[0] * -2.0).backward()
    for now, before in zip(out[2:5], returned):
        torch.testing.assert_close(now, -2.0 * before, rtol=0, atol=0)
    args[9] = -1.0  # scale
    with pytest.raises(OpCheckError, match="test_aot_dispatch_dynamic"):
        torch.library.opcheck(torch.ops.smoothce.linear_cross_entropy.default, tuple(args))


def step_peak_bytes(step, device) -> int:
    """Peak bytes allocated while ``step`` runs, above what was allocated before it: the CUDA
    caching allocator's counters on a GPU (smoothce.compiler.measure); on CPU the allocator's records (every
    allocation and free, timed) as the profiler keeps them, which need no fresh process."""
    if device.type == "cuda":
        from smoothce.compiler.measure.memory import peak_cuda

        return peak_cuda(step)
    gc.collect()  # what is garbage now must not be freed, unrecorded, inside the profile
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        step()
    # at equal times, allocations before frees: never under the true peak
    records = sorted((e.start_ns(), -e.nbytes()) for e in prof.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, freed in records:
        live -= freed
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("bias", [False, True])
def test_step_holds_one_chunk_above_its_gradients(device, reduction, bias):
    # A training step (forward and backward) holds the gradients it returns, one chunk of logits and
    # per-row vectors: no full-size logits, no (V, D) accumulator or copy, no second gradient buffer
    # in backward (the stored gradients are scaled in place and become .grad).
    n, d, v, rows = 32, 32, 2048, 8  # fp32: logits 256 KiB, grad_weight 256 KiB, one chunk 64 KiB
    h, w, b, t = make(dtype=torch.float32, n=n, d=d, v=v, bias=bias, device=device)
    go = torch.rand(n, device=device) if reduction == "none" else torch.tensor(0.5, device=device)

    def step():
        loss = fused_linear_cross_entropy(h, w, b, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                                          chunk_size=rows)
        if device.type == "cpu":
            gc.collect()  # the Triton interpreter keeps a launch's tensors in a reference cycle
        loss.backward(go)

    step()  # warm up (kernel caches, allocator)
    h.grad = w.grad = None
    if b is not None:
        b.grad = None
    peak = step_peak_bytes(step, device)
    gradients = 4 * (v * d + n * d + (v if bias else 0))
    chunk = 4 * rows * v
    # labels and per-row results, per-class bias sums; CUDA's allocator rounds each tensor to 512 B
    vectors = 128 * n + 8 * v + (32 * 512 if device.type == "cuda" else 0)
    assert gradients + chunk <= peak <= gradients + chunk + vectors


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,error,match", [
    (dict(reduction="avg"), ValueError, "reduction='avg' is not one of 'none', 'sum', 'mean'"),
    (dict(hidden=torch.zeros(N, D + 1)), ValueError, r"weight's D = 8: hidden \(13, 9\)"),
    (dict(weight=torch.zeros(V)), ValueError, r"weight must have shape \(V, D\), got \(11,\)"),
    (dict(target=torch.zeros(N + 1, dtype=torch.long)), ValueError, r"target shape \(14,\) does not match .*\(13,\)"),
    (dict(target=torch.zeros(N, dtype=torch.int16)), TypeError, "target dtype torch.int16 is not supported"),
    (dict(weight=torch.zeros(V, D, dtype=torch.float64)), TypeError, "weight dtype torch.float64"),
    (dict(hidden=torch.zeros(N, D, dtype=torch.long)), TypeError, "hidden dtype torch.int64 is not supported"),
    (dict(bias=torch.zeros(V + 1)), ValueError, r"bias must have shape \(11,\), got \(12,\)"),
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


def test_takes_the_keywords_of_fused_cross_entropy():
    # README: the same keywords, with the same defaults, and chunk_size; uniform_rows raises (above),
    # process_group is tests/test_linear_vocab_parallel.py's
    def keywords(fn):
        return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY}

    assert keywords(fused_linear_cross_entropy) == keywords(fused_cross_entropy) | {"chunk_size": None}


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


def _check_against_reference(loss, h, w, b, t, reduction, rtol=1e-5, atol=1e-5):
    p64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = reference(*p64, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=atol)
    for ours, theirs in zip(grads(loss, (h, w, b)), grads(ref, p64)):
        torch.testing.assert_close(ours.double(), theirs, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_compile(backend, reduction):
    h, w, b, t = make(dtype=torch.float32)
    loss = _compiled_step(backend, reduction)(h, w, b, t)
    _check_against_reference(loss, h, w, b, t, reduction)


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


@pytest.mark.inductor
def test_inductor_scales_gradients_in_place():
    # Backward's scaling of the stored gradients by grad_output: the saved buffers are donated to
    # backward and Inductor writes the product over them, allocating nothing.
    from torch._inductor.utils import run_and_get_code

    h, w, b, t = make(dtype=torch.bfloat16, bias=False, n=64, d=16, v=40)
    step = torch.compile(lambda h, w, t: fused_linear_cross_entropy(h, w, None, t, label_smoothing=0.1,
                                                                    loss_dtype=torch.float32))

    def run():
        step(h, w, t).backward()

    _, codes = run_and_get_code(run)
    call = codes[-1][codes[-1].index("def call("):]
    call = call[:call.index("return")]
    assert "# reuse" in call and "empty_strided" not in call, call
    ref = as_reference(h, w)
    loss_ref = reference(ref[0], ref[1], None, t, label_smoothing=0.1)
    loss_ref.backward()
    for ours, theirs in zip((h.grad, w.grad), (ref[0].grad, ref[1].grad)):
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_a_label_whose_probability_underflows(device, eps):
    # A confidently wrong row: its label's probability underflows float32 (exp(-500)), so the CPU
    # loop's lse = x_y - log p_y would be inf; the loss and its gradient are still exact.
    h, w, b, t = make(dtype=torch.float32, device=device)
    with torch.no_grad():
        h[0] *= 60.0
        logits = F.linear(h, w, b)
        t[0] = logits[0].argmin()
        assert (logits[0].max() - logits[0].min()).item() > 500
    loss = fused_linear_cross_entropy(h, w, b, t, label_smoothing=eps, reduction="sum", chunk_size=CHUNK)
    ref_h, ref_w, ref_b = as_reference(h, w, b)
    ref = reference(ref_h, ref_w, ref_b, t.cpu(), label_smoothing=eps, reduction="sum")
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-3)
    for ours, theirs in zip(grads(loss, (h, w, b)), grads(ref, (ref_h, ref_w, ref_b))):
        torch.testing.assert_close(ours.double().cpu(), theirs, rtol=1e-4, atol=1e-3)
