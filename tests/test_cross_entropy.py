"""smoothce::cross_entropy against eager PyTorch in float64, on both paths.

"triton" runs the Triton kernel (through the interpreter on CPU), "torch" the chunked torch
implementation; both must agree with F.cross_entropy (and with an explicit float64 formula for
the general a, b, c form, z-loss and softcap).
"""

import pytest
import torch
import torch.nn.functional as F

import smoothce
from smoothce.kernels import cross_entropy as ce_mod
from smoothce.kernels.cross_entropy import fused_cross_entropy

PATHS = ["torch", "triton"]

# Tolerances against the float64 reference, by input dtype: fp32 math, the result rounded once.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("SMOOTHCE_KERNEL", request.param)
    return request.param


def reference(x, y, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, smoothing="all",
              scale=1.0, kl=False, z_loss=0.0, softcap=None, logit_scale=1.0, uniform_rows=None):
    """LossForm's loss written out densely in float64 from its words.

    The target distribution puts 1 - eps on the label and spreads eps over all V classes
    ("all") or the V - 1 others ("others"); its label part counts on rows whose label is not
    ignore_index, its uniform part on uniform_rows (default: the same rows).
    """
    x = x.double() * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    x = x.movedim(1, -1)  # (..., V)
    V = x.shape[-1]
    w = torch.ones(V, dtype=torch.float64) if weight is None else weight.double()
    label_rows = y != ignore_index if ignore_index is not None else torch.ones_like(y, dtype=torch.bool)
    uniform_rows = label_rows if uniform_rows is None else uniform_rows
    y_safe = torch.where(label_rows, y, 0)
    onehot = F.one_hot(y_safe, V).double()
    eps = label_smoothing
    per_class = eps / V if smoothing == "all" else eps / (V - 1)
    on_label = 1 - eps if smoothing == "all" else 1 - eps - per_class  # plus per_class from the uniform part
    lse = torch.logsumexp(x, -1)
    logp = x - lse.unsqueeze(-1)
    ce = -on_label * w[y_safe] * (onehot * logp).sum(-1) * label_rows
    ce = ce - per_class * (w * logp).sum(-1) * uniform_rows
    if kl:
        q = on_label * onehot + per_class
        ce = ce + torch.special.xlogy(q, q).sum(-1) * label_rows
    ce = scale * ce
    zl = z_loss * lse * lse * label_rows
    if reduction == "none":
        return ce + zl
    if reduction == "sum":
        return ce.sum() + zl.sum()
    return ce.sum() / (w[y_safe] * label_rows).sum() + (zl.sum() / label_rows.sum() if z_loss else 0.0)


def check(out, ref, grads, ref_grads, dtype):
    tol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **tol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        # Gradients are O(1/N) for 'mean': scale atol to the reference's size.
        torch.testing.assert_close(g.double(), r, atol=tol["atol"] * max(1.0, r.abs().max().item()), rtol=tol["rtol"])


def run_pair(fn, ref_fn, x, grad_output=None):
    x = x.detach().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    out = fn(x)
    ref = ref_fn(x64)
    go = torch.randn(out.shape, dtype=torch.float64, device=out.device) if grad_output is None else grad_output
    (g,) = torch.autograd.grad(out, x, go.to(out.dtype))
    (gr,) = torch.autograd.grad(ref, x64, go)
    return out, ref, g, gr


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
        lambda t: smoothce.cross_entropy(t, y, w, reduction=reduction, label_smoothing=eps),
        lambda t: F.cross_entropy(t, y, w.double() if w is not None else None, reduction=reduction,
                                  label_smoothing=eps),
        x,
    )
    check(out, ref, [g], [gr], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(path, dtype):
    torch.manual_seed(1)
    x = (torch.randn(6, 50) * 2).to(dtype)
    y = torch.randint(0, 50, (6,))
    out, ref, g, gr = run_pair(
        lambda t: smoothce.cross_entropy(t, y, label_smoothing=0.1),
        lambda t: F.cross_entropy(t, y, label_smoothing=0.1),
        x,
        grad_output=torch.tensor(1.0, dtype=torch.float64),
    )
    check(out, ref, [g], [gr], dtype)


def test_float64_is_exact():
    torch.manual_seed(2)
    x = torch.randn(5, 13, dtype=torch.float64)
    y = torch.randint(0, 13, (5,))
    out, ref, g, gr = run_pair(
        lambda t: smoothce.cross_entropy(t, y, label_smoothing=0.2, reduction="sum"),
        lambda t: F.cross_entropy(t, y, label_smoothing=0.2, reduction="sum"),
        x,
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
        lambda t: smoothce.cross_entropy(t, y, label_smoothing=0.1, reduction="none"),
        lambda t: F.cross_entropy(t, y, label_smoothing=0.1, reduction="none"),
        x,
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
        lambda t: smoothce.cross_entropy(t, y, w, ignore_index=-100, reduction=reduction, label_smoothing=0.3),
        lambda t: F.cross_entropy(t, y, w.double(), ignore_index=-100, reduction=reduction, label_smoothing=0.3),
        x,
    )
    assert out.shape == (() if reduction == "mean" else y.shape)
    check(out, ref, [g], [gr], torch.float32)


def test_non_contiguous_logits(path):
    torch.manual_seed(5)
    x = torch.randn(19, 8).t()  # (8, 19) with column-major strides
    y = torch.randint(0, 19, (8,))
    out, ref, g, gr = run_pair(
        lambda t: smoothce.cross_entropy(t, y, label_smoothing=0.05),
        lambda t: F.cross_entropy(t, y, label_smoothing=0.05),
        x,
    )
    check(out, ref, [g], [gr], torch.float32)


def test_unbatched_input(path):
    x = torch.randn(10)
    y = torch.tensor(3)
    for reduction in ("none", "mean"):
        out, ref, g, gr = run_pair(
            lambda t: smoothce.cross_entropy(t, y, reduction=reduction, label_smoothing=0.1),
            lambda t: F.cross_entropy(t, y, reduction=reduction, label_smoothing=0.1),
            x,
        )
        assert out.shape == ref.shape == ()
        check(out, ref, [g], [gr], torch.float32)


# The interpreter evaluates both sides of a tl.where: the masked 1 / 0 scale warns in numpy.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")
def test_all_rows_ignored_mean_is_nan(path):
    x = torch.randn(3, 6, requires_grad=True)
    y = torch.full((3,), -100)
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
        lambda t: fused_cross_entropy(t, y, w, **kwargs),
        lambda t: reference(t, y, w, **kwargs),
        x,
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
    x_ = x.detach().requires_grad_(True)
    loss, z = smoothce.cross_entropy(x_, y, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2,
                                     return_z_loss=True)
    ref_z = reference(x.double(), y, w, reduction=reduction, scale=0.0, z_loss=1e-2)
    torch.testing.assert_close(z.double(), ref_z, **TOL[torch.float32])
    out, refo, g, gr = run_pair(
        lambda t: smoothce.cross_entropy(t, y, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2),
        lambda t: reference(t, y, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2),
        x,
    )
    check(out, refo, [g], [gr], torch.float32)
    assert not z.requires_grad


@pytest.mark.parametrize("cap", [0.7, 30.0])
def test_softcap(path, cap):
    torch.manual_seed(8)
    x = torch.randn(5, 29) * 5
    y = torch.randint(0, 29, (5,))
    out, ref, g, gr = run_pair(
        lambda t: smoothce.cross_entropy(t, y, label_smoothing=0.1, softcap=cap, z_loss=1e-3, reduction="none"),
        lambda t: reference(t, y, reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=cap),
        x,
    )
    check(out, ref, [g], [gr], torch.float32)
    torch.testing.assert_close(
        smoothce.cross_entropy(x, y, softcap=cap).double(),
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
    out, ref, g, gr = run_pair(lambda t: fused_cross_entropy(t, y, **kwargs), lambda t: reference(t, y, **kwargs), x)
    check(out, ref, [g], [gr], torch.float32)
    with pytest.raises(IndexError, match="target -100 is out of bounds for 11 classes .*no ignore_index"):
        fused_cross_entropy(x, torch.tensor([0, -100, 1, 2, 3, 4]), ignore_index=None)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_uniform_rows(path, reduction, weighted):
    # nll_loss(reduction='none') masks the label term with ignore_index -100; a hand-written
    # uniform term next to it counts on the rows of its own mask.
    torch.manual_seed(14)
    x = torch.randn(2, 9, 4)  # class dim 1, K-dim rows
    y = torch.randint(0, 9, (2, 4))
    y[0, 1] = y[1, 3] = -100
    uniform = torch.rand(2, 4) > 0.4
    uniform[0, 1] = True  # an ignored label whose uniform term still counts
    w = torch.rand(9) + 0.5 if weighted else None
    kwargs = dict(reduction=reduction, label_smoothing=0.3, smoothing="others", z_loss=1e-2, uniform_rows=uniform)
    out, ref, g, gr = run_pair(lambda t: fused_cross_entropy(t, y, w, **kwargs),
                               lambda t: reference(t, y, w, **kwargs), x)
    check(out, ref, [g], [gr], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_dtype(path, dtype):
    # F.cross_entropy(x.float(), y) with 16-bit x: the op reads x as it is, returns the float32
    # loss the user's code produced, and writes the gradient once in x's dtype.
    torch.manual_seed(15)
    x = (torch.randn(7, 40) * 3).to(dtype)
    y = torch.randint(0, 40, (7,))
    y[2] = -100
    x.requires_grad_(True)
    out = fused_cross_entropy(x, y, label_smoothing=0.1, loss_dtype=torch.float32)
    (g,) = torch.autograd.grad(out, x)
    x64 = x.detach().double().requires_grad_(True)
    ref = F.cross_entropy(x64, y, label_smoothing=0.1)
    (gr,) = torch.autograd.grad(ref, x64)
    assert out.dtype == torch.float32 and g.dtype == dtype
    # float32 math on the 16-bit values: float32 agreement for the loss; the gradient is rounded
    # once to the logits' dtype.
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    torch.testing.assert_close(g.double(), gr, atol=1e-2 * gr.abs().max().item(), rtol=TOL[dtype]["rtol"])
    _, z = fused_cross_entropy(x, y, z_loss=1e-3, loss_dtype=torch.float64, return_z_loss=True)
    assert z.dtype == torch.float64


def test_out_of_range_label_is_both_eager_exception_types(path):
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
    x = torch.randn(0, 6, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    out = smoothce.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1)
    ref = F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert out.shape == ref.shape
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == (0, 6)


def test_one_class(path):
    x = torch.randn(4, 1)
    y = torch.zeros(4, dtype=torch.long)
    out, ref, g, gr = run_pair(lambda t: smoothce.cross_entropy(t, y, label_smoothing=0.1, reduction="none"),
                               lambda t: F.cross_entropy(t, y, label_smoothing=0.1, reduction="none"), x)
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
    ours = smoothce.CrossEntropyLoss(weight=w, label_smoothing=0.2, reduction="sum")
    theirs = torch.nn.CrossEntropyLoss(weight=w.double(), label_smoothing=0.2, reduction="sum")
    out, ref, g, gr = run_pair(lambda t: ours(t, y), lambda t: theirs(t, y), x)
    check(out, ref, [g], [gr], torch.float32)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x=torch.randn(3, 4).int()), TypeError, "input dtype torch.int32"),
        (dict(y=torch.rand(3, 4)), TypeError, "target dtype torch.float32 looks like class probabilities"),
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
        (dict(smoothing="rest"), ValueError, "smoothing='rest' is not one of 'all'"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int or None, got 1.5"),
        (dict(kl=1), TypeError, "kl must be a bool, got 1"),
        (dict(logit_scale=0.0), ValueError, "logit_scale=0.0 must be > 0"),
        (dict(scale="2"), TypeError, "scale must be a number, got str '2'"),
        (dict(uniform_rows=torch.ones(3)), TypeError, "uniform_rows must be a bool tensor, got torch.float32"),
        (dict(uniform_rows=torch.ones(4, dtype=torch.bool)), ValueError, r"uniform_rows shape \(4,\) must equal"),
        (dict(uniform_rows=torch.ones(3, dtype=torch.bool)), ValueError, "reduction='mean' with uniform_rows"),
        (dict(uniform_rows=torch.ones(3, dtype=torch.bool), reduction="sum", kl=True), ValueError,
         "kl=True with uniform_rows"),
        (dict(loss_dtype=torch.int32), TypeError, "loss_dtype=torch.int32 must be None or a floating point"),
    ],
)
def test_bad_form_is_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        fused_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), **kwargs)


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


def test_out_of_range_target_raises_on_cpu(path):
    x = torch.randn(3, 5)
    with pytest.raises(IndexError, match="target 5 is out of bounds for 5 classes"):
        smoothce.cross_entropy(x, torch.tensor([0, 5, 1]))
    with pytest.raises(IndexError, match="target -3 is out of bounds"):
        smoothce.cross_entropy(x, torch.tensor([0, -3, 1]))


def test_kernel_poisons_out_of_range_rows_with_nan():
    # Where a check would need a device sync (CUDA), the kernel itself never reads out of bounds
    # and marks the row nan; exercised here on the launcher directly.
    x = torch.randn(3, 5)
    y = torch.tensor([[0], [9], [-100]])
    ce_rows, z_rows = torch.empty(3), torch.zeros(3)
    grad = torch.empty(3, 5, 1)
    scales = torch.ones(2)
    ce_mod.launch_cross_entropy(x.view(3, 5, 1), y, None, scales, ce_rows, z_rows, grad, ignore_index=-100,
                                a=0.9, b=0.02, c=0.0, z_loss=0.0, softcap=None)
    assert ce_rows[0].isfinite() and ce_rows[1].isnan() and ce_rows[2] == 0
    assert grad[1].isnan().all() and (grad[2] == 0).all() and grad[0].isfinite().all()


# ----------------------------------------------------------------------------------------------
# The op under torch.library.opcheck and torch.compile
# ----------------------------------------------------------------------------------------------


# The op's LossForm arguments: ignore_index, reduction, label_smoothing, smoothing, scale, kl, z_loss,
# softcap, logit_scale.
OP_FORM_ARGS = (-100, "mean", 0.0, "all", 1.0, False, 0.0, None, 1.0)


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(4, 7, requires_grad=True), torch.tensor([1, 2, -100, 6]), None,
         -100, "mean", 0.1, "all", 1.0, False, 0.0, None, 1.0, None, None, True),
        (torch.randn(4, 7, requires_grad=True), torch.tensor([1, 2, 0, 6]), torch.rand(7),
         -100, "none", 0.1, "others", 0.5, True, 1e-3, 5.0, 0.7, None, torch.float64, True),
        (torch.randn(4, 7, requires_grad=True), torch.tensor([1, 2, -100, 6]), None,
         -100, "sum", 0.1, "all", 1.0, False, 0.0, None, 1.0, torch.tensor([True, False, True, True]), None, True),
        (torch.randn(3, 5, requires_grad=True), torch.tensor([0, 4, 2]), None,
         None, "none", 0.2, "all", 1.0, False, 1e-2, None, 1.0, None, None, True),
        (torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]]), None,
         -100, "sum", 0.0, "all", 1.0, False, 0.0, None, 1.0, None, None, False),
    ],
)
def test_opcheck(path, args):
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
# GPU only
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_int64_offsets_past_2_pow_31_elements():
    # 8193 x 262144 bf16 = 2^31 + 2^18 elements: int32 row offsets would wrap for the last row.
    torch.manual_seed(11)
    N, C = 8193, 262144
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, C, (N,), device="cuda")
    out = smoothce.cross_entropy(x, y, label_smoothing=0.1, reduction="none")
    (g,) = torch.autograd.grad(out.sum(), x)
    rows = torch.tensor([0, N - 1], device="cuda")
    xr = x.detach()[rows].double().requires_grad_(True)
    ref = F.cross_entropy(xr, y[rows], label_smoothing=0.1, reduction="none")
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(out[rows].double(), ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(g[rows].double(), gr, atol=1e-3, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_grid(dtype):
    torch.manual_seed(12)
    x = torch.randn(64, 32000, device="cuda").to(dtype)
    y = torch.randint(0, 32000, (64,), device="cuda")
    y[::7] = -100
    w = torch.rand(32000, device="cuda") + 0.5
    out, ref, g, gr = run_pair(
        lambda t: smoothce.cross_entropy(t, y, w, label_smoothing=0.1, z_loss=1e-4),
        lambda t: reference(t.cpu(), y.cpu(), w.cpu(), label_smoothing=0.1, z_loss=1e-4).cuda(),
        x,
        grad_output=torch.tensor(1.0, dtype=torch.float64, device="cuda"),
    )
    check(out, ref, [g], [gr], dtype)


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
