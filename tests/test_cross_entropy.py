"""smoothce.cross_entropy and fused_cross_entropy (smoothce::cross_entropy_stats and
smoothce::cross_entropy_grad) against eager PyTorch in float64, on both paths.

"triton" runs the Triton kernels (on CUDA, or through the interpreter on CPU), "torch" the torch
implementation; both must agree with F.cross_entropy and with LossForm's loss written out in
float64 (tests/reference.py). Tensors live on the device fixture's device; the kernels' variants
and the GPU grid are in tests/test_cross_entropy_kernels.py.
"""

import pytest
import torch
import torch.nn.functional as F
import triton_cpu
from logits_access import RecordOps, accesses
from reference import reference

import smoothce
from smoothce.kernels.cross_entropy import fused_cross_entropy

PATHS = ["torch", "triton"]

# Tolerances against the float64 reference, by input dtype: fp32 math, the result rounded once.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}


def _use(path, device, monkeypatch):
    if path == "triton":
        triton_cpu.require(device)
    monkeypatch.setenv("SMOOTHCE_KERNEL", path)
    return device


@pytest.fixture(params=PATHS)
def path(request, device, monkeypatch):
    """The device the test runs on, with SMOOTHCE_KERNEL set to the path."""
    return _use(request.param, device, monkeypatch)


@pytest.fixture(params=PATHS)
def cpu_path(request, monkeypatch):
    """Both paths on CPU tensors: behaviour only the CPU has (errors that need a data check)."""
    return _use(request.param, "cpu", monkeypatch)


def check(out, ref, grads, ref_grads, dtype):
    tol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **tol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        # Gradients are O(1/N) for 'mean': scale atol to the reference's size.
        torch.testing.assert_close(g.double(), r, atol=tol["atol"] * max(1.0, r.abs().max().item()), rtol=tol["rtol"])


def _float64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def run_pair(fn, ref_fn, x, *args, device="cpu", grad_output=None):
    """fn(x, *args) on ``device`` and ref_fn in float64 on the CPU, with their gradients for one
    grad_output (random unless given); results on the CPU."""
    xd = x.detach().to(device).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    out = fn(xd, *[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
    ref = ref_fn(x64, *[_float64(a) for a in args])
    go = torch.randn(ref.shape, dtype=torch.float64) if grad_output is None else grad_output
    (g,) = torch.autograd.grad(out, xd, go.to(device, out.dtype))
    (gr,) = torch.autograd.grad(ref, x64, go)
    return out.detach().cpu(), ref, g.cpu(), gr


# ----------------------------------------------------------------------------------------------
# The grid against F.cross_entropy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_f_cross_entropy(path, reduction, eps, weighted):
    torch.manual_seed(0)
    N, C = 9, 37  # C not a power of two: the last block is partial
    x = torch.randn(N, C) * 3
    y = torch.randint(0, C, (N,))
    y[[1, 5]] = -100
    w = torch.rand(C) + 0.25 if weighted else None
    out, ref, g, gr = run_pair(
        lambda t, y, w: smoothce.cross_entropy(t, y, w, reduction=reduction, label_smoothing=eps),
        lambda t, y, w: F.cross_entropy(t, y, w, reduction=reduction, label_smoothing=eps),
        x, y, w, device=path,
    )
    check(out, ref, [g], [gr], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(path, dtype):
    torch.manual_seed(1)
    x = (torch.randn(6, 50) * 2).to(dtype)
    y = torch.randint(0, 50, (6,))
    out, ref, g, gr = run_pair(
        lambda t, y: smoothce.cross_entropy(t, y, label_smoothing=0.1),
        lambda t, y: F.cross_entropy(t, y, label_smoothing=0.1),
        x, y, device=path, grad_output=torch.tensor(1.0, dtype=torch.float64),
    )
    check(out, ref, [g], [gr], dtype)


def test_float64_is_exact(device):
    torch.manual_seed(2)
    x = torch.randn(5, 13, dtype=torch.float64)
    y = torch.randint(0, 13, (5,))
    out, ref, g, gr = run_pair(
        lambda t, y: smoothce.cross_entropy(t, y, label_smoothing=0.2, reduction="sum"),
        lambda t, y: F.cross_entropy(t, y, label_smoothing=0.2, reduction="sum"),
        x, y, device=device,
    )
    check(out, ref, [g], [gr], torch.float64)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 7),  # N = 1
        (3, 4099),  # just past one 4096-wide block: two loop iterations, a 3-wide tail
        (2, 262144),  # LLM vocabulary: 64 blocks per row
    ],
)
def test_shapes(path, shape):
    torch.manual_seed(3)
    N, C = shape
    x = torch.randn(N, C) * 4
    y = torch.randint(0, C, (N,))
    out, ref, g, gr = run_pair(
        lambda t, y: smoothce.cross_entropy(t, y, label_smoothing=0.1, reduction="none"),
        lambda t, y: F.cross_entropy(t, y, label_smoothing=0.1, reduction="none"),
        x, y, device=path,
    )
    check(out, ref, [g], [gr], torch.float32)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_k_dim_input(path, reduction):
    # (N, C, d1, d2): segmentation-style input, class dim 1, non-contiguous labels.
    torch.manual_seed(4)
    x = torch.randn(2, 5, 3, 4)
    y = torch.randint(0, 5, (2, 4, 3)).transpose(1, 2)
    y[0, 1, 2] = -100
    w = torch.rand(5) + 0.5
    out, ref, g, gr = run_pair(
        lambda t, y, w: smoothce.cross_entropy(t, y, w, ignore_index=-100, reduction=reduction, label_smoothing=0.3),
        lambda t, y, w: F.cross_entropy(t, y, w, ignore_index=-100, reduction=reduction, label_smoothing=0.3),
        x, y, w, device=path,
    )
    assert out.shape == (() if reduction == "mean" else y.shape)
    check(out, ref, [g], [gr], torch.float32)


def test_non_contiguous_logits(path):
    torch.manual_seed(5)
    x = torch.randn(19, 8).t()  # (8, 19) with column-major strides
    y = torch.randint(0, 19, (8,))
    out, ref, g, gr = run_pair(
        lambda t, y: smoothce.cross_entropy(t, y, label_smoothing=0.05),
        lambda t, y: F.cross_entropy(t, y, label_smoothing=0.05),
        x, y, device=path,
    )
    check(out, ref, [g], [gr], torch.float32)


def test_unbatched_input(path):
    x = torch.randn(10)
    y = torch.tensor(3)
    for reduction in ("none", "mean"):
        out, ref, g, gr = run_pair(
            lambda t, y: smoothce.cross_entropy(t, y, reduction=reduction, label_smoothing=0.1),
            lambda t, y: F.cross_entropy(t, y, reduction=reduction, label_smoothing=0.1),
            x, y, device=path,
        )
        assert out.shape == ref.shape == ()
        check(out, ref, [g], [gr], torch.float32)


# The interpreter evaluates both sides of a tl.where: the masked 1 / 0 scale warns in numpy.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")
def test_all_rows_ignored_mean_is_nan(path):
    x = torch.randn(3, 6, device=path, requires_grad=True)
    y = torch.full((3,), -100, device=path)
    out = smoothce.cross_entropy(x, y, label_smoothing=0.1)
    ref = F.cross_entropy(x, y, label_smoothing=0.1)
    assert out.isnan() and ref.isnan()
    (g,) = torch.autograd.grad(out, x)
    (gr,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g, gr, equal_nan=True)
    assert smoothce.cross_entropy(x, y, reduction="sum").item() == 0.0


# ----------------------------------------------------------------------------------------------
# The general form: a, b, c, z-loss, softcap
# ----------------------------------------------------------------------------------------------


FORMS = {
    "pytorch": dict(label_smoothing=0.1),  # F.cross_entropy(label_smoothing=): eps / V
    "others": dict(label_smoothing=0.1, smoothing="others"),  # eps / (V - 1) on the other classes
    "kl": dict(label_smoothing=0.1, smoothing="others", kl=True),  # KL divergence to that distribution
    "kl_uniform": dict(label_smoothing=1.0, kl=True),  # KL to the uniform distribution
    "scaled": dict(label_smoothing=0.3, scale=0.5),  # 0.5 * loss
    "unnormalised": dict(label_smoothing=0.55, scale=1.55),  # a mix whose mass is not 1
    "temperature": dict(label_smoothing=0.1, logit_scale=0.4),  # x / 2.5 before the loss
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_loss_forms(path, form, reduction):
    torch.manual_seed(6)
    x = torch.randn(8, 17)
    y = torch.randint(0, 17, (8,))
    y[3] = 2  # duplicate labels are fine
    y[6] = -1
    w = torch.rand(17) + 0.1
    kwargs = dict(ignore_index=-1, reduction=reduction, **FORMS[form])
    out, ref, g, gr = run_pair(
        lambda t, y, w: fused_cross_entropy(t, y, w, **kwargs),
        lambda t, y, w: reference(t, y, w, **kwargs),
        x, y, w, device=path,
    )
    check(out, ref, [g], [gr], torch.float32)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_z_loss(path, reduction, weighted):
    torch.manual_seed(7)
    x = torch.randn(7, 23) * 3
    y = torch.randint(0, 23, (7,))
    y[0] = -100
    w = torch.rand(23) + 0.5 if weighted else None
    x_ = x.detach().to(path).requires_grad_(True)
    wd = w.to(path) if w is not None else None
    loss, z = smoothce.cross_entropy(x_, y.to(path), wd, reduction=reduction, label_smoothing=0.1, z_loss=1e-2,
                                     return_z_loss=True)
    ref_z = reference(x.double(), y, w, reduction=reduction, scale=0.0, z_loss=1e-2)
    torch.testing.assert_close(z.double().cpu(), ref_z, **TOL[torch.float32])
    out, refo, g, gr = run_pair(
        lambda t, y, w: smoothce.cross_entropy(t, y, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2),
        lambda t, y, w: reference(t, y, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2),
        x, y, w, device=path,
    )
    check(out, refo, [g], [gr], torch.float32)
    assert not z.requires_grad


@pytest.mark.parametrize("cap", [0.7, 30.0])
def test_softcap(path, cap):
    torch.manual_seed(8)
    x = torch.randn(5, 29) * 5
    y = torch.randint(0, 29, (5,))
    out, ref, g, gr = run_pair(
        lambda t, y: smoothce.cross_entropy(t, y, label_smoothing=0.1, softcap=cap, z_loss=1e-3, reduction="none"),
        lambda t, y: reference(t, y, reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=cap),
        x, y, device=path,
    )
    check(out, ref, [g], [gr], torch.float32)
    torch.testing.assert_close(
        smoothce.cross_entropy(x.to(path), y.to(path), softcap=cap).double().cpu(),
        F.cross_entropy(cap * torch.tanh(x.double() / cap), y),
        **TOL[torch.float32],
    )


# ----------------------------------------------------------------------------------------------
# What the detector's spellings need: no ignore_index, separate smoothing rows, the loss's dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_ignore_index(path, reduction):
    # A hand-written gather NLL has no ignored label: -100 is not special, every row counts.
    torch.manual_seed(13)
    x = torch.randn(6, 11)
    y = torch.randint(0, 11, (6,))
    kwargs = dict(ignore_index=None, reduction=reduction, label_smoothing=0.2, z_loss=1e-2)
    out, ref, g, gr = run_pair(lambda t, y: fused_cross_entropy(t, y, **kwargs),
                               lambda t, y: reference(t, y, **kwargs), x, y, device=path)
    check(out, ref, [g], [gr], torch.float32)


def test_no_ignore_index_checks_every_label_on_cpu(cpu_path):
    with pytest.raises(IndexError, match="target -100 is out of bounds for 11 classes .*no ignore_index"):
        fused_cross_entropy(torch.randn(6, 11), torch.tensor([0, -100, 1, 2, 3, 4]), ignore_index=None)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_uniform_rows(path, reduction, weighted):
    # nll_loss(reduction='none') masks the label term with ignore_index -100; a hand-written
    # uniform term next to it counts on the rows of its own mask. 'mean' divides each term by its
    # own rows (the seed formula: nll_loss's mean next to a smoothing term averaged over every row).
    torch.manual_seed(14)
    x = torch.randn(2, 9, 4)  # class dim 1, K-dim rows
    y = torch.randint(0, 9, (2, 4))
    y[0, 1] = y[1, 3] = -100
    uniform = torch.rand(2, 4) > 0.4
    uniform[0, 1] = True  # an ignored label whose uniform term still counts
    w = torch.rand(9) + 0.5 if weighted else None
    kwargs = dict(reduction=reduction, label_smoothing=0.3, smoothing="others", z_loss=1e-2)
    out, ref, g, gr = run_pair(lambda t, y, w, u: fused_cross_entropy(t, y, w, uniform_rows=u, **kwargs),
                               lambda t, y, w, u: reference(t, y, w, uniform_rows=u, **kwargs), x, y, w, uniform,
                               device=path)
    check(out, ref, [g], [gr], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_dtype(path, dtype):
    # F.cross_entropy(x.float(), y) with 16-bit x: the op reads x as it is, returns the float32
    # loss the user's code produced, and writes the gradient once in x's dtype.
    torch.manual_seed(15)
    x = (torch.randn(7, 40) * 3).to(dtype).to(path)
    y = torch.randint(0, 40, (7,)).to(path)
    y[2] = -100
    x.requires_grad_(True)
    out = fused_cross_entropy(x, y, label_smoothing=0.1, loss_dtype=torch.float32)
    (g,) = torch.autograd.grad(out, x)
    x64 = x.detach().double().cpu().requires_grad_(True)
    ref = F.cross_entropy(x64, y.cpu(), label_smoothing=0.1)
    (gr,) = torch.autograd.grad(ref, x64)
    out, g = out.detach().cpu(), g.cpu()
    assert out.dtype == torch.float32 and g.dtype == dtype
    # float32 math on the 16-bit values: float32 agreement for the loss; the gradient is rounded
    # once to the logits' dtype.
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    torch.testing.assert_close(g.double(), gr, atol=1e-2 * gr.abs().max().item(), rtol=TOL[dtype]["rtol"])
    _, z = fused_cross_entropy(x, y, z_loss=1e-3, loss_dtype=torch.float64, return_z_loss=True)
    assert z.dtype == torch.float64


def test_out_of_range_label_is_both_eager_exception_types(cpu_path):
    # F.cross_entropy / nll_loss raise IndexError, gather raises RuntimeError: either spelling
    # rewritten into the op raises what eager raised.
    x, y = torch.randn(3, 5), torch.tensor([0, 7, 1])
    with pytest.raises(IndexError) as index_error:
        F.cross_entropy(x, y)
    with pytest.raises(RuntimeError):
        x.gather(1, y[:, None])
    with pytest.raises(index_error.type) as ours:
        smoothce.cross_entropy(x, y)
    assert isinstance(ours.value, RuntimeError) and "target 7" in str(ours.value)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(path, reduction):
    x = torch.randn(0, 6, device=path, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=path)
    out = smoothce.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1)
    ref = F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert out.shape == ref.shape
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == (0, 6)


def test_one_class(path):
    x = torch.randn(4, 1)
    y = torch.zeros(4, dtype=torch.long)
    out, ref, g, gr = run_pair(lambda t, y: smoothce.cross_entropy(t, y, label_smoothing=0.1, reduction="none"),
                               lambda t, y: F.cross_entropy(t, y, label_smoothing=0.1, reduction="none"), x, y,
                               device=path)
    check(out, ref, [g], [gr], torch.float32)


# ----------------------------------------------------------------------------------------------
# Module twin, bad input
# ----------------------------------------------------------------------------------------------


def test_module_twin(path):
    torch.manual_seed(9)
    w = torch.rand(12) + 0.5
    x = torch.randn(6, 12)
    y = torch.randint(0, 12, (6,))
    ours = smoothce.CrossEntropyLoss(weight=w, label_smoothing=0.2, reduction="sum").to(path)
    theirs = torch.nn.CrossEntropyLoss(weight=w.double(), label_smoothing=0.2, reduction="sum")
    out, ref, g, gr = run_pair(lambda t, y: ours(t, y), lambda t, y: theirs(t, y), x, y, device=path)
    check(out, ref, [g], [gr], torch.float32)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "input dtype torch.int32"),
        (dict(y=torch.zeros(3).to(torch.int16)), TypeError, "target dtype torch.int16"),
        (dict(y=torch.zeros(4, dtype=torch.long)), ValueError, r"target shape \(4,\) does not match input shape \(3, 4\)"),
        (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(4,\) .* got \(5,\)"),
        (dict(reduction="avg"), ValueError, "reduction='avg'"),
        (dict(softcap=0.0), ValueError, "softcap=0.0"),
        (dict(z_loss=-1.0), ValueError, "z_loss=-1.0"),
        (dict(z_loss=float("nan")), ValueError, "z_loss=nan must be finite"),
    ],
)
def test_bad_input_is_named(kwargs, error, message):
    x = kwargs.pop("x", torch.randn(3, 4))
    y = kwargs.pop("y", torch.zeros(3, dtype=torch.long))
    with pytest.raises(error, match=message):
        smoothce.cross_entropy(x, y, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(target=torch.full((3, 4), 0.25)), TypeError, "target dtype torch.float32 looks like class probabilities; "
         "this op takes class indices .* fused_soft_cross_entropy"),
        (dict(smoothing="rest"), ValueError, "smoothing='rest' is not one of 'all'"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int or None, got 1.5"),
        (dict(kl=1), TypeError, "kl must be a bool, got 1"),
        (dict(logit_scale=0.0), ValueError, "logit_scale=0.0 must be > 0"),
        (dict(scale="2"), TypeError, "scale must be a number, got str '2'"),
        (dict(uniform_rows=torch.ones(3)), TypeError, "uniform_rows must be a bool tensor, got torch.float32"),
        (dict(uniform_rows=torch.ones(4, dtype=torch.bool)), ValueError, r"uniform_rows shape \(4,\) must equal"),
        (dict(uniform_rows=torch.ones(3, dtype=torch.bool), reduction="sum", kl=True), ValueError,
         "kl=True with uniform_rows"),
        (dict(loss_dtype=torch.int32), TypeError, "loss_dtype=torch.int32 must be None or a floating point"),
    ],
)
def test_bad_form_is_named(kwargs, error, message):
    kwargs = dict(kwargs)
    target = kwargs.pop("target", torch.zeros(3, dtype=torch.long))
    with pytest.raises(error, match=message):
        fused_cross_entropy(torch.randn(3, 4), target, **kwargs)


def test_label_smoothing_range_as_eager():
    x, y = torch.randn(4, 6), torch.tensor([0, 5, 2, 1])
    # Below 0 behaves as no smoothing, in eager and here.
    torch.testing.assert_close(smoothce.cross_entropy(x, y, label_smoothing=-0.1), F.cross_entropy(x, y))
    torch.testing.assert_close(F.cross_entropy(x, y, label_smoothing=-0.1), F.cross_entropy(x, y))
    # Above 1 raises eager's RuntimeError with eager's message.
    for fn in (F.cross_entropy, smoothce.cross_entropy):
        with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0 and 1\.0\. Got: 1\.5"):
            fn(x, y, label_smoothing=1.5)


def test_legacy_reduction_arguments_as_eager():
    x, y = torch.randn(4, 6), torch.tensor([0, 5, 2, 1])
    for kwargs in (dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)):
        with pytest.warns(UserWarning):
            ours = smoothce.cross_entropy(x, y, **kwargs)
        with pytest.warns(UserWarning):
            theirs = F.cross_entropy(x, y, **kwargs)
        torch.testing.assert_close(ours, theirs)


def test_bad_kernel_choice_is_named(monkeypatch):
    monkeypatch.setenv("SMOOTHCE_KERNEL", "cuda")
    with pytest.raises(ValueError, match="SMOOTHCE_KERNEL='cuda'"):
        smoothce.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_out_of_range_target_raises_on_cpu(cpu_path):
    x = torch.randn(3, 5)
    with pytest.raises(IndexError, match="target 5 is out of bounds for 5 classes"):
        smoothce.cross_entropy(x, torch.tensor([0, 5, 1]))
    with pytest.raises(IndexError, match="target -3 is out of bounds"):
        smoothce.cross_entropy(x, torch.tensor([0, -3, 1]))


# ----------------------------------------------------------------------------------------------
# The ops under torch.library.opcheck, and torch.compile
# ----------------------------------------------------------------------------------------------


def _stats_case(case, seed):
    """Arguments of smoothce::cross_entropy_stats: logits requiring grad, labels, weight, ignore_index,
    classes, class_offset, logit_scale, softcap, weighted_sum. Drawn from ``seed``, whatever it is."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=g) * 3).requires_grad_()

    if case == "rows":  # smoothing with class weights, an ignored row
        y = torch.randint(0, 7, (4,), generator=g)
        y[2] = -100
        return randn(4, 7), y, torch.rand(7, generator=g) + 0.5, -100, 7, 0, 1.0, None, True
    if case == "shard":  # columns [3, 8) of 11 classes: some labels elsewhere; softcap, temperature
        y = torch.randint(0, 11, (5,), generator=g)
        return randn(5, 5), y, torch.rand(5, generator=g) + 0.5, None, 11, 3, 0.7, 5.0, True
    # class dim 1: (N, C, S), no smoothing
    return randn(2, 6, 3), torch.randint(0, 6, (2, 3), generator=g), None, -100, 6, 0, 1.0, None, False


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", ["rows", "shard", "class_dim_1"])
def test_opcheck(path, case, seed):
    # Any seed: no output is written after it is returned (backward allocates the gradient), so
    # opcheck's comparison after a backward holds whatever the cotangent.
    args = tuple(a.detach().to(path).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in _stats_case(case, seed))
    torch.library.opcheck(torch.ops.smoothce.cross_entropy_stats.default, args)
    logits, target, weight, _, _, offset, logit_scale, softcap, weighted_sum = args
    stats = torch.ops.smoothce.cross_entropy_stats(*args).detach()
    grad_stats = torch.randn(stats.shape, generator=torch.Generator().manual_seed(seed)).to(path)
    grad_args = (grad_stats, logits.detach(), target, weight, stats[0] + 0.5, offset, logit_scale, softcap,
                 weighted_sum)
    torch.library.opcheck(torch.ops.smoothce.cross_entropy_grad.default, grad_args)


def _loss_fn(x, y, w):
    return smoothce.cross_entropy(x, y, w, label_smoothing=0.1, z_loss=1e-3) * 2.0


@pytest.mark.parametrize(
    "backend, dynamic",
    [
        ("eager", False),
        ("aot_eager", False),
        ("aot_eager", True),
        pytest.param("inductor", False, marks=pytest.mark.inductor),
        pytest.param("inductor", True, marks=pytest.mark.inductor),
    ],
)
def test_compile(backend, dynamic):
    torch.manual_seed(10)
    fn = torch.compile(_loss_fn, backend=backend, dynamic=dynamic, fullgraph=True)
    w = torch.rand(13) + 0.5
    for N in (6, 9):  # a second shape: recompiles (static) or reuses the dynamic graph
        x = torch.randn(N, 13, requires_grad=True)
        y = torch.randint(0, 13, (N,))
        y[0] = -100
        out = fn(x, y, w)
        (g,) = torch.autograd.grad(out, x)
        x64 = x.detach().double().requires_grad_(True)
        ref = 2.0 * reference(x64, y, w, label_smoothing=0.1, z_loss=1e-3)
        (gr,) = torch.autograd.grad(ref, x64)
        check(out, ref, [g], [gr], torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, y, w).double(), ref.detach(), **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# Any incoming gradient: the step reads the logits twice and writes their gradient once
# ----------------------------------------------------------------------------------------------

# The incoming gradients a loss gets: loss.backward(), gradient accumulation's loss / 4, a tensor
# scale (a weighted sum of losses), and reduction='none' reduced by the caller with row weights.
GRAD_OUTPUTS = {
    "one": ("mean", lambda shape: torch.tensor(1.0, dtype=torch.float64)),
    "quarter": ("sum", lambda shape: torch.tensor(0.25, dtype=torch.float64)),
    "tensor": ("mean", lambda shape: torch.tensor(-1.7, dtype=torch.float64)),
    "none_rows": ("none", lambda shape: torch.linspace(-2.0, 3.0, shape[0], dtype=torch.float64)),
}


def _step_case(kind):
    reduction, grad_output = GRAD_OUTPUTS[kind]
    torch.manual_seed(12)
    x = torch.randn(9, 37) * 3
    y = torch.randint(0, 37, (9,))
    y[[1, 5]] = -100
    kwargs = dict(weight=torch.rand(37) + 0.5, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    return x, y, kwargs, grad_output((9,))


@pytest.mark.parametrize("kind", list(GRAD_OUTPUTS))
def test_any_grad_output_against_float64(path, kind):
    x, y, kwargs, go = _step_case(kind)
    w = kwargs.pop("weight")
    out, ref, g, gr = run_pair(lambda t, y, w: fused_cross_entropy(t, y, w, **kwargs),
                               lambda t, y, w: reference(t, y, w, **kwargs), x, y, w, device=path, grad_output=go)
    check(out, ref, [g], [gr], torch.float32)


@pytest.mark.parametrize("kind", list(GRAD_OUTPUTS))
def test_eager_step_touches_the_logits_three_times(kind):
    # The statistics read the logits; backward reads them once more and writes the gradient, with
    # grad_output already in it: no op scales a logits-sized tensor, whatever grad_output is.
    x, y, kwargs, go = _step_case(kind)
    x.requires_grad_()
    w = kwargs.pop("weight")
    with RecordOps() as rec:
        loss = fused_cross_entropy(x, y, w, **kwargs)
        loss.backward(go.float())
    assert accesses(rec.calls, x.numel()) == [("smoothce.cross_entropy_stats", 1, 0),
                                              ("smoothce.cross_entropy_grad", 1, 1)]


def test_backward_again_gives_the_same_gradient():
    # Nothing the forward returned is changed by backward: a retained graph replays.
    x = torch.randn(4, 10, requires_grad=True)
    loss = smoothce.cross_entropy(x, torch.randint(0, 10, (4,)), label_smoothing=0.1)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.tensor(2.0))
    torch.testing.assert_close(second, 2.0 * first)


def _allocations(fn) -> list[int]:
    """The sizes of the buffers fn allocates, largest first."""
    with torch.profiler.profile(profile_memory=True) as prof:
        fn()
    return sorted((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children),
                  reverse=True)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_the_step_allocates_the_gradient_and_nothing_else_of_its_size(monkeypatch, softcap):
    # Forward keeps a few numbers per row; backward allocates the gradient (the step's peak: one
    # buffer of the logits' size beyond the logits) and work blocks (here an eighth of the logits).
    # Regression: autograd once materialised a zeros((N, C)) gradient for an unused output. On
    # the CPU's torch path: the Triton interpreter copies every argument.
    from smoothce.kernels import cross_entropy_torch

    monkeypatch.setenv("SMOOTHCE_KERNEL", "torch")
    monkeypatch.setattr(cross_entropy_torch, "_BLOCK_ELEMENTS", 8 * 2048)
    x = torch.randn(64, 2048, requires_grad=True)
    y = torch.randint(0, 2048, (64,))
    size = x.numel() * x.element_size()
    losses = []
    forward = _allocations(lambda: losses.append(smoothce.cross_entropy(x, y, label_smoothing=0.1, softcap=softcap)))
    backward = _allocations(lambda: losses[0].backward())
    assert forward[0] <= size // 8, forward
    assert backward[0] == size and backward[1] <= size // 8, backward


@pytest.mark.parametrize("ignored", ["some", "all"])
def test_uniform_rows_mean_is_the_seed_formula(path, ignored):
    # eps * (-lp.sum(-1)).mean() / V + (1 - eps) * F.nll_loss(lp, y): the smoothing term averaged
    # over every row, the label term over the rows nll_loss keeps. With every label ignored eager's
    # loss is nan (nll_loss's 0 / 0) and its gradient the smoothing term's alone.
    torch.manual_seed(3)
    x = torch.randn(6, 7, dtype=torch.float64)
    y = torch.tensor([1, -100, 4, 0, -100, 6]) if ignored == "some" else torch.full((6,), -100)
    eps = 0.1
    x_ref = x.clone().requires_grad_()
    lp = F.log_softmax(x_ref, -1)
    ref = eps * (-lp.sum(-1)).mean() / 7 + (1 - eps) * F.nll_loss(lp, y)
    ref.backward()
    xd = x.to(path).requires_grad_()
    out = fused_cross_entropy(xd, y.to(path), label_smoothing=eps, uniform_rows=torch.ones(6, dtype=torch.bool,
                              device=path))
    out.backward()
    torch.testing.assert_close(out.cpu(), ref.detach(), equal_nan=True)
    torch.testing.assert_close(xd.grad.cpu(), x_ref.grad)


# ----------------------------------------------------------------------------------------------
# Column shards: what a vocabulary-parallel head does with the two ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_column_shards_combine_into_the_whole_row(path, softcap):
    # Each shard's statistics combine into the whole row's (logsumexp of the lse, sums of the label
    # logit and weighted sum); the loss of the combined statistics is the loss, and each shard's
    # gradient from the combined lse and the loss's derivatives is that shard's columns of the
    # gradient. Labels are numbered among all the classes; most fall outside any one shard.
    from smoothce.kernels.cross_entropy import loss_from_stats
    from smoothce.kernels.form import LossForm

    torch.manual_seed(16)
    V, shards = 23, [(0, 8), (8, 17), (17, 23)]  # unequal, the last one partial at any block size
    x = torch.randn(6, V) * 3
    y = torch.tensor([0, 7, 8, 22, -100, 13])
    w = torch.rand(V) + 0.5
    form = LossForm(label_smoothing=0.1, z_loss=1e-3, softcap=softcap, logit_scale=0.8)
    xd, yd, wd = x.to(path), y.to(path), w.to(path)

    def stats(a, b):
        return torch.ops.smoothce.cross_entropy_stats(xd[:, a:b], yd, wd[a:b], -100, V, a, 0.8, softcap, True)

    parts = torch.stack([stats(a, b) for a, b in shards])  # (shards, 3, N)
    combined = torch.stack([parts[:, 0].logsumexp(0), parts[:, 1].sum(0), parts[:, 2].sum(0)])
    torch.testing.assert_close(combined, stats(0, V), rtol=1e-6, atol=1e-5)

    combined.requires_grad_()
    loss, _ = loss_from_stats(combined, yd, wd, form, V)
    (grad_stats,) = torch.autograd.grad(loss, combined)
    grads = [torch.ops.smoothce.cross_entropy_grad(grad_stats, xd[:, a:b], yd, wd[a:b], combined[0].detach(), a,
                                                   0.8, softcap, True) for a, b in shards]
    x64 = x.double().requires_grad_()
    ref = reference(x64, y, w.double(), label_smoothing=0.1, z_loss=1e-3, softcap=softcap, logit_scale=0.8)
    (gr,) = torch.autograd.grad(ref, x64)
    check(loss.detach().cpu(), ref.detach(), [torch.cat(grads, 1).cpu()], [gr], torch.float32)
