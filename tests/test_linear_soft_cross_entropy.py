"""smoothce::linear_soft_cross_entropy against eager PyTorch (F.linear, then the loss against the
distribution written out, tests/reference.py's soft_reference) in float64.

The ``path`` fixture runs both: the soft op's torch kernel on CPU tensors, and its Triton kernel on
CUDA tensors where a GPU is, through the interpreter on CPU tensors where none is.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from reference import soft_reference
from test_linear_cross_entropy import step_peak_bytes

from smoothce.kernels.linear_soft_cross_entropy import fused_linear_soft_cross_entropy

N, D, DT, V = 13, 8, 6, 11  # 13 rows: chunks of 4 leave a ragged last one
CHUNK = 4
T = 2.0  # a distillation temperature


@pytest.fixture(params=["torch", "triton"])
def path(request, monkeypatch):
    """Where the op runs; fails the test if the Triton path was asked for and its kernel did not run."""
    monkeypatch.setenv("SMOOTHCE_KERNEL", request.param)
    if request.param == "torch":
        yield torch.device("cpu")
        return
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel on CPU tensors needs the interpreter")
    import smoothce.kernels.soft_cross_entropy_triton as triton_kernel

    launches = []
    launch = triton_kernel.launch_soft_cross_entropy
    monkeypatch.setattr(triton_kernel, "launch_soft_cross_entropy",
                        lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    yield torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert launches, "the Triton kernel did not run"


def make(seed=0, n=N, rows=None, teacher_bias=True):
    """Student (hidden, weight, bias), teacher (hidden, weight, bias), labels with ignored rows, in float64."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or (n,)
    h = torch.randn(*rows, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D) * 3
    b = torch.randn(V, generator=g, dtype=torch.float64)
    th = torch.randn(*rows, DT, generator=g, dtype=torch.float64)
    tw = torch.randn(V, DT, generator=g, dtype=torch.float64) / math.sqrt(DT) * 3
    tb = torch.randn(V, generator=g, dtype=torch.float64) if teacher_bias else None
    y = torch.randint(0, V, rows, generator=g)
    y.view(-1)[[1, 5, -1]] = -100  # one ignored row in the last, ragged chunk too
    return (h, w, b), (th, tw, tb), y


# What each case gives the op besides the student's head: the target ("teacher": the teacher's head;
# "logits" / "probs" / "log_probs": a tensor of that kind made from the teacher's logits) and the words.
HINTON = dict(scale=0.5, target_kind="logits", target_logit_scale=1 / T, soft_logit_scale=1 / T,
              soft_scale=0.5 * T * T, soft_kl=True)  # 0.5 CE(labels) + 0.5 T**2 KL(teacher_T || student_T)
CASES = {
    "hinton, teacher head": ("teacher", True, HINTON),
    "hinton, teacher logits": ("logits", True, HINTON),
    "probability targets, smoothing, class weights": ("probs", False, dict(soft_label_smoothing=0.1, weighted=True)),
    "kl_div log_target, labels mask the rows": ("log_probs", True, dict(soft_kl=True)),
    "symmetric KL, target_rows": ("probs", False, dict(soft_kl=True, reverse_kl=0.5, target_rows=True)),
    "labels with smoothing, z-loss, softcap": ("teacher", True, dict(scale=1.0, label_smoothing=0.1, z_loss=1e-3,
                                                                      softcap=5.0, logit_scale=0.8,
                                                                      target_kind="logits", soft_logit_scale=0.5)),
}


def case_inputs(case, seed=0, rows=None):
    """(the op's tensors without the student head, the words, the reference's target) in float64."""
    kind, labelled, words = CASES[case]
    words = dict(words)
    (h, w, b), (th, tw, tb), y = make(seed, rows=rows)
    teacher = F.linear(th, tw, tb)
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    if kind == "teacher":
        tensors.update(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
        target = teacher
    else:
        target = {"logits": teacher, "probs": torch.softmax(teacher, -1),
                  "log_probs": torch.log_softmax(teacher, -1)}[kind]
        tensors["target"] = target
        words.setdefault("target_kind", kind)
    if labelled:
        tensors["labels"] = y
    if words.pop("weighted", False):
        tensors["class_weight"] = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    if words.pop("target_rows", False):
        tensors["target_rows"] = torch.rand(y.shape, generator=g) > 0.3
    return (h, w, b), tensors, words, target


def run(case, path, reduction, dtype, chunk_size=CHUNK, rows=None, seed=0):
    """(loss, gradients of hidden / weight / bias) of the op in ``dtype`` on ``path``, and the float64
    reference's, for a random grad_output."""
    (h, w, b), tensors, words, target = case_inputs(case, seed, rows)
    ours = [t.to(path, dtype).requires_grad_() for t in (h, w, b)]
    theirs = [t.to(dtype).double().requires_grad_() for t in (h, w, b)]  # the values the op reads
    moved = {k: t.to(path, dtype) if t.is_floating_point() else t.to(path) for k, t in tensors.items()}
    rounded = {k: t.to(dtype).double() if t.is_floating_point() else t for k, t in tensors.items()}
    loss = fused_linear_soft_cross_entropy(*ours, reduction=reduction, chunk_size=chunk_size, **moved, **words)
    if "teacher_hidden" in rounded:
        ref_target = F.linear(rounded.pop("teacher_hidden"), rounded.pop("teacher_weight"), rounded.pop("teacher_bias"))
    else:
        ref_target = rounded.pop("target")
    # the reference takes the classes at dim 1
    ref = soft_reference(F.linear(*theirs).movedim(-1, 1), ref_target.movedim(-1, 1), rounded.pop("labels", None),
                         rounded.pop("class_weight", None), reduction=reduction, **rounded, **words)
    go = torch.rand(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, ours, go.to(path, loss.dtype))
    ref_grads = torch.autograd.grad(ref, theirs, go)
    return (loss, *grads), (ref, *ref_grads)


def check(got, want, tol):
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.detach().cpu().double(), r.detach(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager(path, case, reduction):
    got, want = run(case, path, reduction, torch.float64)
    check(got, want, 1e-10)


@pytest.mark.parametrize("case", ["hinton, teacher head", "symmetric KL, target_rows"])
def test_float32(path, case):
    got, want = run(case, path, "mean", torch.float32)
    check(got, want, 2e-5)


def test_bfloat16_reads_the_logits_f_linear_rounds():
    # A 16-bit head's loss is that of the rounded logits F.linear returns (the reference rounds
    # them too); its gradients come out of fp32 math, rounded once.
    (h, w, b), tensors, words, _ = case_inputs("hinton, teacher head")
    bf = [t.bfloat16().requires_grad_() for t in (h, w, b)]
    teacher = {k: t.bfloat16() if t.is_floating_point() else t for k, t in tensors.items()}
    loss = fused_linear_soft_cross_entropy(*bf, chunk_size=CHUNK, **teacher, **words)
    ref64 = [t.detach().double().requires_grad_() for t in bf]
    logits = F.linear(*bf).double()  # rounded to bf16 as F.linear rounds
    ref_t = F.linear(teacher["teacher_hidden"], teacher["teacher_weight"], teacher["teacher_bias"]).double()
    ref = soft_reference(logits.detach().requires_grad_(), ref_t, tensors["labels"], **words)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-2, rtol=2e-2)
    assert loss.dtype == torch.bfloat16
    ref_full = soft_reference(F.linear(*ref64), ref_t, tensors["labels"], **words)
    for g, r in zip(torch.autograd.grad(loss, bf), torch.autograd.grad(ref_full, ref64)):
        torch.testing.assert_close(g.double(), r, atol=2e-2 * max(1.0, r.abs().max().item()), rtol=2e-2)


@pytest.mark.parametrize("chunk_size", [1, 5, 13, None])  # one row each, ragged, one chunk, the rule's
def test_chunk_sizes(chunk_size):
    got, want = run("hinton, teacher head", "cpu", "mean", torch.float64, chunk_size=chunk_size)
    check(got, want, 1e-10)


def test_leading_dims():
    got, want = run("hinton, teacher head", "cpu", "none", torch.float64, rows=(3, 5))
    assert got[0].shape == (3, 5)
    check(got, want, 1e-10)


def test_mixup_labels_beside_the_target():
    (h, w, b), tensors, words, target = case_inputs("probability targets, smoothing, class weights")
    g = torch.Generator().manual_seed(3)
    mix = dict(labels=torch.randint(0, V, (N,), generator=g), labels_b=torch.randint(0, V, (N,), generator=g),
               lam=torch.tensor(0.3, dtype=torch.float64), scale=1.0, label_smoothing=0.1)
    hw = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = fused_linear_soft_cross_entropy(*hw, chunk_size=CHUNK, **tensors, **words, **mix)
    ref64 = [t.clone().requires_grad_() for t in (h, w, b)]
    ref = soft_reference(F.linear(*ref64), target, mix.pop("labels"), tensors["class_weight"], **mix, **words)
    check((loss, *torch.autograd.grad(loss, hw)), (ref, *torch.autograd.grad(ref, ref64)), 1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mixup_labels_alone(reduction):
    # no target: mixup's two labels on a classifier's head, lam a number or one per row
    (h, w, b), _, _ = make()
    g = torch.Generator().manual_seed(4)
    ya, yb = torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (N,), generator=g)
    ya[3] = -100
    for lam in (0.3, torch.rand(N, generator=g, dtype=torch.float64)):
        words = dict(labels_b=yb, scale=1.0, label_smoothing=0.1, reduction=reduction)
        hw = [t.clone().requires_grad_() for t in (h, w, b)]
        loss = fused_linear_soft_cross_entropy(*hw, None, ya, lam=lam, chunk_size=CHUNK, **words)
        ref64 = [t.clone().requires_grad_() for t in (h, w, b)]
        ref = soft_reference(F.linear(*ref64), None, ya, lam=torch.as_tensor(lam, dtype=torch.float64), **words)
        go = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
        check((loss, *torch.autograd.grad(loss, hw, go)), (ref, *torch.autograd.grad(ref, ref64, go)), 1e-10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_step_holds_chunks_not_logits(reduction):
    # A step (forward and backward) holds the gradients it returns, a few chunk-sized buffers and
    # per-row vectors: neither the student's nor the teacher's N x V logits exist (each would be
    # four times the whole bound here).
    n, v, d, rows = 256, 512, 8, 8
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g).requires_grad_()
    th, tw = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)

    def step():
        loss = fused_linear_soft_cross_entropy(h, w, None, labels=y, teacher_hidden=th, teacher_weight=tw,
                                               reduction=reduction, chunk_size=rows, **HINTON)
        loss.backward(torch.ones_like(loss))

    step()
    h.grad = w.grad = None
    peak = step_peak_bytes(step, torch.device("cpu"))
    gradients, chunk, vectors = 4 * (v * d + n * d), 4 * rows * v, 256 * n
    logits = 4 * n * v
    assert gradients <= peak <= gradients + 8 * chunk + vectors < logits


@pytest.mark.parametrize("change,error,match", [
    (dict(teacher_hidden=torch.zeros(N, DT), teacher_weight=torch.zeros(V, DT)), ValueError, "not both"),
    (dict(target=torch.zeros(N, V + 1)), ValueError, r"shape \(13, 11\), got torch.float32 \(13, 12\)"),
    (dict(target=torch.zeros(N, V, requires_grad=True)), ValueError, "gives the target .* no gradient"),
    (dict(target=None, teacher_hidden=torch.zeros(N, DT), teacher_weight=torch.zeros(V, DT), target_kind="probs"),
     ValueError, "target_kind must be 'logits'"),
    (dict(target=None, teacher_hidden=torch.zeros(N + 1, DT), teacher_weight=torch.zeros(V, DT),
          target_kind="logits"), ValueError, r"teacher_hidden's rows \(14,\) must equal hidden's \(13,\)"),
    (dict(target=None, teacher_hidden=torch.zeros(N, DT), teacher_weight=torch.zeros(V + 1, DT),
          target_kind="logits"), ValueError, r"teacher_weight \(11, D\) do not fit"),
    (dict(weight=torch.zeros(V, D + 1)), ValueError, r"hidden \(13, 8\), weight \(11, 9\)"),
    (dict(class_weight=torch.ones(V), soft_kl=True), ValueError, "class weights with a KL"),
    (dict(chunk_size=0), ValueError, "chunk_size=0 must be a positive int or None"),
])
def test_validation(change, error, match):
    args = dict(hidden=torch.randn(N, D), weight=torch.randn(V, D), target=torch.rand(N, V))
    args.update(change)
    with pytest.raises(error, match=match):
        fused_linear_soft_cross_entropy(args.pop("hidden"), args.pop("weight"), **args)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_opcheck(reduction):
    (h, w, b), (th, tw, tb), y = make()
    h, w, b, th, tw, tb = (t.float() for t in (h, w, b, th, tw, tb))
    # hidden, weight, bias, target, teacher head, labels, labels_b, lam, class_weight, target_rows,
    # LossForm, SoftTargetForm, loss_dtype, compute_grad, chunk_size
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), None, th, tw, tb, y, None, None, None, None,
            -100, reduction, 0.0, "all", 0.5, False, 0.0, None, 1.0, "logits", 1 / T, 1 / T, 0.0, 2.0, True, 0.0,
            None, True, CHUNK)
    torch.library.opcheck(torch.ops.smoothce.linear_soft_cross_entropy.default, args)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_compile_aot_eager(reduction):
    (h, w, b), tensors, words, _ = case_inputs("hinton, teacher head")
    step = torch.compile(lambda *hwb: fused_linear_soft_cross_entropy(*hwb, reduction=reduction, chunk_size=CHUNK,
                                                                      **tensors, **words),
                         backend="aot_eager", fullgraph=True)
    ours = [t.clone().requires_grad_() for t in (h, w, b)]
    eager = [t.clone().requires_grad_() for t in (h, w, b)]
    got = step(*ours)
    want = fused_linear_soft_cross_entropy(*eager, reduction=reduction, chunk_size=CHUNK, **tensors, **words)
    go = torch.rand(got.shape, dtype=torch.float64) + 0.5
    check((got, *torch.autograd.grad(got, ours, go)), (want, *torch.autograd.grad(want, eager, go)), 1e-12)
