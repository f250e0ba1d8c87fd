"""Losses as real code writes them: each spelling that once stopped the detector, rewritten exactly.

Every case compiles with the detector (then aot_eager) and compares the loss and the gradient
with eager PyTorch in float64 (``rewrite_check.check``).
"""

import copy
import inspect
import operator
import os

from expecttest import TestCase

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewrite_check import (
    B, EPS, N, T, V, Recorder, assert_equals_eager_in_float64, autocast_linear, check, labels, logits, normalize,
)
from smoothce.patterns.cross_entropy import rewrite_cross_entropy

FILE = os.path.basename(__file__)


# ------------------------------------------------------------------------------------------------
# LabelSmoothingCrossEntropy as blog posts give it (a classifier's loss, copied widely)
# ------------------------------------------------------------------------------------------------


def linear_combination(x, y, epsilon):
    return epsilon * x + (1 - epsilon) * y


def reduce_loss(loss, reduction="mean"):
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


class LabelSmoothingCrossEntropy(nn.Module):
    def __init__(self, epsilon: float = 0.1, reduction="mean"):
        super().__init__()
        self.epsilon = epsilon
        self.reduction = reduction

    def forward(self, preds, target):
        n = preds.size()[-1]
        log_preds = F.log_softmax(preds, dim=-1)
        loss = reduce_loss(-log_preds.sum(dim=-1), self.reduction)
        nll = F.nll_loss(log_preds, target, reduction=self.reduction)
        return linear_combination(loss / n, nll, self.epsilon)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [(2,), tuple(range(N))], ids=["one_label_ignored", "every_label_ignored"])
def test_blog_post_label_smoothing(reduction, ignored):
    # nll_loss ignores label -100, the smoothing term counts every row: the smoothing term gets its
    # own rows (uniform_rows), and with 'mean' its own divisor too, in one op call. Every label
    # ignored: eager's mean is nan (nll_loss's 0 / 0), its gradient the smoothing term's alone.
    rec = check(LabelSmoothingCrossEntropy(EPS, reduction), logits(N, V), labels(N, ignore=-100, where=ignored))
    (m,) = rec.result.matches
    assert (m.family, m.params["eps"], m.params["convention"]) == ("log_softmax+nll", EPS, "eps/V")


def nll_over_tokens_next_to_smoothing_mean(x, y, tokens):
    # the label term divided by a count the caller passes, the smoothing term by the rows: two
    # divisors the op cannot hold at once
    lp = x.log_softmax(-1)
    return (1 - EPS) * F.nll_loss(lp, y, reduction="sum") / tokens - EPS * lp.mean(-1).mean()


def test_two_divisors_two_calls():
    check(nll_over_tokens_next_to_smoothing_mean, logits(N, V), labels(N, ignore=-100, where=(2,)),
          torch.tensor(float(N - 1)), calls=2)


# ------------------------------------------------------------------------------------------------
# The spellings of the label term and of the target distribution
# ------------------------------------------------------------------------------------------------


def nll_by_advanced_indexing(x, y):
    lp = F.log_softmax(x, -1)
    nll = -lp[torch.arange(x.shape[0]), y]
    return ((1 - EPS) * nll - EPS * lp.mean(-1)).mean()


def one_hot_by_arange(x, y):
    t = (torch.arange(V) == y[:, None]).float() * (1 - EPS) + EPS / V
    return -(t * x.log_softmax(-1)).sum(-1).mean()


def one_hot_by_where(x, y):
    t = torch.where(y.unsqueeze(1) == torch.arange(V), 1 - EPS + EPS / V, EPS / V)
    return -(t * x.log_softmax(-1)).sum(-1).mean()


def one_hot_of_clamped_labels(x, y):
    keep = y != -100
    t = F.one_hot(y.clamp(min=0), V) * (1 - EPS) + EPS / V
    loss = -(t * x.log_softmax(-1)).sum(-1)
    return (loss * keep).sum() / keep.sum()


def one_hot_by_full_scatter(x, y):
    # timm's one_hot: torch.full(..., off).scatter_(1, y, on)
    t = torch.full((x.shape[0], V), EPS / V).scatter_(1, y[:, None], 1 - EPS + EPS / V)
    return torch.sum(-t * F.log_softmax(x, dim=-1), dim=-1).mean()


def one_hot_by_zeros_like_scatter(x, y):
    t = torch.zeros_like(x).scatter_(1, y[:, None], 1.0)
    t = t * (1 - EPS) + EPS / V
    return -(t * x.log_softmax(-1)).sum(-1).sum()


@pytest.mark.parametrize("fn", [nll_by_advanced_indexing, one_hot_by_arange, one_hot_by_where,
                                one_hot_of_clamped_labels, one_hot_by_full_scatter, one_hot_by_zeros_like_scatter],
                         ids=lambda f: f.__name__)
def test_label_spellings(fn):
    y = labels(N, ignore=-100, where=(3,)) if fn is one_hot_of_clamped_labels else labels(N)
    (m,) = check(fn, logits(N, V), y).result.matches
    # on = 1 - eps + eps / V, off = eps / V in floats: eps comes back within a rounding
    assert (m.params["eps"], m.params["convention"]) == (pytest.approx(EPS, rel=1e-15), "eps/V"), m.params


# the class positions as a row of the (N, V) comparison with the labels, each spelling
RESHAPED_ARANGES = {
    "none_colon": lambda: torch.arange(V)[None, :],
    "none": lambda: torch.arange(V)[None],
    "unsqueeze": lambda: torch.arange(V).unsqueeze(0),
    "view": lambda: torch.arange(V).view(1, -1),
    "expand": lambda: torch.arange(V).expand(N, V),
    "start_and_cast": lambda: torch.arange(0, V).long().reshape(1, V),
}


@pytest.mark.parametrize("arange", RESHAPED_ARANGES.values(), ids=RESHAPED_ARANGES.keys())
@pytest.mark.parametrize("spelling", ["where", "float", "to_dtype_next_to_smoothing"])
def test_one_hot_by_a_reshaped_arange(arange, spelling):
    def fn(x, y):
        lp = x.log_softmax(-1)
        if spelling == "where":
            t = torch.where(y[:, None] == arange(), 1 - EPS, EPS / (V - 1))
            return -(t * lp).sum(-1).mean()
        if spelling == "float":
            t = (arange() == y[:, None]).float() * (1 - EPS) + EPS / V
            return -(t * lp).sum(-1).mean()
        onehot = (y.view(-1, 1) == arange()).to(x.dtype)
        return (-(1 - EPS) * (onehot * lp).sum(-1) - EPS * lp.mean(-1)).mean()

    (m,) = check(fn, logits(N, V), labels(N)).result.matches
    convention = "eps/(V-1)" if spelling == "where" else "eps/V"
    assert (m.params["eps"], m.params["convention"]) == (pytest.approx(EPS, rel=1e-15), convention), m.params


def one_hot_by_arange_over_time(x, y):
    # (B, T, V): the class positions at the last dim of three
    t = (torch.arange(V)[None, None, :] == y[..., None]).float() * (1 - EPS) + EPS / V
    return -(t * x.log_softmax(-1)).sum(-1).mean()


def one_hot_by_arange_classes_at_dim_1(x, y):
    # (B, V, T): the class positions down a column, arange(V)[:, None]
    t = (torch.arange(V)[:, None] == y[:, None]).float() * (1 - EPS) + EPS / V
    return -(t * x.log_softmax(1)).sum(1).mean()


@pytest.mark.parametrize("fn, shape", [(one_hot_by_arange_over_time, (B, T, V)),
                                       (one_hot_by_arange_classes_at_dim_1, (B, V, T))],
                         ids=["over_time", "classes_at_dim_1"])
def test_one_hot_by_arange_in_three_dims(fn, shape):
    (m,) = check(fn, logits(*shape), labels(B, T)).result.matches
    assert m.params["eps"] == pytest.approx(EPS, rel=1e-15)


def padding_rows_masked_by_equality(x, y):
    loss = -x.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    return loss.masked_fill(y == 0, 0.0).sum()


@pytest.mark.parametrize("fn, x, y, params", [
    (one_hot_by_arange, logits(N, V), labels(N), dict(eps=EPS)),
    (one_hot_by_arange_over_time, logits(B, T, V), labels(B, T), dict(eps=EPS)),
    (padding_rows_masked_by_equality, logits(N, V), labels(N, ignore=0, where=(1, 3)), dict(ignore_index=0)),
], ids=["one_hot", "one_hot_over_time", "mask"])
def test_equality_as_torch_2_11_records_it(fn, x, y, params):
    # torch 2.11's Dynamo records `a == b` as the method call a.__eq__(b), 2.13 as operator.eq:
    # the graph 2.13 gives, with each == as 2.11 records it, is read the same
    rec = Recorder()

    def as_on_2_11(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is operator.eq:
                n.op, n.target = "call_method", "__eq__"
        gm.recompile()
        assert "__eq__" in gm.code
        return rec(gm, example_inputs)

    torch.testing.assert_close(torch.compile(fn, backend=as_on_2_11)(x, y), fn(x, y), rtol=1e-5, atol=1e-5)
    (m,) = rec.result.matches
    assert {k: m.params[k] for k in params} == pytest.approx(params, rel=1e-15)


def smoothed_target_by_empty_fill_scatter(x, y):
    # the LabelSmoothingLoss of many repositories: an uninitialised tensor filled, then scattered
    with torch.no_grad():
        t = torch.empty(size=(x.size(0), V), device=x.device).fill_(EPS / (V - 1))
        t = t.scatter_(1, y.data.unsqueeze(1), 1.0 - EPS)
    return torch.mean(torch.sum(-t * F.log_softmax(x, -1), dim=-1))


def smoothed_target_by_new_empty(x, y):
    t = x.new_empty(x.shape).fill_(EPS / (V - 1))
    t.scatter_(1, y[:, None], 1 - EPS)
    return -(t * x.log_softmax(-1)).sum(-1).mean()


def smoothed_target_by_empty_like(x, y):
    t = torch.empty_like(x).fill_(EPS / (V - 1)).scatter_(1, y[:, None], 1 - EPS)
    return -(t * x.log_softmax(-1)).sum(-1).sum()


@pytest.mark.parametrize("fn", [smoothed_target_by_empty_fill_scatter, smoothed_target_by_new_empty,
                                smoothed_target_by_empty_like], ids=lambda f: f.__name__)
def test_a_target_filled_after_empty(fn):
    (m,) = check(fn, logits(N, V), labels(N)).result.matches
    assert (m.params["eps"], m.params["convention"]) == (pytest.approx(EPS, rel=1e-15), "eps/(V-1)"), m.params


def nll_by_advanced_indexing_over_time(x, y):
    b, t, _ = x.shape
    lp = F.log_softmax(x, -1)
    return -lp[torch.arange(b)[:, None], torch.arange(t)[None, :], y].mean()


def smoothed_by_advanced_indexing_over_time(x, y):
    b, t, _ = x.shape
    lp = F.log_softmax(x, -1)
    nll = -lp[torch.arange(b).unsqueeze(1), torch.arange(t), y]
    return ((1 - EPS) * nll - EPS * lp.mean(-1)).sum()


def nll_by_advanced_indexing_classes_at_dim_1(x, y):
    b, _, t = x.shape
    lp = F.log_softmax(x, 1)
    return -lp[torch.arange(b)[:, None], y, torch.arange(t)].mean()


def target_written_by_advanced_indexing_over_time(x, y):
    b, t, _ = x.shape
    p = torch.full(x.shape, EPS / (V - 1))
    p[torch.arange(b)[:, None], torch.arange(t)[None, :], y] = 1 - EPS
    return -(p * x.log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("fn, shape", [
    (nll_by_advanced_indexing_over_time, (B, T, V)),
    (smoothed_by_advanced_indexing_over_time, (B, T, V)),
    (nll_by_advanced_indexing_classes_at_dim_1, (B, V, T)),
    (target_written_by_advanced_indexing_over_time, (B, T, V)),
], ids=lambda v: getattr(v, "__name__", None))
def test_advanced_indexing_in_three_dims(fn, shape):
    check(fn, logits(*shape), labels(B, T))


def nll_by_take_along_dim(x, y):
    return -torch.take_along_dim(x.log_softmax(-1), y[:, None], dim=1).mean()


def smoothed_by_take_along_dim_masked(x, y):
    lp = x.log_softmax(-1)
    keep = y != -100
    nll = -lp.take_along_dim(y[:, None], 1).squeeze(1)
    return (((1 - EPS) * nll - EPS * lp.mean(-1)) * keep).sum() / keep.sum()


def test_take_along_dim_reads_labels_mod_the_classes():
    # eager's take_along_dim reads y mod V, so -1 and V + 2 are classes there (no error)
    y = labels(N)
    y[1], y[3] = -1, V + 2
    check(nll_by_take_along_dim, logits(N, V), y)
    y[4] = -100  # masked: the op ignores it
    (m,) = check(smoothed_by_take_along_dim_masked, logits(N, V), y).result.matches
    assert (m.params["eps"], m.params["ignore_index"]) == (pytest.approx(EPS, rel=1e-15), -100)


def contrastive(x):
    # CLIP: the label of row i is i
    return (F.cross_entropy(x, torch.arange(x.shape[0])) + F.cross_entropy(x.t(), torch.arange(x.shape[0]))) / 2


def contrastive_by_indexing(x):
    n = x.shape[0]
    return -x.log_softmax(-1)[torch.arange(n), torch.arange(n)].mean()


def test_arange_labels_of_a_contrastive_loss():
    check(contrastive, logits(N, N), matches=2)
    check(contrastive_by_indexing, logits(N, N))


# ------------------------------------------------------------------------------------------------
# Terms reduced apart, masks, divisors
# ------------------------------------------------------------------------------------------------


def terms_scaled_and_reduced_apart(x, y):
    lp = x.log_softmax(-1)
    nll = -lp.gather(1, y[:, None]).squeeze(1)
    return 0.9 * nll.mean() + 0.1 * (-lp.mean(-1)).mean()


def masked_by_where_zeros_like(x, y):
    lp = x.log_softmax(-1)
    keep = y != -100
    t = -(1 - EPS) * lp.gather(1, torch.where(keep, y, 0)[:, None]).squeeze(1) - EPS * lp.mean(-1)
    t = torch.where(keep, t, torch.zeros_like(t))
    return t.sum() / keep.sum()


def count_written_per_term(x, y):
    # each term divided by its own keep.sum(): two nodes, one value
    lp = x.log_softmax(-1)
    keep = y != -100
    nll = -lp.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * keep
    smooth = -lp.mean(-1) * keep
    return (1 - EPS) * (nll.sum() / keep.sum()) + EPS * (smooth.sum() / keep.sum())


def count_clamped_two_ways(x, y):
    # the same guarded count, spelled as a function and as a method: one divisor
    lp = x.log_softmax(-1)
    keep = y != -100
    nll = -(lp.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * keep).sum() / torch.clamp(keep.sum(), min=1)
    smooth = -(lp.mean(-1) * keep).sum() / keep.sum().clamp(min=1)
    return (1 - EPS) * nll + EPS * smooth


def nll_loss_none_next_to_unmasked_smoothing(x, y):
    # nll_loss's default ignore_index masks the label term only; the smoothing term counts all rows
    lp = x.log_softmax(-1)
    return ((1 - EPS) * F.nll_loss(lp, y, reduction="none") - EPS * lp.mean(-1)).sum()


PAD = 1


def labels_changed_with_a_pad_id(x, y):
    # the padding id is a class (1), not ignore_index: the mask folds into the labels
    lp = x.log_softmax(-1)
    keep = y != PAD
    safe = y.masked_fill(~keep, 0)
    row = -(1 - EPS) * lp.gather(1, safe[:, None]).squeeze(1) - EPS * lp.mean(-1)
    return (row * keep).sum() / keep.sum()


@pytest.mark.parametrize("fn", [terms_scaled_and_reduced_apart, masked_by_where_zeros_like, count_written_per_term,
                                count_clamped_two_ways, nll_loss_none_next_to_unmasked_smoothing,
                                labels_changed_with_a_pad_id],
                         ids=lambda f: f.__name__)
def test_terms_masks_and_divisors(fn):
    ignore = PAD if fn is labels_changed_with_a_pad_id else -100
    y = labels(N) if fn is terms_scaled_and_reduced_apart else labels(N, ignore=ignore, where=(1, 4))
    (m,) = check(fn, logits(N, V), y).result.matches
    assert m.params["eps"] == pytest.approx(EPS, abs=1e-15)


def test_count_written_per_term_is_the_op_mean():
    (m,) = check(count_written_per_term, logits(N, V), labels(N, ignore=-100, where=(1,))).result.matches
    assert (m.params["reduction"], m.params["ignore_index"]) == ("mean", -100)


# ------------------------------------------------------------------------------------------------
# dtypes, in-place masks, KL divergence, graph breaks
# ------------------------------------------------------------------------------------------------


def log_softmax_dtype_with_masked_fill_(x, y):
    # bf16 logits, float32 log-probs, rows masked in place
    lp = F.log_softmax(x, dim=-1, dtype=torch.float32)
    pad = y == -100
    nll = -lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    smooth = -lp.sum(-1)
    nll.masked_fill_(pad, 0.0)
    smooth.masked_fill_(pad, 0.0)
    return ((1 - EPS) * nll.sum() + EPS / V * smooth.sum()) / (~pad).sum()


def test_log_softmax_dtype_and_masked_fill_in_place():
    rec = check(log_softmax_dtype_with_masked_fill_, logits(N, V), labels(N, ignore=-100, where=(0, 3)),
                dtype=torch.bfloat16)
    (m,) = rec.result.matches
    assert (m.params["dtype"], m.params["loss_dtype"], m.params["reduction"]) == ("bfloat16", "float32", "mean")


def kl_div_none_masked_normalised(x, y):
    keep = y != -100
    p = torch.full_like(x, EPS / (V - 1)).scatter(1, y.clamp(min=0)[:, None], 1 - EPS)
    kl = F.kl_div(F.log_softmax(x, -1), p, reduction="none").sum(-1)
    return (kl * keep).sum() / keep.sum().clamp(min=1)


def test_kl_div_none_with_a_mask_and_a_normaliser():
    (m,) = check(kl_div_none_masked_normalised, logits(N, V), labels(N, ignore=-100, where=(2,))).result.matches
    assert (m.family, m.form.kl, m.params["convention"]) == ("kl_div", True, "eps/(V-1)")


def smoothed_target_by_hand(classes, eps):
    def loss(x, y):
        p = torch.full_like(x, eps / (classes - 1)).scatter_(1, y[:, None], 1 - eps)
        return -(p * F.log_softmax(x, -1)).sum(-1).mean()

    return loss


@pytest.mark.parametrize("classes, eps", [(11, 0.1), (11, 0.2), (32, 0.1), (7, 0.3)])
def test_the_convention_is_read_back_through_float_rounding(classes, eps):
    # eps / (V - 1) times V - 1 is not eps in floats at these sizes (0.2 / 10 * 10 is
    # 0.19999999999999998): the form still reads eps as the user wrote it, in its convention.
    (m,) = check(smoothed_target_by_hand(classes, eps), logits(N, classes), labels(N)).result.matches
    assert (m.form.label_smoothing, m.form.smoothing, m.form.scale) == (eps, "others", 1.0)


def normalised_by_item(x, y):
    # .item() breaks the graph: the graph before the break holds the whole summed loss
    lp = x.log_softmax(-1)
    keep = y != -100
    loss = -(lp.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * keep).sum()
    return loss / keep.sum().item()


def test_loss_normalised_by_a_python_number_from_item():
    rec = Recorder()
    assert_equals_eager_in_float64(torch.compile(normalised_by_item, backend=rec), normalised_by_item,
                                   logits(N, V), labels(N, ignore=-100, where=(2,)))
    assert len(rec.graphs) == 2 and [len(r.matches) for r in rec.results] == [1, 0]


# ------------------------------------------------------------------------------------------------
# Heads: softcap with casts, shifted logits of hand-written losses
# ------------------------------------------------------------------------------------------------

D = 5


class SoftcappedLM(nn.Module):
    """Gemma 2 through Hugging Face: the model softcaps in bf16, the loss upcasts."""

    def __init__(self, hand_written=False):
        super().__init__()
        self.head = nn.Linear(D, V, bias=False)
        self.hand_written = hand_written

    def forward(self, h, y):
        logits = self.head(h)
        logits = logits / 30.0
        logits = torch.tanh(logits)
        logits = logits * 30.0
        shift_logits = logits[..., :-1, :].contiguous().float()
        shift_labels = y[..., 1:].contiguous()
        if not self.hand_written:
            return F.cross_entropy(shift_logits.view(-1, V), shift_labels.view(-1), label_smoothing=EPS)
        lp = shift_logits.log_softmax(-1)
        keep = shift_labels != -100
        nll = -lp.gather(-1, shift_labels.clamp(min=0)[..., None]).squeeze(-1)
        row = (1 - EPS) * nll - EPS * lp.mean(-1)
        return (row * keep).sum() / keep.sum()


@pytest.mark.parametrize("hand_written", [False, True], ids=["cross_entropy", "hand_written"])
def test_softcap_and_shift_fuse_the_head(hand_written):
    torch.manual_seed(0)
    model = SoftcappedLM(hand_written)
    h, y = logits(B, T + 1, D, seed=9), labels(B, T + 1, ignore=-100, where=(2,))
    rec = check(model, h, y, reference=copy.deepcopy(model).double(), fuse_linear=True)
    (m,) = rec.result.matches
    assert m.family.startswith("linear+")
    assert (m.params["softcap"], m.params["eps"]) == (30.0, EPS)


def blog_post_on_a_head(h, w, y):
    return LabelSmoothingCrossEntropy(EPS)(F.linear(h, w), y)


def test_uniform_rows_keep_the_head_apart():
    # the fused head takes one row mask: a smoothing term over every row next to nll_loss's
    # ignore_index runs the plain op on the head's logits, and the near miss says why
    D = 8
    rec = check(blog_post_on_a_head, logits(N, D), logits(V, D, seed=3), labels(N, ignore=-100, where=(2,)),
                grad=(0, 1), fuse_linear=True)
    (m,) = rec.result.matches
    assert not m.family.startswith("linear+")
    (miss,) = rec.result.near_misses
    assert "smoothing term counts on other rows than its label term" in miss.reason


# ------------------------------------------------------------------------------------------------
# Targets smoothed in place, cleared against a 0-dim tensor; log-probs transposed or selected
# ------------------------------------------------------------------------------------------------


def smoothed_by_mul_add_in_place(x, y):
    t = F.one_hot(y, V).float()
    t.mul_(1 - EPS).add_(EPS / V)
    return -(t * F.log_softmax(x, -1)).sum(-1).mean()


def smoothed_by_augmented_assignment(x, y):
    t = F.one_hot(y, V).to(x.dtype)
    t *= 1 - EPS - EPS / (V - 1)
    t += EPS / (V - 1)
    return F.cross_entropy(x, t)


def smoothed_scatter_then_in_place(x, y):
    t = torch.zeros(x.shape[0], V).scatter_(1, y[:, None], 1.0)
    t = t * (1 - EPS)
    t.add_(EPS / V)
    return torch.sum(-t * F.log_softmax(x, -1), -1).sum()


def one_hot_cleared_against_a_0_dim_tensor(x, y):
    keep = y != -100
    t = F.one_hot(y.clamp(min=0), V)
    t = torch.where(keep[:, None], t, torch.tensor(0))
    t = t * (1 - EPS) + EPS / V
    return -(t * F.log_softmax(x, -1)).sum() / keep.sum()


def float_one_hot_cleared_against_zeros(x, y):
    keep = (y != -100).unsqueeze(-1)
    t = F.one_hot(torch.where(keep.squeeze(-1), y, 0), V).float()
    t = torch.where(keep, t, torch.zeros((), dtype=t.dtype))
    return -(t * F.log_softmax(x, -1)).sum(-1).mean()


@pytest.mark.parametrize("fn", [smoothed_by_mul_add_in_place, smoothed_by_augmented_assignment,
                                smoothed_scatter_then_in_place, one_hot_cleared_against_a_0_dim_tensor,
                                float_one_hot_cleared_against_zeros], ids=lambda f: f.__name__)
def test_targets_changed_in_place_or_cleared_by_where(fn):
    masked = fn in (one_hot_cleared_against_a_0_dim_tensor, float_one_hot_cleared_against_zeros)
    y = labels(N, ignore=-100, where=(1, 4)) if masked else labels(N)
    (m,) = check(fn, logits(N, V), y).result.matches
    assert m.params["eps"] == (0.0 if fn is float_one_hot_cleared_against_zeros else EPS)


def test_a_target_changed_in_place_is_changed_for_its_aliases():
    def fn(x, y):
        t = F.one_hot(y, V).float()
        u = t  # the same tensor: t *= ... changes what u reads
        t *= 1 - EPS
        return -(u * F.log_softmax(x, -1)).sum(-1).mean()

    (m,) = check(fn, logits(N, V), labels(N)).result.matches
    assert m.params["target_coef"] == 1 - EPS


def nll_and_a_transposed_smoothing_term(x, y):  # x: (B, V, T)
    lp = F.log_softmax(x, 1)
    nll = F.nll_loss(lp, y, reduction="none")
    smooth = -lp.transpose(1, 2).sum(-1)
    return ((1 - EPS) * nll + EPS / V * smooth).mean()


def classes_moved_last_by_transpose(x, y):
    lp = F.log_softmax(x, dim=1).transpose(1, 2)  # (B, T, V)
    nll = -lp.gather(-1, y[..., None]).squeeze(-1)
    return ((1 - EPS) * nll - EPS * lp.mean(-1)).sum()


def classes_moved_last_by_permute(x, y):
    lp = F.log_softmax(x, dim=1)
    smooth = -lp.permute(0, 2, 1).mean(-1).mean()
    return (1 - EPS) * F.nll_loss(lp, y) + EPS * smooth


@pytest.mark.parametrize("fn", [nll_and_a_transposed_smoothing_term, classes_moved_last_by_transpose,
                                classes_moved_last_by_permute], ids=lambda f: f.__name__)
def test_log_probs_read_through_a_transpose(fn):
    (m,) = check(fn, logits(B, V, T), labels(B, T)).result.matches
    assert m.params["eps"] == EPS


def test_rows_moved_by_a_transpose_are_left_alone():
    def fn(x, y):  # (T, T) rows read transposed: the two terms no longer meet row by row
        lp = F.log_softmax(x, -1)
        return (F.nll_loss(lp.view(-1, V), y.view(-1), reduction="none").view(T, T) + lp.mean(-1).t()).sum()

    rec = check(fn, logits(T, T, V), labels(T, T), matches=None, calls=2)
    # each term its own per-row call; the user's transpose and sum stay after them
    assert [m.params["reduction"] for m in rec.result.matches] == ["none", "none"], rec.result


def selected_log_probs_gathered(x, y):
    keep = y != -100
    lp = F.log_softmax(x, -1)[keep]
    return -lp.gather(1, y[keep][:, None]).mean()


def selected_log_probs_smoothed(x, y):
    keep = y != -100
    lp = x.float().log_softmax(-1)[keep]
    nll = F.nll_loss(lp, y[keep], reduction="none")
    return ((1 - EPS) * nll - EPS * lp.mean(-1)).sum() / keep.sum()


def selected_rows_after_the_loss(x, y):
    loss = F.cross_entropy(x, y.clamp(min=0), reduction="none", label_smoothing=EPS)
    return loss[y != -100].mean()


@pytest.mark.parametrize("fn", [selected_log_probs_gathered, selected_log_probs_smoothed, selected_rows_after_the_loss],
                         ids=lambda f: f.__name__)
def test_rows_selected_by_a_boolean_mask(fn):
    # the op reads x[keep] (a data-dependent row count), or its per-row loss is selected after it
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (m,) = check(fn, logits(N, V), labels(N, ignore=-100, where=(1, 4))).result.matches
    assert m.params["reduction"] == ("none" if fn is selected_rows_after_the_loss else
                                     "mean" if fn is selected_log_probs_gathered else "sum")


def selected_logits_cross_entropy(x, y):  # x: (B, T, V), as token classifiers select active rows
    active = y.view(-1) != -100
    return F.cross_entropy(x.view(-1, V)[active], y.view(-1)[active], label_smoothing=EPS)


def selected_logits_scattered_and_smoothed_in_place(x, y):
    keep = y != -100
    x, y = x[keep], y[keep]
    lp = F.log_softmax(x.float() / 2.0, -1)  # a temperature
    t = torch.zeros_like(lp).scatter_(1, y[:, None], 1.0)
    t *= 1 - EPS
    return -(t * lp).sum() / keep.sum() + EPS * -lp.mean(-1).sum() / keep.sum()


def selected_logits_with_classes_at_dim_1(x, y):  # x: (B, V, T)
    keep = y != -100
    lp = F.log_softmax(x.transpose(1, 2)[keep], -1)
    return ((1 - EPS) * F.nll_loss(lp, y[keep], reduction="none") - EPS * lp.mean(-1)).mean()


@pytest.mark.parametrize("fn, x_shape, y_shape", [(selected_logits_cross_entropy, (B, T, V), (B, T)),
                                                   (selected_logits_scattered_and_smoothed_in_place, (N, V), (N,)),
                                                   (selected_logits_with_classes_at_dim_1, (B, V, T), (B, T))],
                         ids=lambda a: getattr(a, "__name__", ""))
def test_rows_of_the_logits_selected_by_a_boolean_mask(fn, x_shape, y_shape):
    # the op reads x[keep] itself (Dynamo's read of its row count stays); a question about its
    # data-dependent size (is x[keep] / 2.0 a count divided by 2?) leaves a node opaque, not an error
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (m,) = check(fn, logits(*x_shape), labels(*y_shape, ignore=-100, where=(1, 4))).result.matches
    assert m.params["eps"] == EPS, m


def test_transposed_log_probs_selected_by_a_boolean_mask_say_what_to_select():
    def fn(x, y):  # x: (B, V, T)
        lp = F.log_softmax(x, 1).transpose(1, 2)[y != -100]
        return -lp.gather(1, y[y != -100][:, None]).mean()

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        rec = check(fn, logits(B, V, T), labels(B, T, ignore=-100, where=(1,)), matches=0)
    (miss,) = rec.result.near_misses
    assert miss.reason.startswith("rows of log-probs whose classes a transpose moved last are selected"), miss
    assert "x.transpose(1, 2)[keep]" in miss.reason, miss


def test_rows_selected_twice_are_a_near_miss_not_an_error():
    def fn(x, y):  # two selections: their row counts are two unknowns of the data
        lp = F.log_softmax(x, -1)[y != -100]
        return -lp.gather(1, y[y != -100][:, None]).mean()

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        rec = check(fn, logits(N, V), labels(N, ignore=-100, where=(1,)), matches=0)
    (miss,) = rec.result.near_misses
    assert "sizes depend on the data (Eq(" in miss.reason and "select the rows once" in miss.reason, miss


def cross_entropy_of_transposed_logits(x, y):
    return F.cross_entropy(x.transpose(1, 2), y, label_smoothing=EPS)


def hand_written_over_batch_and_time(x, y):
    lp = F.log_softmax(x, -1)
    nll = -lp.gather(-1, y[..., None]).squeeze(-1)
    return ((1 - EPS) * nll - EPS * lp.mean(-1)).mean()


def per_token_loss_kept_per_token(x, y):
    return F.cross_entropy(x.reshape(-1, V), y.reshape(-1), reduction="none").view(y.shape).sum(-1).mean()


@pytest.mark.parametrize("fn", [cross_entropy_of_transposed_logits, hand_written_over_batch_and_time,
                                per_token_loss_kept_per_token], ids=lambda f: f.__name__)
def test_3d_losses_with_dynamic_batch_and_time(fn):
    rec = Recorder()
    compiled = torch.compile(fn, backend=rec)
    for (b, t) in [(2, 3), (3, 5), (4, 2)]:  # the second shape makes B and T dynamic, V stays static
        x, y = logits(b, t, V, seed=b), labels(b, t, seed=t)
        assert_equals_eager_in_float64(compiled, fn, x, y)
    dynamic = rec.results[-1]
    assert len(dynamic.matches) == 1 and not dynamic.near_misses, dynamic


def z_loss_next_to_a_padding_mask(x, y):
    # nll_loss drops the rows labelled -100, the padding mask the rows labelled 0 (a valid class)
    lp = F.log_softmax(x, -1)
    loss = F.nll_loss(lp, y, reduction="none") + 1e-4 * torch.logsumexp(x, -1) ** 2
    w = (y != 0).float()
    return (loss * w).sum() / w.sum()


def smoothed_z_loss_next_to_a_padding_mask(x, y):
    ce = F.cross_entropy(x, y, label_smoothing=EPS, reduction="none")
    z = 1e-4 * torch.logsumexp(x, -1).pow(2)
    keep = y.ne(0)
    return ((ce + z) * keep).sum() / keep.sum()


@pytest.mark.parametrize("fn", [z_loss_next_to_a_padding_mask, smoothed_z_loss_next_to_a_padding_mask],
                         ids=lambda f: f.__name__)
def test_z_loss_masked_apart_from_the_label_term(fn):
    # one call for the cross-entropy on its rows, one for z on the mask's rows: rows labelled -100
    # keep their z term, as in eager
    y = labels(N, ignore=-100, where=(1,))
    y[3] = 0
    (m,) = check(fn, logits(N, V), y, calls=2).result.matches
    assert m.params["calls"] == 2 and m.params["z_loss"] == 1e-4


# ------------------------------------------------------------------------------------------------
# Not one cross-entropy: the reason says what it is
# ------------------------------------------------------------------------------------------------


def timm_mixup(x, y):
    # timm's mixup_target: two smoothed one-hots mixed with lam, built inside the graph
    lam = 0.7
    off, on = EPS / V, 1 - EPS + EPS / V
    y1 = torch.full((x.shape[0], V), off).scatter_(1, y[:, None], on)
    y2 = torch.full((x.shape[0], V), off).scatter_(1, y.flip(0)[:, None], on)
    target = y1 * lam + y2 * (1 - lam)
    return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


def test_mixup_target_built_in_the_graph_is_one_call():
    # the two smoothed one-hots mixed by a number: one call with both labels, lam as written
    (m,) = check(timm_mixup, logits(N, V), labels(N)).result.matches
    assert m.family == "mixup smoothed-target"
    assert m.params["mixup"] == {"labels": "y", "labels_b": "flip", "lam": 0.7}
    assert m.params["eps"] == pytest.approx(EPS)


def mixup_with_a_tensor_lam(x, y, lam):
    t = lam * F.one_hot(y, V) + (1 - lam) * F.one_hot(y.flip(0), V)
    return torch.sum(-t * F.log_softmax(x, dim=-1), dim=-1).mean()


def smoothing_by_a_tensor(x, y, eps):
    t = (1 - eps) * F.one_hot(y, V) + eps / V
    return torch.sum(-t * F.log_softmax(x, dim=-1), dim=-1).mean()


def test_a_tensor_mixing_targets():
    # lam a tensor mixing two one-hots: mixup, one call; eps a tensor: no constant smoothing, and the
    # reason says where, in the code's words
    (m,) = check(mixup_with_a_tensor_lam, logits(N, V), labels(N), torch.tensor(0.7)).result.matches
    assert m.params["mixup"] == {"labels": "y", "labels_b": "flip", "lam": "lam"}
    rec = check(smoothing_by_a_tensor, logits(N, V), labels(N), torch.tensor(EPS), matches=0)
    (miss,) = rec.result.near_misses
    line = inspect.getsourcelines(smoothing_by_a_tensor)[1] + 1
    assert miss.reason == ("the log-probs are multiplied by a target distribution the detector cannot follow "
                           f"past add at {FILE}:{line} (where it meets truediv at {FILE}:{line}, a tensor and not "
                           "a number)"), miss


class OpenNMTLabelSmoothing(nn.Module):
    # the smoothed distribution kept in a buffer, filled in __init__
    def __init__(self):
        super().__init__()
        one_hot = torch.full((V,), EPS / (V - 2))
        one_hot[0] = 0
        self.register_buffer("one_hot", one_hot.unsqueeze(0))

    def forward(self, x, y):
        p = self.one_hot.repeat(y.size(0), 1)
        p.scatter_(1, y.unsqueeze(1), 1 - EPS)
        p.masked_fill_((y == 0).unsqueeze(1), 0)
        return F.kl_div(F.log_softmax(x, -1), p, reduction="sum")


class SmoothedRowsInABuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.eye(V) * (1 - EPS) + EPS / V)

    def forward(self, x, y):
        return -(self.table[y] * F.log_softmax(x, -1)).sum(-1).mean()


def test_a_target_in_a_buffer_changed_in_place_says_to_build_it_in_forward():
    rec = check(OpenNMTLabelSmoothing(), logits(N, V), labels(N), matches=0)
    (miss,) = rec.result.near_misses
    assert miss.reason.startswith("targets are built from self.one_hot, a module's tensor whose values the graph "
                                  "does not show"), miss
    assert "build the target in forward from the labels" in miss.reason


def test_rows_of_a_buffer_are_a_target_given_as_data():
    # self.table[y] is a distribution per row that the graph reads as data: the op reads it
    rec = check(SmoothedRowsInABuffer(), logits(N, V), labels(N))
    (m,) = rec.result.matches
    assert m.family == "soft-target cross-entropy"


def test_a_target_built_before_a_graph_break_is_a_target_given_as_data():
    def fn(x, y):
        t = F.one_hot(y, V).float() * (1 - EPS) + EPS / V
        torch._dynamo.graph_break()  # a print or an .item() count does the same
        return -(t * F.log_softmax(x, -1)).sum(-1).mean()

    rec = Recorder()
    x, y = logits(N, V), labels(N)
    assert_equals_eager_in_float64(torch.compile(fn, backend=rec), fn, x, y)
    (m,) = [m for r in rec.results for m in r.matches]
    assert m.family == "soft-target cross-entropy" and m.params["target"]["tensor"] == "t"


def test_one_label_tensor_read_two_ways_is_no_mixup():
    def fn(x, y):  # take_along_dim reads y mod V, nll_loss as it is (and drops -100)
        lp = F.log_softmax(x, -1)
        row = F.nll_loss(lp, y, reduction="none")
        row.sub_(EPS * torch.take_along_dim(lp, y[:, None], dim=1).squeeze(1))
        return row.mean()

    rec = check(fn, logits(N, V), labels(N), matches=0)
    (miss,) = rec.result.near_misses
    assert "mixup" not in miss.reason and miss.reason.startswith("the loss reads the labels y in 2 ways"), miss


# ------------------------------------------------------------------------------------------------
# Through Inductor: two op calls, uniform_rows, bf16 logits with a float32 loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.inductor
@pytest.mark.parametrize("fn, dtype", [
    (LabelSmoothingCrossEntropy(EPS, "mean"), torch.float32),  # uniform_rows, a divisor per term
    (nll_loss_none_next_to_unmasked_smoothing, torch.float32),  # uniform_rows
    (log_softmax_dtype_with_masked_fill_, torch.bfloat16),  # bf16 logits read as they are
], ids=["per_term_mean", "uniform_rows", "bf16_logits"])
def test_rewritten_losses_through_inductor(fn, dtype):
    from torch._inductor.compile_fx import compile_fx

    results = []

    def backend(gm, inputs):
        results.append(rewrite_cross_entropy(gm))
        return compile_fx(gm, inputs)

    x, y = logits(N, V).to(dtype), labels(N, ignore=-100, where=(1, 4))
    out = assert_equals_eager_in_float64(torch.compile(fn, backend=backend), fn, x, y)
    assert out.dtype == fn(x, y).dtype
    assert [len(r.matches) for r in results] == [1]


# ------------------------------------------------------------------------------------------------
# Goldens of what the rewrite emits
# ------------------------------------------------------------------------------------------------


def padding_column_target(x, y):
    # eps / (V - 2) on every class but the label and the padding class 0; padded rows dropped
    t = torch.full_like(x, EPS / (V - 2)).scatter(1, y[:, None], 1 - EPS)
    t[:, 0] = 0
    loss = -(t * x.log_softmax(-1)).sum(-1)
    return loss.masked_fill(y == 0, 0.0).sum()


def padding_class_zero_smoothing_averaged_apart(x, y):
    # nll_loss ignores the padding class 0, the smoothing term (class 0 left out) averages every row:
    # the smoothing call reads no label, and its 'mean' must not weigh rows by class 0's weight 0
    lp = F.log_softmax(x, dim=-1)
    nll = F.nll_loss(lp, y, ignore_index=0)
    smooth = (-lp.sum(dim=-1) + lp[:, 0]).mean()
    return (1 - EPS - EPS / (V - 2)) * nll + EPS / (V - 2) * smooth


def test_a_padding_class_zero_next_to_a_smoothing_mean():
    check(padding_class_zero_smoothing_averaged_apart, logits(N, V), labels(N, where=(1, 3), ignore=0), calls=2)


def autocast_head(h, w, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h, w)
    return F.cross_entropy(logits.float(), y, label_smoothing=EPS)


def autocast_head_in_float64(h, w, y):
    return F.cross_entropy(autocast_linear(h, w, None, torch.bfloat16), y, label_smoothing=EPS)


class Goldens(TestCase):
    maxDiff = None

    def test_one_call_for_a_mean_per_term(self):
        rec = check(LabelSmoothingCrossEntropy(EPS), logits(N, V), labels(N, ignore=-100, where=(2,)))
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_preds_ : torch.Tensor, L_target_ : torch.Tensor):
    l_preds_ = L_preds_
    l_target_ = L_target_
    ones_like = torch.ones_like(l_target_, dtype = torch.bool)
    fused_cross_entropy = smoothce_kernels_cross_entropy_fused_cross_entropy(l_preds_, l_target_, None, ignore_index = -100, reduction = 'mean', label_smoothing = 0.1, uniform_rows = ones_like);  l_preds_ = l_target_ = ones_like = None
    return (fused_cross_entropy,)""")

    def test_uniform_rows_for_a_smoothing_term_masked_apart(self):
        rec = check(nll_loss_none_next_to_unmasked_smoothing, logits(N, V), labels(N, ignore=-100, where=(2,)))
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_x_ : torch.Tensor, L_y_ : torch.Tensor):
    l_x_ = L_x_
    l_y_ = L_y_
    ones_like = torch.ones_like(l_y_, dtype = torch.bool)
    fused_cross_entropy = smoothce_kernels_cross_entropy_fused_cross_entropy(l_x_, l_y_, None, ignore_index = -100, reduction = 'sum', label_smoothing = 0.1, uniform_rows = ones_like);  l_x_ = l_y_ = ones_like = None
    return (fused_cross_entropy,)""")

    def test_padding_column_as_a_class_weight(self):
        rec = check(padding_column_target, logits(N, V), labels(N, ignore=0, where=(1, 3)))
        (m,) = rec.result.matches
        self.assertEqual((m.params["eps"], m.params["padding_columns"]), (EPS, [0]))
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_x_ : torch.Tensor, L_y_ : torch.Tensor):
    l_x_ = L_x_
    l_y_ = L_y_
    arange = torch.arange(11, device = device(type='cpu'))
    new_ones = l_x_.new_ones((11,), dtype = torch.float32)
    eq_1 = arange == 0;  arange = None
    where = torch.where(eq_1, 0.0, new_ones);  eq_1 = new_ones = None
    fused_cross_entropy = smoothce_kernels_cross_entropy_fused_cross_entropy(l_x_, l_y_, where, ignore_index = 0, reduction = 'sum', label_smoothing = 0.1208791208791209, scale = 1.011111111111111);  l_x_ = l_y_ = where = None
    return (fused_cross_entropy,)""")

    def test_head_under_autocast(self):
        # the loss to float32 math; the gradients were computed in bfloat16 (the head's dtype)
        rec = check(autocast_head, logits(N, D), logits(V, D, seed=3), labels(N), grad=(0, 1), fuse_linear=True,
                    reference=autocast_head_in_float64, grad_dtype=torch.bfloat16)
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_h_ : torch.Tensor, L_w_ : torch.Tensor, L_y_ : torch.Tensor):
    l_h_ = L_h_
    l_w_ = L_w_
    l_y_ = L_y_
    _enter_autocast = torch.amp.autocast_mode._enter_autocast('cpu', torch.bfloat16, True, None)
    _exit_autocast = torch.amp.autocast_mode._exit_autocast(_enter_autocast);  _enter_autocast = _exit_autocast = None
    to = l_h_.to(torch.bfloat16);  l_h_ = None
    to_1 = l_w_.to(torch.bfloat16);  l_w_ = None
    fused_linear_cross_entropy = smoothce_kernels_linear_cross_entropy_fused_linear_cross_entropy(to, to_1, None, l_y_, None, ignore_index = -100, reduction = 'mean', label_smoothing = 0.1, loss_dtype = torch.float32);  to = to_1 = l_y_ = None
    return (fused_linear_cross_entropy,)""")
