"""smoothce::soft_cross_entropy against eager PyTorch in float64, on both paths.

Every spelling the op stands for is written here as eager code (probability-target
F.cross_entropy, F.kl_div over log_softmax with and without log_target, Hinton distillation with
its T**2, torchtune's forward / reverse / symmetric KL masked by labels, mixup's two labels) and
compared on values and on the gradients of the logits and of a target that requires grad; the
features in between go against the forms' loss written out (tests/reference.py). "triton" runs
the Triton kernel (on CUDA, or through the interpreter on CPU), "torch" the torch path; the
kernel's variants are in tests/test_soft_cross_entropy_kernels.py.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
import triton_cpu
from reference import soft_reference

import smoothce
from smoothce.kernels import soft_cross_entropy as soft_module
from smoothce.kernels.soft_cross_entropy import fused_soft_cross_entropy, gradient_in_forward

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}


@pytest.fixture(params=["torch", "triton"])
def path(request, device, monkeypatch):
    """The device the test runs on, with SMOOTHCE_KERNEL set to the path."""
    if request.param == "triton":
        triton_cpu.require(device)  # the interpreter, where it runs loops (Triton 3.6 needs numpy < 2.4)
    monkeypatch.setenv("SMOOTHCE_KERNEL", request.param)
    return device


def run_pair(fn, ref_fn, tensors: dict, device, dtype=torch.float32, grad_output=None):
    """fn(**tensors) on ``device`` (floating tensors in ``dtype``) and ref_fn(**tensors) in float64
    on the CPU, with the gradients of every tensor that requires grad, for one grad_output.
    Returns (out, ref, grads, ref_grads) on the CPU."""
    ours, theirs, leaves, leaves64 = {}, {}, [], []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            ours[name] = theirs[name] = t
            continue
        grad = t.requires_grad
        floating = t.is_floating_point() and name not in ("lam",)
        a = t.detach().to(device, dtype if floating else t.dtype).requires_grad_(grad)
        # the reference reads the values the op reads (16-bit inputs rounded), in float64
        b = a.detach().cpu().double().requires_grad_(grad) if t.is_floating_point() else t.detach()
        ours[name], theirs[name] = a, b
        if grad:
            leaves.append(a)
            leaves64.append(b)
    out = fn(**ours)
    ref = ref_fn(**theirs)
    go = torch.randn(ref.shape, dtype=torch.float64) if grad_output is None else grad_output
    grads = torch.autograd.grad(out, leaves, go.to(device, out.dtype))
    ref_grads = torch.autograd.grad(ref, leaves64, go)
    return out.detach().cpu(), ref.detach(), [g.cpu() for g in grads], list(ref_grads)


def check(out, ref, grads, ref_grads, dtype=torch.float32, loss_dtype=None):
    tol = TOL[dtype]
    assert out.dtype == (loss_dtype or dtype)
    torch.testing.assert_close(out.double(), ref, equal_nan=True, **tol)
    for g, r in zip(grads, ref_grads, strict=True):
        # Gradients are O(1/N) for 'mean': atol follows the reference's size.
        scale = max(1.0, r.abs().nan_to_num(posinf=0.0, neginf=0.0).max().item())
        torch.testing.assert_close(g.double(), r, atol=tol["atol"] * scale, rtol=tol["rtol"], equal_nan=True)


def _seeded(*shape, seed, fn=torch.randn):
    return fn(shape, generator=torch.Generator().manual_seed(seed))


def _labels(*shape, seed, classes):
    return torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(seed))


def _probs(*shape, seed, dim=1):
    return torch.softmax(_seeded(*shape, seed=seed) * 2, dim)


# ----------------------------------------------------------------------------------------------
# Probability targets: F.cross_entropy with a float target
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(6, 11), (2, 5, 3, 2)])  # rows; class dim 1 with K dims
def test_probability_targets_match_f_cross_entropy(path, reduction, eps, weighted, shape):
    x = _seeded(*shape, seed=1) * 3
    # A target that is not a distribution (eager does not renormalise), with exact zeros, needing grad.
    t = _seeded(*shape, seed=2, fn=torch.rand).where(_seeded(*shape, seed=3) > -0.5, 0.0)
    w = _seeded(shape[1], seed=4, fn=torch.rand) + 0.5 if weighted else None
    out, ref, g, gr = run_pair(
        lambda x, t, w: smoothce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps),
        lambda x, t, w: F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps),
        dict(x=x.requires_grad_(), t=t.requires_grad_(), w=w), path)
    check(out, ref, g, gr)


def test_probability_targets_unbatched_and_empty(path):
    x, t = _seeded(7, seed=5), _probs(7, seed=6, dim=0)
    for reduction in ("none", "mean"):
        out, ref, g, gr = run_pair(lambda x, t: smoothce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1),
                                   lambda x, t: F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1),
                                   dict(x=x.requires_grad_(), t=t), path)
        assert out.shape == ref.shape == ()
        check(out, ref, g, gr)
    x = torch.zeros(0, 4, device=path, requires_grad=True)
    for reduction in ("none", "sum", "mean"):
        out = smoothce.cross_entropy(x, torch.zeros(0, 4, device=path), reduction=reduction)
        ref = F.cross_entropy(x.detach(), torch.zeros(0, 4, device=path), reduction=reduction)
        torch.testing.assert_close(out.detach(), ref, equal_nan=True)
        assert torch.autograd.grad(out.sum(), x)[0].shape == (0, 4)


def test_probability_targets_reject_ignore_index_as_eager():
    x, t = torch.randn(3, 4), torch.rand(3, 4)
    with pytest.raises(RuntimeError) as eager:
        F.cross_entropy(x, t, ignore_index=1)
    with pytest.raises(eager.type, match="ignore_index is not supported for floating point target"):
        smoothce.cross_entropy(x, t, ignore_index=1)


# ----------------------------------------------------------------------------------------------
# F.kl_div over log_softmax, with and without log_target
# ----------------------------------------------------------------------------------------------


def _kl_ref(reduction, log_target, T=1.0):
    def fn(x, t):
        out = F.kl_div(F.log_softmax(x / T, -1), t, reduction="none" if reduction == "rows" else reduction,
                       log_target=log_target)
        return out.sum(-1) if reduction == "rows" else out

    return fn


def _kl_ours(reduction, log_target, T=1.0):
    """F.kl_div(log_softmax(x / T), t) in the op's words: 'batchmean' and kl_div's 'mean' (by numel)
    are the op's 'sum' divided by size(0) or numel; 'rows' is 'none' summed over the classes."""
    def fn(x, t):
        N, V = x.shape
        divisor = {"batchmean": N, "mean": N * V}.get(reduction, 1)
        op_reduction = {"rows": "none", "batchmean": "sum", "mean": "sum"}.get(reduction, reduction)
        return fused_soft_cross_entropy(x, t, target_kind="log_probs" if log_target else "probs", soft_kl=True,
                                        soft_logit_scale=1 / T, soft_scale=1.0 / divisor, reduction=op_reduction)

    return fn


@pytest.mark.parametrize("reduction", ["rows", "sum", "batchmean", "mean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_over_log_softmax(path, reduction, log_target):
    x = _seeded(5, 13, seed=7) * 2
    t = _probs(5, 13, seed=8)
    t[1, 3] = 0.0  # 0 log 0 = 0; its gradient is nan in eager and here
    if log_target:
        t = t.clamp_min(1e-30).log()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kl_div's 'mean' warns
        out, ref, g, gr = run_pair(_kl_ours(reduction, log_target), _kl_ref(reduction, log_target),
                                   dict(x=x.requires_grad_(), t=t.requires_grad_()), path)
    check(out, ref, g, gr)
    assert g[1][1, 3].isnan() == gr[1][1, 3].isnan()


def test_kl_div_negative_target_is_nan_as_eager(path):
    # OpInfo's kl_div samples draw targets in [-9, 9]: xlogy of a negative is nan, in eager and here.
    x, t = _seeded(2, 3, seed=9), _seeded(2, 3, seed=10) * 5
    out, ref, g, gr = run_pair(_kl_ours("sum", False), _kl_ref("sum", False), dict(x=x.requires_grad_(), t=t), path)
    assert ref.isnan() and out.isnan()


# ----------------------------------------------------------------------------------------------
# Distillation: Hinton's T**2, a teacher's logits, torchtune's KL losses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_hinton_distillation_next_to_a_cross_entropy(path, T, eps):
    # alpha CE(s, y) + (1 - alpha) T**2 KL(softmax(t / T) || softmax(s / T)), 'batchmean': the
    # student read at two temperatures, the teacher's softmax in the kernel; one call.
    N, V, alpha = 6, 19, 0.3
    s, t = _seeded(N, V, seed=11) * 3, _seeded(N, V, seed=12) * 3
    y = _labels(N, seed=13, classes=V)
    kd = dict(target_kind="logits", target_logit_scale=1 / T, soft_logit_scale=1 / T, soft_kl=True,
              soft_scale=(1 - alpha) * T * T, scale=alpha, label_smoothing=eps)
    out, ref, g, gr = run_pair(
        lambda s, t, y: fused_soft_cross_entropy(s, t, y, **kd),
        lambda s, t, y: alpha * F.cross_entropy(s, y, label_smoothing=eps) + (1 - alpha) * T * T * F.kl_div(
            F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean"),
        dict(s=s.requires_grad_(), t=t, y=y), path)
    check(out, ref, g, gr)


def test_teacher_logits_at_their_own_temperature(path):
    # A sharpened teacher: CE against softmax(t / 0.04) of the student at 1 / 0.1 (DINO's temperatures).
    s, t = _seeded(4, 9, seed=14), _seeded(4, 9, seed=15) * 0.1
    out, ref, g, gr = run_pair(
        lambda s, t: fused_soft_cross_entropy(s, t, target_kind="logits", target_logit_scale=1 / 0.04,
                                              soft_logit_scale=1 / 0.1),
        lambda s, t: -(F.softmax(t / 0.04, -1) * F.log_softmax(s / 0.1, -1)).sum(-1).mean(),
        dict(s=s.requires_grad_(), t=t.requires_grad_()), path)
    check(out, ref, g, gr)


def _torchtune(kind, ratio=0.5):
    """torchtune's ForwardKLLoss / ReverseKLLoss / SymmetricKLLoss (normalize=True) as written there:
    fp32 softmaxes, products zeroed where a logit is inf, masked by labels != -100, divided by the
    number of valid tokens."""
    def forward(s, t, y):
        prod = torch.masked_fill(F.softmax(t, -1) * F.log_softmax(s, -1), torch.isinf(s), 0)
        return prod.sum(-1).view(-1)

    def reverse(s, t, y):
        inf = torch.isinf(s) | torch.isinf(t)
        p = F.softmax(s, -1)
        prod = torch.masked_fill(p * F.log_softmax(t, -1), inf, 0)
        prod = prod - torch.masked_fill(p * F.log_softmax(s, -1), inf, 0)
        return prod.sum(-1).view(-1)

    def fn(s, t, y):
        mask = (y != -100).int().view(-1)
        if kind == "forward":
            x = forward(s, t, y)
        elif kind == "reverse":
            x = reverse(s, t, y)
        else:
            return ratio * _torchtune("forward")(s, t, y) + (1 - ratio) * _torchtune("reverse")(s, t, y)
        return -(x * mask).sum(0) / mask.sum(0)

    return fn


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
def test_torchtune_kl_losses_over_valid_tokens(path, kind):
    B, T, V = 2, 5, 17
    s, t = _seeded(B, T, V, seed=16) * 2, _seeded(B, T, V, seed=17) * 2
    y = _labels(B, T, seed=18, classes=V)
    y[0, :2] = y[1, 4] = -100
    words = {"forward": dict(soft_scale=1.0), "reverse": dict(soft_scale=0.0, reverse_kl=1.0),
             "symmetric": dict(soft_scale=0.5, reverse_kl=0.5)}[kind]
    out, ref, g, gr = run_pair(
        lambda s, t, y: fused_soft_cross_entropy(s.view(-1, V), t.view(-1, V), y.view(-1), target_kind="logits",
                                                 **words),
        _torchtune(kind), dict(s=s.requires_grad_(), t=t.requires_grad_(), y=y), path)
    check(out, ref, g, gr)


# ----------------------------------------------------------------------------------------------
# Mixup: two labels and lam
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("lam_shape", [None, (), (7,)])  # a number, one lam per batch (timm), one per row
@pytest.mark.parametrize("weighted", [False, True])
def test_mixup_two_labels(path, reduction, lam_shape, weighted):
    N, V, eps = 7, 10, 0.1
    x = _seeded(N, V, seed=19) * 2
    ya, yb = _labels(N, seed=20, classes=V), _labels(N, seed=21, classes=V)
    ya[2] = -100  # PyTorch's mean of each term divides by its own kept weights
    lam = 0.3 if lam_shape is None else _seeded(*lam_shape, seed=22, fn=torch.rand)
    w = _seeded(V, seed=23, fn=torch.rand) + 0.5 if weighted else None

    def eager(x, ya, yb, lam, w):
        if reduction != "none" and lam_shape:  # a lam per row weighs each row's term before PyTorch's reduction
            return soft_reference(x, None, ya, w, labels_b=yb, lam=lam, reduction=reduction, scale=1.0,
                                  label_smoothing=eps)
        ca = F.cross_entropy(x, ya, w, reduction=reduction, label_smoothing=eps)
        cb = F.cross_entropy(x, yb, w, reduction=reduction, label_smoothing=eps)
        return lam * ca + (1 - lam) * cb

    out, ref, g, gr = run_pair(
        lambda x, ya, yb, lam, w: fused_soft_cross_entropy(x, None, ya, w, labels_b=yb, lam=lam, scale=1.0,
                                                           label_smoothing=eps, reduction=reduction),
        eager, dict(x=x.requires_grad_(), ya=ya, yb=yb, lam=lam, w=w), path)
    check(out, ref, g, gr)


# ----------------------------------------------------------------------------------------------
# Every feature together, against the forms written out; dtypes
# ----------------------------------------------------------------------------------------------

FEATURES = {
    "probs_smoothed_weighted": dict(target_kind="probs", soft_label_smoothing=0.2, soft_logit_scale=0.5, weighted=True),
    "log_probs_kl_reverse_softcap": dict(target_kind="log_probs", soft_kl=True, reverse_kl=0.3, softcap=4.0,
                                         logit_scale=0.8),
    "logits_labels_z_two_scales": dict(target_kind="logits", target_logit_scale=0.5, soft_logit_scale=0.25,
                                       soft_kl=True, soft_scale=2.0, scale=0.5, label_smoothing=0.1,
                                       smoothing="others", z_loss=1e-2, labels=True),
    "mixup_and_target": dict(target_kind="probs", scale=0.7, soft_scale=0.3, label_smoothing=0.1, z_loss=1e-3,
                             labels=True, mixup=True, weighted=True),
    "label_kl_masked_rows": dict(target_kind="logits", kl=True, label_smoothing=0.2, scale=1.0, labels=True,
                                 target_rows=True, reverse_kl=0.5),
}


def make(feature, shape=(6, 21), seed=30):
    spec = dict(FEATURES[feature])
    N, V = shape[0], shape[1]
    rows = (N,) + tuple(shape[2:])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    t = torch.randn(shape, generator=g) * 2
    if spec["target_kind"] == "probs":
        t = torch.softmax(t, 1)
    elif spec["target_kind"] == "log_probs":
        t = torch.log_softmax(t, 1)
    tensors = dict(x=x, t=t)
    if spec.pop("labels", False):
        y = torch.randint(0, V, rows, generator=g)
        y.view(-1)[::3] = -100
        tensors["y"] = y
    if spec.pop("mixup", False):
        tensors["yb"] = torch.randint(0, V, rows, generator=g)
        tensors["lam"] = torch.rand(rows, generator=g)
    if spec.pop("weighted", False):
        tensors["w"] = torch.rand(V, generator=g) + 0.5
    if spec.pop("target_rows", False):
        tensors["rows"] = torch.rand(rows, generator=g) > 0.3
    return tensors, spec


def _call(fn, reduction, spec):
    def run(x, t, y=None, yb=None, lam=None, w=None, rows=None):
        return fn(x, t, y, w, labels_b=yb, lam=lam, target_rows=rows, reduction=reduction, **spec)

    return run


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_features_against_the_forms(path, feature, reduction):
    tensors, spec = make(feature)
    tensors["x"].requires_grad_()
    tensors["t"].requires_grad_(True)
    out, ref, g, gr = run_pair(_call(fused_soft_cross_entropy, reduction, spec),
                               _call(soft_reference, reduction, spec), tensors, path)
    check(out, ref, g, gr)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs(path, dtype):
    # The op reads 16-bit logits and targets as they are and computes in fp32; the loss comes back in
    # the logits' dtype (eager's probability-target CE also rounds its log_softmax to it) or the
    # user's upcast dtype, the gradient once in each input's dtype.
    tensors, spec = make("logits_labels_z_two_scales", seed=31)
    tensors["x"].requires_grad_()
    out, ref, g, gr = run_pair(_call(fused_soft_cross_entropy, "mean", spec), _call(soft_reference, "mean", spec),
                               tensors, path, dtype=dtype, grad_output=torch.tensor(1.0, dtype=torch.float64))
    check(out, ref, g, gr, dtype)
    out32, ref, _, _ = run_pair(_call(fused_soft_cross_entropy, "mean", dict(spec, loss_dtype=torch.float32)),
                                _call(soft_reference, "mean", spec), tensors, path, dtype=dtype)
    check(out32, ref, [], [], torch.float32)


def test_float64_is_exact(device):
    tensors, spec = make("mixup_and_target", seed=32)
    tensors["x"].requires_grad_()
    tensors["t"].requires_grad_()
    out, ref, g, gr = run_pair(_call(fused_soft_cross_entropy, "sum", spec), _call(soft_reference, "sum", spec),
                               tensors, device, dtype=torch.float64)
    check(out, ref, g, gr, torch.float64)


# ----------------------------------------------------------------------------------------------
# Where the gradient is computed
# ----------------------------------------------------------------------------------------------


def test_gradient_placement_by_bytes_moved():
    x16, x32 = torch.empty(2, 3, dtype=torch.bfloat16), torch.empty(2, 3)
    t16, t32 = torch.empty(2, 3, dtype=torch.bfloat16), torch.empty(2, 3)
    # eager, a scalar loss: backward's scaling is skipped for loss.backward()'s 1
    assert gradient_in_forward(x32, None, "mean", scaled=False)
    # scaled (traced, or 'none'): forward iff 2 G <= R
    assert gradient_in_forward(x16, t16, "mean", scaled=True)  # 4 <= 4: a tie holds less memory
    assert gradient_in_forward(x16, t32, "mean", scaled=True)  # 4 <= 6
    assert not gradient_in_forward(x32, t16, "mean", scaled=True)  # 8 > 6
    assert not gradient_in_forward(x32, None, "mean", scaled=True)  # labels only: 3 N V against 4
    assert not gradient_in_forward(x32, None, "none", scaled=False)


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _gradient_arg(fn, *args):
    with RecordOps() as rec:
        fn(*args)
    (op_args,) = [a for f, a in rec.calls if f is torch.ops.smoothce.soft_cross_entropy.default]
    return op_args[-1]


def test_gradient_placement_per_call():
    x = torch.randn(4, 6, requires_grad=True)
    t, y = torch.rand(4, 6), torch.randint(0, 6, (4,))
    assert _gradient_arg(lambda: fused_soft_cross_entropy(x, t)) == "forward"
    assert _gradient_arg(lambda: fused_soft_cross_entropy(x, t, reduction="none")) == "forward"  # 8 <= 8
    assert _gradient_arg(lambda: fused_soft_cross_entropy(x, None, y, scale=1.0, reduction="none")) == "backward"
    assert _gradient_arg(lambda: fused_soft_cross_entropy(x, t.requires_grad_())) == "backward"  # the target's too
    with torch.no_grad():
        assert _gradient_arg(lambda: fused_soft_cross_entropy(x, t)) == "none"


@pytest.mark.parametrize("feature", list(FEATURES))
def test_gradient_in_backward_equals_gradient_in_forward(path, feature):
    # The op called directly with each placement: same loss, same gradient (for a grad_output != 1).
    tensors, spec = make(feature, seed=33)
    form = dict(spec)
    x, t = tensors["x"].to(path).requires_grad_(), tensors["t"].to(path)
    others = [tensors.get(k) for k in ("y", "yb", "lam", "w", "rows")]
    others = [o.to(path) if o is not None else None for o in others]
    kw = {k: form.pop(k) for k in list(form) if k in _SOFT_FIELDS}
    loss_words = smoothce.kernels.form.LossForm(**{"scale": 0.0, **form}).as_args()
    soft_words = smoothce.kernels.form.SoftTargetForm(**kw).as_args()
    results = []
    for gradient in ("forward", "backward"):
        loss, _, _ = torch.ops.smoothce.soft_cross_entropy(x, t, others[0], others[1], others[2], others[3],
                                                           others[4], *loss_words, *soft_words, None, gradient)
        (g,) = torch.autograd.grad(loss * 0.75, x)
        results.append((loss.detach().cpu(), g.cpu()))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-6)


_SOFT_FIELDS = {"target_kind", "target_logit_scale", "soft_logit_scale", "soft_label_smoothing", "soft_scale",
                "soft_kl", "reverse_kl"}


def test_eager_backward_reuses_the_stored_gradient():
    x = torch.randn(4, 10, requires_grad=True)
    t = torch.softmax(torch.randn(4, 10), 1)
    with RecordOps() as rec:
        loss = fused_soft_cross_entropy(x, t, soft_kl=True)
    (args,) = [a for f, a in rec.calls if f is torch.ops.smoothce.soft_cross_entropy.default]
    del rec
    loss.backward()
    ref = torch.autograd.grad(F.kl_div(F.log_softmax(x, 1), t, reduction="sum") / 4, x)[0]
    torch.testing.assert_close(x.grad, ref)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss2 = fused_soft_cross_entropy(x, t, soft_kl=True)
        loss2.backward(retain_graph=True)
        loss2.backward()


# ----------------------------------------------------------------------------------------------
# Rows that count nowhere, bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.filterwarnings("ignore:divide by zero")
def test_every_row_masked_mean_is_nan_with_zero_gradient(path):
    x = torch.randn(3, 5, device=path, requires_grad=True)
    y = torch.full((3,), -100, device=path)
    t = torch.randn(3, 5, device=path)
    out = fused_soft_cross_entropy(x, t, y, target_kind="logits", scale=1.0)
    assert out.isnan()  # as torchtune's sum over no valid token / 0 and F.cross_entropy's mean
    (g,) = torch.autograd.grad(out, x)
    assert (g == 0).all()
    assert fused_soft_cross_entropy(x, t, y, target_kind="logits", reduction="sum").item() == 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_row_that_counts_nowhere_is_exactly_zero(path):
    # A masked row whose terms are nan (a probability of 0 against a logit of -inf) adds an exact 0,
    # as F.cross_entropy's ignored rows and torchtune's masked tokens do, not 0 * nan.
    x = torch.randn(3, 6, device=path)
    x[1, 2] = float("-inf")
    t = torch.softmax(torch.randn(3, 6, device=path), 1)
    t[1, 2] = 0.0
    y = torch.tensor([0, -100, 3], device=path)
    out = fused_soft_cross_entropy(x, t, y, scale=1.0, label_smoothing=0.1, reduction="none")
    assert out[1].item() == 0.0 and out.isfinite().all()
    assert fused_soft_cross_entropy(x, t, y, scale=1.0, reduction="sum").isfinite()
    assert fused_soft_cross_entropy(x, t, reduction="none")[1].isnan()  # counted, it is nan, as in eager


def test_out_of_range_label_raises_on_cpu():
    x, t = torch.randn(3, 5), torch.rand(3, 5)
    with pytest.raises(IndexError, match="target 5 is out of bounds for 5 classes"):
        fused_soft_cross_entropy(x, t, torch.tensor([0, 5, 1]), scale=1.0)
    # labels that only mask the target's rows are not read as classes
    fused_soft_cross_entropy(x, t, torch.tensor([0, 5, -100]))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(target=torch.zeros(3, 4, dtype=torch.long)), TypeError, "target dtype torch.int64 must be floating"),
        (dict(target=torch.full((3, 5), 0.2)), ValueError, r"target shape \(3, 5\) must equal the logits' shape \(3, 4\)"),
        (dict(labels_b=torch.zeros(3, dtype=torch.long)), ValueError, "labels_b and lam go together"),
        (dict(lam=torch.full((3,), 0.5).requires_grad_(), labels_b=torch.zeros(3, dtype=torch.long)), ValueError,
         "lam that requires grad"),
        (dict(lam=torch.full((2,), 0.5), labels_b=torch.zeros(3, dtype=torch.long)), ValueError, r"lam shape \(2,\)"),
        (dict(target_kind="logp"), ValueError, "target_kind='logp' is not one of"),
        (dict(target_logit_scale=0.5), ValueError, "target_logit_scale=0.5 needs target_kind='logits'"),
        (dict(soft_label_smoothing=0.1, soft_kl=True), ValueError, "soft_label_smoothing applies to a cross-entropy"),
        (dict(soft_kl=True, weight=torch.ones(4)), ValueError, "class weights with a KL divergence"),
        (dict(soft_logit_scale=0.0), ValueError, "soft_logit_scale=0.0 must be > 0"),
        (dict(target_rows=torch.ones(3)), TypeError, "target_rows must be a bool tensor"),
        (dict(reverse_kl=float("inf")), ValueError, "reverse_kl=inf must be finite"),
    ],
)
def test_bad_input_is_named(kwargs, error, message):
    kwargs = dict(kwargs)
    target = kwargs.pop("target", torch.rand(3, 4))
    labels = torch.zeros(3, dtype=torch.long) if "labels_b" in kwargs else None
    with pytest.raises(error, match=message):
        fused_soft_cross_entropy(torch.randn(3, 4), target, labels, **kwargs)


# ----------------------------------------------------------------------------------------------
# The ops under torch.library.opcheck and torch.compile
# ----------------------------------------------------------------------------------------------


def _op_case(feature, gradient, seed, reduction="mean"):
    tensors, spec = make(feature, shape=(4, 7), seed=seed)
    spec = dict(spec)
    soft = smoothce.kernels.form.SoftTargetForm(**{k: spec.pop(k) for k in list(spec) if k in _SOFT_FIELDS})
    form = smoothce.kernels.form.LossForm(**{"scale": 0.0, "reduction": reduction, **spec})
    x = tensors["x"].requires_grad_(gradient != "none")
    t = tensors["t"].requires_grad_(gradient == "backward")
    return (x, t, tensors.get("y"), tensors.get("yb"), tensors.get("lam"), tensors.get("w"), tensors.get("rows"),
            *form.as_args(), *soft.as_args(), None, gradient)


OPCHECK_CASES = [
    _op_case("probs_smoothed_weighted", "forward", 40),
    _op_case("log_probs_kl_reverse_softcap", "backward", 41, "none"),
    _op_case("logits_labels_z_two_scales", "backward", 42, "sum"),
    _op_case("mixup_and_target", "forward", 43, "none"),
    _op_case("label_kl_masked_rows", "none", 44),
]


@pytest.mark.parametrize("args", OPCHECK_CASES)
def test_opcheck(path, args):
    args = tuple(a.detach().to(path).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    if args[-1] == "forward":
        # Eager backward scales the stored gradient in place (it becomes the logits' gradient); opcheck
        # compares the outputs after a backward whose cotangent is the sign of the loss: seeded so it is +1.
        assert torch.ops.smoothce.soft_cross_entropy.default(*args)[0].sum() > 0, "reseed: cotangent -1"
    torch.library.opcheck(torch.ops.smoothce.soft_cross_entropy.default, args)


def _distill(s, t, y):
    return fused_soft_cross_entropy(s, t, y, target_kind="logits", target_logit_scale=0.5, soft_logit_scale=0.5,
                                    soft_kl=True, soft_scale=2.0, scale=0.5, label_smoothing=0.1) * 3.0


@pytest.mark.parametrize(
    "backend, dynamic",
    [
        ("eager", False),
        ("aot_eager", False),
        ("aot_eager", True),
        pytest.param("inductor", False, marks=pytest.mark.inductor),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile(backend, dynamic, dtype):
    # bf16 logits and teacher: the gradient in forward; fp32 logits and teacher too (2 G = R).
    fn = torch.compile(_distill, backend=backend, dynamic=dynamic, fullgraph=True)
    for N in (6, 9):
        s = _seeded(N, 13, seed=N).to(dtype).requires_grad_()
        t = _seeded(N, 13, seed=N + 1).to(dtype)
        y = _labels(N, seed=N + 2, classes=13)
        y[0] = -100
        out = fn(s, t, y)
        (g,) = torch.autograd.grad(out, s)
        ref = 3.0 * soft_reference(s.detach().double().requires_grad_(), t.double(), y, target_kind="logits",
                                   target_logit_scale=0.5, soft_logit_scale=0.5, soft_kl=True, soft_scale=2.0,
                                   scale=0.5, label_smoothing=0.1)
        x64 = s.detach().double().requires_grad_()
        ref = 3.0 * soft_reference(x64, t.double(), y, target_kind="logits", target_logit_scale=0.5,
                                   soft_logit_scale=0.5, soft_kl=True, soft_scale=2.0, scale=0.5, label_smoothing=0.1)
        (gr,) = torch.autograd.grad(ref, x64)
        check(out.detach(), ref.detach(), [g], [gr], dtype)


def test_compiled_labels_only_call_defers_the_gradient():
    # Traced, a call without a target reads only the logits: its gradient goes to backward (3 N V).
    def mixup(x, ya, yb, lam):
        return fused_soft_cross_entropy(x, None, ya, labels_b=yb, lam=lam, scale=1.0)

    graphs = []

    def backend(gm, example_inputs):
        from torch._functorch.aot_autograd import aot_module_simplified

        def fw(g, _):
            graphs.append(g)
            return g

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw, bw_compiler=fw)

    x = torch.randn(5, 8, requires_grad=True)
    ya, yb, lam = torch.randint(0, 8, (5,)), torch.randint(0, 8, (5,)), torch.tensor(0.3)
    out = torch.compile(mixup, backend=backend, fullgraph=True)(x, ya, yb, lam)
    out.backward()
    ref = 0.3 * F.cross_entropy(x, ya) + 0.7 * F.cross_entropy(x, yb)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, torch.autograd.grad(ref, x)[0])
    fw_code, bw_code = graphs[0].code, graphs[1].code
    assert "'backward'" in fw_code and "soft_cross_entropy_backward" in bw_code
