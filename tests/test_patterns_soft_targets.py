"""The detector on losses against a distribution given as data: probability targets, kl_div, distillation.

Every case is compiled through the detector (then aot_eager) and checked against eager PyTorch in
float64 (``rewrite_check.check``): the loss, the student's gradient (and the target's where it
requires grad), one smoothce::soft_cross_entropy call and no log_softmax, softmax or loss call left.
Losses the op does not take are left as written with a near miss in the user's words.
"""

import copy
import inspect
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase

from rewrite_check import EPS, B, N, T, V, Recorder, check, fused_calls, labels, logits, normalize

FILE = os.path.basename(__file__)
TEMPERATURE = 2.0


def probs(*shape, seed=5):
    """A target distribution per row, with exact zeros (0 log 0 in kl_div)."""
    p = torch.softmax(logits(*shape, seed=seed), -1)
    p[..., 1] = 0.0
    return p / p.sum(-1, keepdim=True)


def _soft(rec):
    (m,) = rec.result.matches
    return m


# ------------------------------------------------------------------------------------------------
# F.cross_entropy / nn.CrossEntropyLoss with probability targets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_with_probabilities(reduction, eps, weighted):
    def fn(x, p, w):
        return F.cross_entropy(x, p, weight=w, reduction=reduction, label_smoothing=eps)

    w = torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.5 if weighted else None
    m = _soft(check(fn, logits(N, V), probs(N, V), w))
    assert m.family == "soft-target cross-entropy"
    assert m.params["target"]["tensor"] == "p"
    assert m.params["target"]["reduction"] == reduction
    assert m.params["target"].get("soft_label_smoothing", 0.0) == pytest.approx(eps)
    assert (m.params["weight"] is not None) == weighted


def test_cross_entropy_module_with_probabilities_over_dim_1():
    # K-dimensional input: classes at dim 1, the mean over every position
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    x = logits(B, V, T)
    p = probs(B, T, V).transpose(1, 2)
    m = _soft(check(lambda x, p: loss(x, p), x, p))
    assert m.params["target"]["reduction"] == "mean"


def test_target_that_requires_grad_gets_its_gradient():
    def fn(x, p):
        return F.cross_entropy(x, p, label_smoothing=0.1)

    check(fn, logits(N, V), probs(N, V), grad=(0, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits(dtype):
    def fn(x, t):
        return F.cross_entropy(x.float(), F.softmax(t.float() / TEMPERATURE, -1))

    check(fn, logits(N, V), logits(N, V, seed=9), dtype=dtype)


# ------------------------------------------------------------------------------------------------
# One unbatched row: input (C,), a 0-D label or a (C,) target
# ------------------------------------------------------------------------------------------------

UNBATCHED = {
    "nll_loss": lambda x, y, p, r: F.nll_loss(F.log_softmax(x, 0), y, reduction=r),
    "cross_entropy": lambda x, y, p, r: F.cross_entropy(x, y, label_smoothing=0.1, reduction=r),
    "probabilities": lambda x, y, p, r: F.cross_entropy(x, p, reduction=r),
    "kl_div": lambda x, y, p, r: F.kl_div(F.log_softmax(x, -1), p, reduction={"none": "sum"}.get(r, r)),
}


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("spelling", sorted(UNBATCHED))
def test_one_unbatched_row(spelling, reduction):
    def fn(x, y, p):
        return UNBATCHED[spelling](x, y, p, reduction)

    check(fn, logits(V), torch.tensor(4), probs(V))


def test_one_unbatched_row_with_its_label_ignored():
    # eager's mean over no kept row is nan, its gradient 0: the op's too
    check(lambda x, y: F.nll_loss(F.log_softmax(x, -1), y), logits(V), torch.tensor(-100))


# ------------------------------------------------------------------------------------------------
# Hand-written: timm's SoftTargetCrossEntropy, torchtune's forward KL
# ------------------------------------------------------------------------------------------------


class SoftTargetCrossEntropy(nn.Module):
    """As timm writes it (timm/loss/cross_entropy.py): the loss of its mixup and cutmix targets."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1)
        return loss.mean()


SPELLINGS = {
    "timm": SoftTargetCrossEntropy(),
    "sum over rows": lambda x, p: -(p * x.log_softmax(-1)).sum() / x.shape[0],
    "log of softmax": lambda x, p: (-p * torch.log(torch.softmax(x, 1))).sum(1).mean(),
    "per row": lambda x, p: -(p * F.log_softmax(x, -1)).sum(-1),
    "by hand": lambda x, p: -(p * (x - x.logsumexp(-1, keepdim=True))).sum(-1).mean(),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_hand_written_soft_target_cross_entropy(spelling):
    m = _soft(check(SPELLINGS[spelling], logits(N, V), probs(N, V)))
    assert m.family == "soft-target cross-entropy"


def test_forward_kl_masked_by_labels():
    # torchtune's ForwardKLLoss, without its graph-breaking "no valid token" branch: a soft
    # cross-entropy against the teacher's softmax, averaged over the tokens whose label is kept
    def fn(s, t, y):
        teacher_prob = F.softmax(t, dim=-1, dtype=torch.float32)
        student_logprob = F.log_softmax(s, dim=-1, dtype=torch.float32)
        x = torch.sum(teacher_prob * student_logprob, dim=-1).view(-1)
        mask = (y != -100).int().view(-1)
        return -torch.sum(x * mask, dim=0) / torch.sum(mask, dim=0)

    m = _soft(check(fn, logits(B, T, V), logits(B, T, V, seed=4), labels(B, T, ignore=-100, where=(1, 6))))
    assert m.family == "distillation cross-entropy"
    assert m.params["target"]["reduction"] == "mean"


def _torchtune_forward(s, t, y):
    prod = F.softmax(t, dim=-1, dtype=torch.float32) * F.log_softmax(s, dim=-1, dtype=torch.float32)
    return _over_valid_tokens(torch.sum(prod, dim=-1).view(-1), y)


def _torchtune_reverse(s, t, y):
    # torchtune's ReverseKLLoss, without its inf masks (below) and its "no valid token" branch
    student_prob = F.softmax(s, dim=-1, dtype=torch.float32)
    prod_probs = student_prob * F.log_softmax(t, dim=-1, dtype=torch.float32)
    prod_probs = prod_probs - student_prob * F.log_softmax(s, dim=-1, dtype=torch.float32)
    return _over_valid_tokens(torch.sum(prod_probs, dim=-1).view(-1), y)


def _over_valid_tokens(x, y):
    mask = (y != -100).int().view(-1)
    return -torch.sum(x * mask, dim=0) / torch.sum(mask, dim=0)


TORCHTUNE_KL = {
    "reverse": (_torchtune_reverse, "distillation reverse KL", dict(soft_scale=0.0, reverse_kl=1.0)),
    # SymmetricKLLoss: sym_kl_ratio * forward + (1 - sym_kl_ratio) * reverse, each over the valid tokens
    "symmetric": (lambda s, t, y: 0.3 * _torchtune_forward(s, t, y) + 0.7 * _torchtune_reverse(s, t, y),
                  "distillation symmetric KL", dict(soft_scale=0.3, reverse_kl=0.7)),
}


@pytest.mark.parametrize("kind", sorted(TORCHTUNE_KL))
def test_torchtune_reverse_and_symmetric_kl(kind):
    fn, family, words = TORCHTUNE_KL[kind]
    m = _soft(check(fn, logits(B, T, V), logits(B, T, V, seed=4), labels(B, T, ignore=-100, where=(1, 6))))
    assert m.family == family
    assert {k: m.params["target"][k] for k in words} == words
    assert m.params["target"]["reduction"] == "mean"


REVERSE_SPELLINGS = {
    # p (log p - log q) at a temperature, with its T**2
    "by hand": lambda s, t: (F.softmax(s / 2, -1) * (F.log_softmax(s / 2, -1) - F.log_softmax(t / 2, -1))
                             ).sum(-1).mean() * 4,
    # kl_div with the student's log-probs as its target: KL(p_student || p_teacher)
    "kl_div": lambda s, t: F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True,
                                    reduction="batchmean"),
}


@pytest.mark.parametrize("spelling", sorted(REVERSE_SPELLINGS))
def test_reverse_kl_spellings(spelling):
    m = _soft(check(REVERSE_SPELLINGS[spelling], logits(N, V), logits(N, V, seed=4)))
    assert m.family == "distillation reverse KL"
    assert m.params["target"]["tensor"] == "t"


def test_torchtune_kl_with_its_inf_masks_is_left_alone():
    # as torchtune writes it: products zeroed where a logit is infinite, which the op does not skip
    def fn(s, t, y):
        inf_mask = torch.isinf(s) | torch.isinf(t)
        student_prob = F.softmax(s, dim=-1, dtype=torch.float32)
        prod_probs = torch.masked_fill(student_prob * F.log_softmax(t, dim=-1, dtype=torch.float32), inf_mask, 0)
        prod_probs -= torch.masked_fill(student_prob * F.log_softmax(s, dim=-1, dtype=torch.float32), inf_mask, 0)
        return _over_valid_tokens(torch.sum(prod_probs, dim=-1).view(-1), y)

    line = inspect.getsourcelines(fn)[1] + 4  # the last of the two
    assert _unchanged(fn, logits(B, T, V), logits(B, T, V, seed=4), labels(B, T, ignore=-100)) == [
        f"the products are zeroed where a logit is infinite (masked_fill at {FILE}:{line}): the op keeps infinite "
        "logits in its sums, so the loss is left as written; with finite logits this masked_fill changes nothing, "
        "and without it the loss is rewritten"]


# ------------------------------------------------------------------------------------------------
# F.kl_div / nn.KLDivLoss over log_softmax, with and without log_target
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_against_a_tensor(reduction, log_target):
    def fn(x, p):
        return F.kl_div(F.log_softmax(x, -1), p.log() if log_target else p, reduction=reduction,
                        log_target=log_target)

    p = probs(N, V) if not log_target else torch.softmax(logits(N, V, seed=5), -1)  # log 0 = -inf
    m = _soft(check(fn, logits(N, V), p))
    assert m.family == "soft-target KL"
    assert m.params["target"]["soft_kl"] is True


def test_kl_div_batchmean_of_3d_input_divides_by_the_batch():
    def fn(x, p):
        return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(x, -1), p)

    check(fn, logits(B, T, V), probs(B, T, V))


# ------------------------------------------------------------------------------------------------
# Knowledge distillation
# ------------------------------------------------------------------------------------------------


def hinton(s, t):
    T_ = TEMPERATURE
    return F.kl_div(F.log_softmax(s / T_, dim=-1), F.softmax(t / T_, dim=-1), reduction="batchmean") * T_ ** 2


def hinton_log_target(s, t):
    T_ = TEMPERATURE
    return nn.KLDivLoss(reduction="batchmean", log_target=True)(
        F.log_softmax(s / T_, dim=1), F.log_softmax(t / T_, dim=1)) * (T_ * T_)


def hinton_with_labels(s, t, y, alpha=0.3):
    # DistilBERT's and the PyTorch tutorial's: a CE on the labels at temperature 1 next to the KL at T
    return alpha * F.cross_entropy(s, y, label_smoothing=0.1) + (1 - alpha) * hinton(s, t)


def sharpened_teacher(s, t, y):
    # teacher-student cross-entropy against a sharpened teacher softmax, plus the labels' CE
    return F.cross_entropy(s, F.softmax(t / 0.5, -1)) + F.cross_entropy(s, y)


@pytest.mark.parametrize("fn", [hinton, hinton_log_target], ids=lambda f: f.__name__)
def test_hinton_distillation(fn):
    m = _soft(check(fn, logits(N, V), logits(N, V, seed=4)))
    assert m.family == "distillation KL"
    words = m.params["target"]
    assert (words["temperature"], words["soft_scale"], words["soft_kl"]) == (TEMPERATURE, TEMPERATURE ** 2, True)
    assert m.params["logit_scale"] == 1 / TEMPERATURE  # the student at T


@pytest.mark.parametrize("fn", [hinton_with_labels, sharpened_teacher], ids=lambda f: f.__name__)
def test_distillation_next_to_the_labels_is_one_call(fn):
    # the labels' CE (mean over kept labels) and the KL (batchmean over every row): one op call
    m = _soft(check(fn, logits(N, V), logits(N, V, seed=4), labels(N, ignore=-100, where=(2,))))
    assert m.family.endswith("+ labels")
    assert m.params.get("calls", 1) == 1


@pytest.mark.parametrize("order", ["log q - log p", "-(log p - log q)"])
def test_kl_written_by_hand(order):
    # the tutorial's KL: the log-probs of the logits without grad (the teacher's) are the target's
    def fn(s, t):
        q, lp = F.softmax(t / TEMPERATURE, -1), F.log_softmax(s / TEMPERATURE, -1)
        diff = q.log() - lp if order == "log q - log p" else -(lp - q.log())
        return (q * diff).sum(-1).mean() * TEMPERATURE ** 2

    m = _soft(check(fn, logits(N, V), logits(N, V, seed=4)))
    assert m.family == "distillation KL"


# ------------------------------------------------------------------------------------------------
# Mixup: lam * CE(x, y_a) + (1 - lam) * CE(x, y_b) in one call
# ------------------------------------------------------------------------------------------------

LAMS = {"number": lambda: 0.3, "tensor": lambda: torch.tensor(0.3), "per row": lambda: torch.rand(
    N, generator=torch.Generator().manual_seed(2))}


def _mixed(m, lam):
    assert m.family == "mixup cross_entropy"
    assert m.params["mixup"] == {"labels": "ya", "labels_b": "yb", "lam": lam}


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("lam", ["number", "tensor"])
def test_mixup_of_two_labels_is_one_call(reduction, eps, lam):
    # each cross-entropy ignores a row of its own: PyTorch's mean divides each by its own kept rows
    def fn(x, ya, yb, lam):
        return (lam * F.cross_entropy(x, ya, reduction=reduction, label_smoothing=eps)
                + (1 - lam) * F.cross_entropy(x, yb, reduction=reduction, label_smoothing=eps))

    rec = check(fn, logits(N, V), labels(N, ignore=-100, where=(3,)), labels(N, seed=7, ignore=-100, where=(0, 1)),
                LAMS[lam]())
    _mixed(_soft(rec), 0.3 if lam == "number" else "lam")


def test_mixup_with_class_weights():
    # PyTorch's weighted mean: each part by its own sum of w[y] over kept rows
    def fn(x, ya, yb, lam, w):
        return lam * F.cross_entropy(x, ya, w) + (1 - lam) * F.cross_entropy(x, yb, w)

    w = torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.5
    m = _soft(check(fn, logits(N, V), labels(N, ignore=-100, where=(2,)), labels(N, seed=7), 0.25, w))
    assert m.params["weight"] == "w" and m.params["mixup"]["lam"] == 0.25


def test_mixup_with_a_lam_per_row():
    def fn(x, ya, yb, lam):
        ce = lam * F.cross_entropy(x, ya, reduction="none") + (1 - lam) * F.cross_entropy(x, yb, reduction="none")
        return ce.mean()

    _mixed(_soft(check(fn, logits(N, V), labels(N), labels(N, seed=7), LAMS["per row"]())), "lam")


def test_mixup_with_every_label_of_one_part_ignored():
    # eager's mean over no kept row is nan, and so is the mixed loss; the gradient is the other part's
    def fn(x, ya, yb, lam):
        return lam * F.cross_entropy(x, ya) + (1 - lam) * F.cross_entropy(x, yb)

    check(fn, logits(N, V), labels(N), torch.full((N,), -100), torch.tensor(0.3))


@pytest.mark.parametrize("lam", ["number", "tensor"])
def test_mixup_through_a_mixed_one_hot(lam):
    # the target built in the graph, as timm's mixup_target writes it: smoothed one-hots mixed by lam
    def fn(x, ya, yb, lam):
        t = lam * F.one_hot(ya, V).float() + (1 - lam) * F.one_hot(yb, V).float()
        t = t * (1 - EPS) + EPS / V
        return torch.sum(-t * F.log_softmax(x, dim=-1), dim=-1).mean()

    m = _soft(check(fn, logits(N, V), labels(N), labels(N, seed=7), LAMS[lam]()))
    assert m.family == "mixup smoothed-target"
    assert m.params["mixup"]["lam"] == (pytest.approx(0.3) if lam == "number" else "lam")
    assert m.params["eps"] == pytest.approx(EPS)


def test_mixup_over_classes_at_dim_1():
    def fn(x, ya, yb, lam):
        return lam * F.cross_entropy(x, ya, label_smoothing=EPS) + (1 - lam) * F.cross_entropy(x, yb, label_smoothing=EPS)

    _mixed(_soft(check(fn, logits(B, V, T), labels(B, T, ignore=-100), labels(B, T, seed=7), torch.tensor(0.3))), "lam")


def test_lam_that_requires_grad_is_two_calls_with_a_near_miss():
    def fn(x, ya, yb, lam):
        return lam * F.cross_entropy(x, ya) + (1 - lam) * F.cross_entropy(x, yb)

    rec = check(fn, logits(N, V), labels(N), labels(N, seed=7), torch.tensor(0.3), grad=(0, 3), matches=2)
    assert [nm.reason for nm in rec.result.near_misses] == [
        "rewritten in part, the rest left as written: mixup by lam, which requires grad: the op does not "
        "differentiate lam (pass lam.detach(), or a number)"]


def test_mixup_of_two_different_losses_is_two_calls_with_a_near_miss():
    def fn(x, ya, yb, lam):
        return lam * F.cross_entropy(x, ya, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(x, yb)

    rec = check(fn, logits(N, V), labels(N), labels(N, seed=7), torch.tensor(0.3), matches=2)
    assert [nm.reason for nm in rec.result.near_misses] == [
        "rewritten in part, the rest left as written: mixup by lam: the two losses differ in more than their "
        "labels (label smoothing, z-loss, softcap or temperature)"]


def test_a_loss_weighted_by_a_tensor_alone_is_rewritten_without_a_near_miss():
    # a loss scale given as a tensor, per-row weights: no mixup, the op's loss weighted as written
    def fn(x, y, s, w):
        return s * F.cross_entropy(x, y) + (w * F.cross_entropy(x, y, reduction="none")).mean()

    rec = check(fn, logits(N, V), labels(N), torch.tensor(0.3), torch.rand(N, generator=torch.Generator().manual_seed(2)),
                matches=2)
    assert rec.result.near_misses == []
    assert [m.family for m in rec.result.matches] == ["cross_entropy", "cross_entropy"]


def test_teacher_logits_that_require_grad():
    # mutual learning: both networks train, the teacher's gradient through its softmax as eager's
    check(hinton, logits(N, V), logits(N, V, seed=4), grad=(0, 1))


class Goldens(TestCase):
    maxDiff = None

    def test_distillation_golden(self):
        rec = check(hinton_with_labels, logits(N, V), logits(N, V, seed=4), labels(N))
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_s_ : torch.Tensor, L_y_ : torch.Tensor, L_t_ : torch.Tensor):
    l_s_ = L_s_
    l_y_ = L_y_
    l_t_ = L_t_
    ones_like = torch.ones_like(l_y_, dtype = torch.bool)
    fused_soft_cross_entropy = smoothce_kernels_soft_cross_entropy_fused_soft_cross_entropy(l_s_, l_t_, l_y_, None, ignore_index = -100, reduction = 'mean', label_smoothing = 0.1, scale = 0.3, target_rows = ones_like, target_kind = 'logits', target_logit_scale = 0.5, soft_logit_scale = 0.5, soft_scale = 2.8, soft_kl = True);  l_s_ = l_t_ = l_y_ = ones_like = None
    return (fused_soft_cross_entropy,)""")


# ------------------------------------------------------------------------------------------------
# Left alone, with a reason
# ------------------------------------------------------------------------------------------------


def _unchanged(fn, *inputs):
    rec = check(fn, *inputs, matches=0)
    assert fused_calls(rec.gm) == 0
    return [nm.reason for nm in rec.result.near_misses]


def test_entropy_of_the_logits_themselves_is_left_alone():
    def fn(x):  # an entropy bonus: the target is the student's own softmax
        return (F.softmax(x, -1) * F.log_softmax(x, -1)).sum(-1).mean()

    assert _unchanged(fn, logits(N, V)) == [
        "the log-probs are multiplied by a softmax of the very logits it is computed from (an entropy or a "
        "self-distillation term, not a cross-entropy against a target)"]


def test_target_computed_from_the_logits_is_left_alone():
    def fn(x):  # the target reads the logits too: its product with the log-probs is no cross-entropy
        return -(torch.sigmoid(x) * F.log_softmax(x, -1)).sum(-1).mean()

    line = inspect.getsourcelines(fn)[1] + 1
    assert _unchanged(fn, logits(N, V)) == [
        f"the log-probs are multiplied by sigmoid at {FILE}:{line}, which is computed from the same logits "
        "(an entropy-like term, not a cross-entropy against a target)"]


def test_kl_div_per_class_is_left_alone():
    def fn(x, p):
        return F.kl_div(F.log_softmax(x, -1), p, reduction="none")

    assert _unchanged(fn, logits(N, V), probs(N, V)) == [
        "kl_div(reduction='none') against a target given as a tensor (the op returns a loss per row, not per "
        "class)"]


def test_softcapped_teacher_is_left_alone():
    def fn(s, t):
        return F.kl_div(F.log_softmax(s, -1), F.softmax(30.0 * torch.tanh(t / 30.0), -1), reduction="batchmean")

    assert _unchanged(fn, logits(N, V), logits(N, V, seed=4)) == [
        "kl_div reads the softmax of softcapped teacher logits; the op takes a temperature only"]


def test_two_targets_are_one_call_each():
    def fn(x, p, q):
        lp = F.log_softmax(x, -1)
        return -(p * lp).sum(-1).mean() - 0.5 * (q * lp).sum(-1).mean()

    rec = check(fn, logits(N, V), probs(N, V), probs(N, V, seed=8), matches=2)
    assert sorted(m.params["target"]["tensor"] for m in rec.result.matches) == ["p", "q"]


# ------------------------------------------------------------------------------------------------
# Real clients: a mixup classifier with timm's loss, a distillation loop
# ------------------------------------------------------------------------------------------------


def _mixup(x, y, lam):
    """timm's Mixup without its random draws: two smoothed one-hots mixed by lam, rows flipped."""
    off, on = 0.1 / V, 1 - 0.1 + 0.1 / V
    y1 = torch.full((len(y), V), off).scatter_(1, y[:, None], on)
    y2 = y1.flip(0)
    return x * lam + x.flip(0) * (1 - lam), y1 * lam + y2 * (1 - lam)


def _trains_as_eager(model, twin, compiled, eager, batches):
    """Three SGD steps of ``compiled(*batch)`` on model and of ``eager`` on its float64 twin: the
    same losses and, at the end, the same parameters."""
    opt, opt_twin = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(twin.parameters(), lr=0.5)
    for batch in batches:
        loss = compiled(*batch)
        loss_twin = eager(*(t.double() if t.is_floating_point() else t for t in batch))
        torch.testing.assert_close(loss.double(), loss_twin, rtol=1e-5, atol=1e-5)
        for o, l in ((opt, loss), (opt_twin, loss_twin)):
            o.zero_grad()
            l.backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-5)


def _batches(gen):
    return [(torch.randn(N, 5, generator=gen), torch.randint(0, V, (N,), generator=gen)) for _ in range(3)]


def test_mixup_classifier_trains_as_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, V))
    twin = copy.deepcopy(model).double()
    loss_fn = SoftTargetCrossEntropy()
    found = Recorder()
    compiled = torch.compile(lambda x, t: loss_fn(model(x), t), backend=found, fullgraph=True)
    batches = [_mixup(x, y, lam) for (x, y), lam in zip(_batches(torch.Generator().manual_seed(1)), (0.7, 0.4, 0.9))]
    _trains_as_eager(model, twin, compiled, lambda x, t: loss_fn(twin(x), t), batches)
    # its last Linear is fused with the loss (tests/test_patterns_distillation_head.py)
    assert [m.family for r in found.results for m in r.matches] == ["linear+soft-target cross-entropy"]


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
        self.head = nn.Linear(16, V)

    def forward(self, x):
        return self.head(self.body(x))


def test_distillation_loop_trains_as_eager():
    """The PyTorch knowledge-distillation tutorial's step: the teacher under no_grad, soft targets at
    T, T**2 on the KL, a CE on the labels; the student trains as eager does, step for step."""
    torch.manual_seed(0)
    teacher, student = Student().eval(), Student()
    twin, teacher_twin = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    T_, soft_weight, ce_weight = TEMPERATURE, 0.25, 0.75
    found = Recorder()

    def step(student, teacher, x, y):
        with torch.no_grad():
            teacher_logits = teacher(x)
        student_logits = student(x)
        soft_targets = nn.functional.softmax(teacher_logits / T_, dim=-1)
        soft_prob = nn.functional.log_softmax(student_logits / T_, dim=-1)
        soft_targets_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (T_ ** 2)
        label_loss = nn.CrossEntropyLoss()(student_logits, y)
        return soft_weight * soft_targets_loss + ce_weight * label_loss

    compiled = torch.compile(step, backend=found)
    _trains_as_eager(student, twin, lambda x, y: compiled(student, teacher, x, y),
                     lambda x, y: step(twin, teacher_twin, x, y), _batches(torch.Generator().manual_seed(1)))
    (m,) = [m for r in found.results for m in r.matches]
    assert m.family == "linear+distillation KL + labels"  # both heads fused (tests/test_patterns_distillation_head.py)
    assert "teacher_head" in m.params
    assert "calls" not in m.params  # the tutorial's sum / batch size is the op's mean
