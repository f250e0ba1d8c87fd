"""smoothce::cross_entropy against eager PyTorch in float64, on both paths.

"triton" runs the Triton kernel (on CUDA, or through the interpreter on CPU), "torch" the torch
implementation; both must agree with F.cross_entropy and with LossForm's loss written out in
float64 (tests/reference.py). Tensors live on the device fixture's device; the kernel's variants
and the GPU grid are in tests/test_cross_entropy_kernels.py.
"""

import pytest
import torch
import torch.nn.functional as F
import triton_cpu
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
# Forward-only mode, module twin, bad input
# ----------------------------------------------------------------------------------------------


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args))
        self.outputs.append(out)
        return out


@pytest.mark.parametrize("grad_mode", [False, True])
def test_gradient_written_only_when_needed(grad_mode):
    x = torch.randn(4, 9, requires_grad=True)
    y = torch.randint(0, 9, (4,))
    with torch.set_grad_enabled(grad_mode), RecordOps() as rec:
        smoothce.cross_entropy(x, y, label_smoothing=0.1)
    (args,) = [a for f, a in rec.calls if f is torch.ops.smoothce.cross_entropy.default]
    assert args[-1] is grad_mode
    _, _, grad = torch.ops.smoothce.cross_entropy(x.detach(), y, None, *OP_FORM_ARGS, None, None, False)
    assert grad.numel() == 0


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
# The op under torch.library.opcheck and torch.compile
# ----------------------------------------------------------------------------------------------


# The op's LossForm arguments: ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss,
# softcap, logit_scale.
OP_FORM_ARGS = (-100, "mean", 0.0, "all", 1.0, False, 0.0, None, 1.0)


def _seeded(*shape, seed, rand=torch.randn, **kw):
    return rand(*shape, generator=torch.Generator().manual_seed(seed), **kw)


OPCHECK_CASES = [
    (_seeded(4, 7, seed=1, requires_grad=True), torch.tensor([1, 2, -100, 6]), None,
     -100, "mean", 0.1, "all", 1.0, False, 0.0, None, 1.0, None, None, True),
    (_seeded(4, 7, seed=2, requires_grad=True), torch.tensor([1, 2, 0, 6]), _seeded(7, seed=3, rand=torch.rand),
     -100, "none", 0.1, "others", 0.5, True, 1e-3, 5.0, 0.7, None, torch.float64, True),
    (_seeded(4, 7, seed=4, requires_grad=True), torch.tensor([1, 2, -100, 6]), None,
     -100, "sum", 0.1, "all", 1.0, False, 0.0, None, 1.0, torch.tensor([True, False, True, True]), None, True),
    (_seeded(3, 5, seed=5, requires_grad=True), torch.tensor([0, 4, 2]), None,
     None, "none", 0.2, "all", 1.0, False, 1e-2, None, 1.0, None, None, True),
    (_seeded(2, 3, 4, seed=6), torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]]), None,
     -100, "sum", 0.0, "all", 1.0, False, 0.0, None, 1.0, None, None, False),
]


@pytest.mark.parametrize("args", OPCHECK_CASES)
def test_opcheck(path, args):
    args = tuple(a.detach().to(path).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    # Eager backward scales the op's stored gradient (its third output) in place, so that it
    # becomes the logits' gradient with no second N x C buffer. opcheck compares the outputs after
    # a backward whose cotangent is the sign of the loss's sum: the cases are seeded so that it is
    # +1 (scaling by 1 leaves the stored gradient as the traced op returns it).
    assert torch.ops.smoothce.cross_entropy.default(*args)[0].sum() > 0, "reseed: opcheck's cotangent is -1"
    torch.library.opcheck(torch.ops.smoothce.cross_entropy.default, args)


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
# Eager backward: the stored gradient, scaled in place
# ----------------------------------------------------------------------------------------------


def test_eager_backward_reuses_the_stored_gradient():
    # The gradient written in forward becomes x.grad: no second N x C buffer in backward.
    x = torch.randn(4, 10, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    with RecordOps() as rec:
        loss = smoothce.cross_entropy(x, y, label_smoothing=0.1)
    (stored_ptr,) = [o[2].data_ptr() for (f, _), o in zip(rec.calls, rec.outputs) if f is torch.ops.smoothce.cross_entropy.default]
    del rec
    loss.backward()
    assert x.grad.data_ptr() == stored_ptr
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.cross_entropy(x, y, label_smoothing=0.1), x)[0])


def test_second_backward_refuses_instead_of_scaling_twice():
    # Backward scaled the stored buffer in place, so a retained graph cannot be replayed.
    x = torch.randn(4, 10, requires_grad=True)
    loss = smoothce.cross_entropy(x, torch.randint(0, 10, (4,)), label_smoothing=0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backward_allocates_no_logits_sized_buffer():
    # Regression: autograd used to materialise a zeros((N, C)) gradient for the op's unused
    # gradient output before calling backward.
    x = torch.randn(64, 512, requires_grad=True)
    loss = smoothce.cross_entropy(x, torch.randint(0, 512, (64,)), label_smoothing=0.1)
    with torch.profiler.profile(profile_memory=True) as prof:
        loss.backward()
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert allocated < x.numel() * x.element_size() // 4, allocated


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
