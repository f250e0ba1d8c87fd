"""The detector on a student's head feeding a loss against a distribution: the head and the loss
become one fused_linear_soft_cross_entropy call, and a teacher's head in the same graph without
grad (the teacher under torch.no_grad()) is fused into it as well.

Each case compiles a small model through the detector (then aot_eager, tests/rewrite_check.py) and
compares its loss and the gradients of the student's input, weight and bias with a float64 copy
of the model run eagerly.
"""

import copy
import inspect
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase

from rewrite_check import B, N, T, V, check, labels, logits, normalize
from smoothce.kernels.linear_soft_cross_entropy import fused_linear_soft_cross_entropy
from smoothce.patterns.cross_entropy import rewrite_cross_entropy
from smoothce.patterns.ops import op_name

FILE = os.path.basename(__file__)
D, DT = 5, 7  # the student's and the teacher's hidden sizes
TEMPERATURE = 2.0


def hinton(s, t, y, alpha=0.5):
    """The PyTorch tutorial's and DistilBERT's loss: a CE on the labels next to KL at T with T**2."""
    T_ = TEMPERATURE
    kd = F.kl_div(F.log_softmax(s / T_, -1), F.softmax(t / T_, -1), reduction="batchmean") * T_ ** 2
    return alpha * F.cross_entropy(s, y) + (1 - alpha) * kd


def forward_kl_masked(s, t, y):
    """torchtune's ForwardKLLoss: the teacher's softmax against the student's log-probs over the
    tokens whose label is kept, (B, T, V) logits seen as rows."""
    q = F.softmax(t, -1)
    lp = F.log_softmax(s, -1)
    x = (q * lp).sum(-1).view(-1)
    mask = (y != -100).view(-1).int()
    return -(x * mask).sum() / mask.sum()


class Distill(nn.Module):
    """A student's head and a teacher's head on their own hidden states, and a loss of both."""

    def __init__(self, loss=hinton, teacher_no_grad=True, return_teacher=False):
        super().__init__()
        self.student = nn.Linear(D, V)
        self.teacher = nn.Linear(DT, V)
        self.loss, self.teacher_no_grad, self.return_teacher = loss, teacher_no_grad, return_teacher

    def forward(self, hs, ht, y):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.teacher_no_grad):
            t = self.teacher(ht)
        loss = self.loss(self.student(hs), t, y)
        return (loss, t) if self.return_teacher else loss


def check_distill(model, rows=(N,), **kwargs):
    """check() of the model on random student and teacher hidden states and labels (some ignored),
    plus the student's weight and bias gradients against a float64 copy of the model."""
    hs, ht = logits(*rows, D, seed=3), logits(*rows, DT, seed=4)
    y = labels(*rows, ignore=-100, where=(2,))
    reference = copy.deepcopy(model).double()
    rec = check(model, hs, ht, y, reference=reference, fuse_linear=True, **kwargs)
    for p, q in ((model.student.weight, reference.student.weight), (model.student.bias, reference.student.bias)):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-5, rtol=1e-5)
    return rec


def fused(gm):
    """The keywords of the one fused_linear_soft_cross_entropy call in gm."""
    (call,) = [n for n in gm.graph.nodes if n.target is fused_linear_soft_cross_entropy]
    return call


def test_hinton_with_the_teacher_head_fused():
    torch.manual_seed(0)
    rec = check_distill(Distill())
    (m,) = rec.result.matches
    assert m.family == "linear+distillation KL + labels"
    line = inspect.getsourcelines(Distill.forward)[1]
    assert (m.params["head"], m.params["teacher_head"]) == (f"{FILE}:{line + 3}", f"{FILE}:{line + 2}")
    call = fused(rec.gm)
    assert call.args[3] is None and call.kwargs["teacher_hidden"] is not None
    assert not any(op_name(n) == "linear" for n in rec.gm.graph.nodes)  # neither head's logits exist


def test_forward_kl_over_tokens():
    # (B, T, V) logits of both heads seen as rows, the mean over kept tokens
    torch.manual_seed(0)
    rec = check_distill(Distill(forward_kl_masked), rows=(B, T))
    assert rec.result.matches[0].family == "linear+distillation cross-entropy"
    assert fused(rec.gm).kwargs["teacher_hidden"] is not None


def test_teacher_logits_given_as_data():
    # the student's head is fused; the teacher's logits are an input, read chunk by chunk
    class FromLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = nn.Linear(D, V)

        def forward(self, hs, t, y):
            return hinton(self.student(hs), t, y)

    torch.manual_seed(0)
    model = FromLogits()
    reference = copy.deepcopy(model).double()
    rec = check(model, logits(N, D, seed=3), logits(N, V, seed=4), labels(N, ignore=-100, where=(2,)),
                reference=reference, fuse_linear=True)
    torch.testing.assert_close(model.student.weight.grad.double(), reference.student.weight.grad, atol=1e-5, rtol=1e-5)
    call = fused(rec.gm)
    assert call.args[3] is not None and "teacher_hidden" not in call.kwargs
    assert "teacher_head" not in rec.result.matches[0].params


def test_teacher_logits_also_returned_keep_the_teacher_head():
    torch.manual_seed(0)
    rec = check_distill(Distill(return_teacher=True))
    call = fused(rec.gm)
    assert call.args[3] is not None and "teacher_hidden" not in call.kwargs
    assert rec.result.near_misses == []


def test_a_teacher_that_trains_keeps_the_student_logits():
    # mutual learning: the target requires grad, which the fused head does not give it; the soft
    # op on the logits does (check() compares the teacher's input gradient too)
    torch.manual_seed(0)
    rec = check_distill(Distill(teacher_no_grad=False), grad=(0, 1))
    (m,) = rec.result.matches
    assert m.family == "distillation KL + labels"
    line = inspect.getsourcelines(Distill.forward)[1]
    (miss,) = rec.result.near_misses
    assert miss.reason == (f"not fused with the linear layer that produces the logits (linear at {FILE}:{line + 3}): "
                           f"its target (linear at {FILE}:{line + 2}) requires grad, and the fused head gives the "
                           "target none")


def test_mixup_of_two_labels_on_a_classifier_head():
    # lam * CE(y_a) + (1 - lam) * CE(y_b) on a Linear's logits: one fused call with both labels
    class Mixup(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = nn.Linear(D, V)

        def forward(self, hs, ya, yb, lam):
            x = self.student(hs)
            return lam * F.cross_entropy(x, ya, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(
                x, yb, label_smoothing=0.1)

    torch.manual_seed(0)
    model = Mixup()
    reference = copy.deepcopy(model).double()
    rec = check(model, logits(N, D, seed=3), labels(N, ignore=-100, where=(2,)), labels(N, seed=7),
                torch.tensor(0.3), reference=reference, fuse_linear=True)
    torch.testing.assert_close(model.student.weight.grad.double(), reference.student.weight.grad, atol=1e-5, rtol=1e-5)
    (m,) = rec.result.matches
    assert m.family == "linear+mixup cross_entropy"
    assert fused(rec.gm).kwargs["labels_b"] is not None


class Goldens(TestCase):
    maxDiff = None

    def test_golden(self):
        torch.manual_seed(0)
        rec = check_distill(Distill())
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_self_modules_teacher_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_teacher_parameters_bias_ : torch.nn.parameter.Parameter, L_ht_ : torch.Tensor, L_self_modules_student_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_student_parameters_bias_ : torch.nn.parameter.Parameter, L_hs_ : torch.Tensor, L_y_ : torch.Tensor):
    l_self_modules_teacher_parameters_weight_ = L_self_modules_teacher_parameters_weight_
    l_self_modules_teacher_parameters_bias_ = L_self_modules_teacher_parameters_bias_
    l_ht_ = L_ht_
    l_self_modules_student_parameters_weight_ = L_self_modules_student_parameters_weight_
    l_self_modules_student_parameters_bias_ = L_self_modules_student_parameters_bias_
    l_hs_ = L_hs_
    l_y_ = L_y_
    _set_grad_enabled = torch._C._set_grad_enabled(False);  _set_grad_enabled = None
    _set_grad_enabled_1 = torch._C._set_grad_enabled(True);  _set_grad_enabled_1 = None
    ones_like = torch.ones_like(l_y_, dtype = torch.bool)
    detach = l_ht_.detach();  l_ht_ = None
    detach_1 = l_self_modules_teacher_parameters_weight_.detach();  l_self_modules_teacher_parameters_weight_ = None
    detach_2 = l_self_modules_teacher_parameters_bias_.detach();  l_self_modules_teacher_parameters_bias_ = None
    fused_linear_soft_cross_entropy = smoothce_kernels_linear_soft_cross_entropy_fused_linear_soft_cross_entropy(l_hs_, l_self_modules_student_parameters_weight_, l_self_modules_student_parameters_bias_, None, l_y_, None, ignore_index = -100, reduction = 'mean', scale = 0.5, target_rows = ones_like, target_kind = 'logits', target_logit_scale = 0.5, soft_logit_scale = 0.5, soft_scale = 2.0, soft_kl = True, teacher_hidden = detach, teacher_weight = detach_1, teacher_bias = detach_2);  l_hs_ = l_self_modules_student_parameters_weight_ = l_self_modules_student_parameters_bias_ = l_y_ = ones_like = detach = detach_1 = detach_2 = None
    return (fused_linear_soft_cross_entropy,)""")


@pytest.mark.inductor
def test_through_inductor():
    """The rewritten graph (the fused call, its autograd, the teacher's detached inputs) under Inductor."""
    from torch._inductor.compile_fx import compile_fx

    results = []

    def backend(gm, inputs):
        results.append(rewrite_cross_entropy(gm))
        return compile_fx(gm, inputs)

    torch.manual_seed(0)
    model = Distill()
    reference = copy.deepcopy(model).double()
    hs, ht, y = logits(N, D, seed=3).requires_grad_(), logits(N, DT, seed=4), labels(N, ignore=-100, where=(2,))
    loss = torch.compile(model, backend=backend, fullgraph=True)(hs, ht, y)
    loss.backward()
    hs64 = hs.detach().double().requires_grad_()
    ref = reference(hs64, ht.double(), y)
    ref.backward()
    assert [m.family for r in results for m in r.matches] == ["linear+distillation KL + labels"]
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs.grad.double(), hs64.grad, atol=1e-5, rtol=1e-5)
    for p, q in ((model.student.weight, reference.student.weight), (model.student.bias, reference.student.bias)):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-5, rtol=1e-5)
