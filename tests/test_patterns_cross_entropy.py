"""The cross-entropy detector, family by family.

Every case is compiled through a local backend (rewrite_cross_entropy, then aot_eager: no code
generation) and checked three ways: loss and gradients against eager PyTorch in float64, the fused
op present and the original log-prob ops gone, and (for one case per family) the rewritten graph as
a golden. Negative cases check that the graph is unchanged and that the near miss says why.
Shapes are tiny (N=6 rows, V=11 classes: odd, so eps/V and eps/(V-1) differ visibly).
"""

import copy
import inspect
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import aot_eager
from torch._functorch.aot_autograd import make_boxed_func

from rewrite_check import (
    B, EPS, N, T, V, Recorder, assert_equals_eager_in_float64, check, fused_calls, labels, logits, normalize,
)
from smoothce.kernels.cross_entropy import fused_cross_entropy
from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy
from smoothce.patterns.cross_entropy import rewrite_cross_entropy
from smoothce.patterns.ops import op_name

FILE = os.path.basename(__file__)

WEIGHT = torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.5


# ------------------------------------------------------------------------------------------------
# F.cross_entropy / nn.CrossEntropyLoss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_arguments(eps, weighted, ignore_index, reduction):
    def fn(x, y, w):
        return F.cross_entropy(x, y, weight=w, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=eps)

    y = labels(N, ignore=ignore_index, where=(1, 4))
    rec = check(fn, logits(N, V), y, WEIGHT if weighted else None)
    (m,) = rec.result.matches
    assert m.family == "cross_entropy"
    assert m.params["eps"] == eps
    assert m.params["ignore_index"] == ignore_index
    assert m.params["reduction"] == reduction
    assert (m.params["weight"] is not None) == weighted
    assert m.location.startswith(FILE + ":")


class CrossEntropyLossModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, V)
        self.loss = nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.2, ignore_index=0)

    def forward(self, h, y):
        return self.loss(self.head(h), y)


class Goldens(TestCase):
    maxDiff = None

    def test_module_golden(self):
        torch.manual_seed(0)
        model = CrossEntropyLossModule()
        h = torch.randn(N, 5)
        y = labels(N, ignore=0, where=(2,))
        rec = check(model, h, y, reference=copy.deepcopy(model).double(), fuse_linear=True)
        (m,) = rec.result.matches
        # the head's logits feed nothing else: one fused linear cross-entropy, no logits at all
        self.assertEqual(m.family, "linear+cross_entropy")
        self.assertEqual(m.params["eps"], 0.2)
        self.assertEqual(m.params["convention"], "eps/V")
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_self_modules_head_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_head_parameters_bias_ : torch.nn.parameter.Parameter, L_h_ : torch.Tensor, L_self_modules_loss_buffers_weight_ : torch.Tensor, L_y_ : torch.Tensor):
    l_self_modules_head_parameters_weight_ = L_self_modules_head_parameters_weight_
    l_self_modules_head_parameters_bias_ = L_self_modules_head_parameters_bias_
    l_h_ = L_h_
    l_self_modules_loss_buffers_weight_ = L_self_modules_loss_buffers_weight_
    l_y_ = L_y_
    fused_linear_cross_entropy = smoothce_kernels_linear_cross_entropy_fused_linear_cross_entropy(l_h_, l_self_modules_head_parameters_weight_, l_self_modules_head_parameters_bias_, l_y_, l_self_modules_loss_buffers_weight_, ignore_index = 0, reduction = 'mean', label_smoothing = 0.2);  l_h_ = l_self_modules_head_parameters_weight_ = l_self_modules_head_parameters_bias_ = l_y_ = l_self_modules_loss_buffers_weight_ = None
    return (fused_linear_cross_entropy,)""")


# ------------------------------------------------------------------------------------------------
# log_softmax + nll_loss, every spelling
# ------------------------------------------------------------------------------------------------

_log_softmax_module = nn.LogSoftmax(dim=1)
_nll_module = nn.NLLLoss(ignore_index=2, reduction="sum")

NLL_SPELLINGS = {
    "functional": lambda x, y: F.nll_loss(F.log_softmax(x, dim=1), y, ignore_index=2, reduction="sum"),
    "torch": lambda x, y: F.nll_loss(torch.log_softmax(x, -1), y, ignore_index=2, reduction="sum"),
    "method": lambda x, y: F.nll_loss(x.log_softmax(dim=-1), y, ignore_index=2, reduction="sum"),
    "modules": lambda x, y: _nll_module(_log_softmax_module(x), y),
    "by hand": lambda x, y: F.nll_loss(x - x.logsumexp(1, keepdim=True), y, ignore_index=2, reduction="sum"),
}


@pytest.mark.parametrize("spelling", sorted(NLL_SPELLINGS))
def test_log_softmax_nll_spellings(spelling):
    rec = check(NLL_SPELLINGS[spelling], logits(N, V), labels(N, ignore=2, where=(0, 5)))
    (m,) = rec.result.matches
    assert m.family == "log_softmax+nll"
    assert (m.params["ignore_index"], m.params["reduction"], m.params["eps"]) == (2, "sum", 0.0)


def test_log_softmax_nll_weighted_mean():
    def fn(x, y, w):
        return F.nll_loss(F.log_softmax(x, 1), y, weight=w)

    check(fn, logits(N, V), labels(N, ignore=-100, where=(3,)), WEIGHT)


# ------------------------------------------------------------------------------------------------
# K-dimensional inputs: classes along dim 1
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_k_dim_cross_entropy(reduction):
    def fn(x, y):
        return F.cross_entropy(x, y, label_smoothing=0.05, reduction=reduction)

    rec = check(fn, logits(B, V, T), labels(B, T, ignore=-100, where=(2,)))
    assert rec.result.matches[0].params["classes"] == V


def test_k_dim_log_softmax_nll():
    def fn(x, y):
        return F.nll_loss(F.log_softmax(x, 1), y)

    check(fn, logits(B, V, 3, 2), labels(B, 3, 2))


def test_classes_last_hand_written_3d():
    # (B, T, V) log-probs over the last dim, no view: the op sees (B*T, V) rows
    def fn(x, y):
        lp = x.log_softmax(-1)
        return -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean()

    check(fn, logits(B, T, V), labels(B, T))


# ------------------------------------------------------------------------------------------------
# Language-model losses
# ------------------------------------------------------------------------------------------------


def lm_loss_token_mean(x, y):
    # transformers' ForCausalLMLoss shape: upcast, shift, flatten, sum, divide by the token count
    logits_ = x.float()
    shift_logits = logits_[..., :-1, :].contiguous()
    shift_labels = y[..., 1:].contiguous()
    loss = F.cross_entropy(shift_logits.view(-1, V), shift_labels.view(-1), ignore_index=-100,
                           reduction="sum")
    return loss / (shift_labels != -100).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_divided_by_token_count(dtype):
    rec = check(lm_loss_token_mean, logits(B, T + 1, V), labels(B, T + 1, ignore=-100, where=(3, 7)), dtype=dtype)
    (m,) = rec.result.matches
    assert m.params["dtype"] == ("bfloat16" if dtype == torch.bfloat16 else "float32")  # the logits as they are
    assert m.params["reduction"] == "mean"  # sum / (labels != -100).sum() is PyTorch's mean


class GoldensLM(TestCase):
    maxDiff = None

    def test_lm_golden(self):
        rec = check(lm_loss_token_mean, logits(B, T + 1, V), labels(B, T + 1, ignore=-100, where=(3,)))
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_x_ : torch.Tensor, L_y_ : torch.Tensor):
    l_x_ = L_x_
    l_y_ = L_y_
    getitem_1 = l_y_[(Ellipsis, slice(1, None, None))];  l_y_ = None
    shift_labels = getitem_1.contiguous();  getitem_1 = None
    getitem_2 = l_x_[(Ellipsis, slice(None, -1, None), slice(None, None, None))];  l_x_ = None
    reshape = getitem_2.reshape(-1, 11);  getitem_2 = None
    reshape_1 = shift_labels.reshape(-1);  shift_labels = None
    fused_cross_entropy = smoothce_kernels_cross_entropy_fused_cross_entropy(reshape, reshape_1, None, ignore_index = -100, reduction = 'mean');  reshape = reshape_1 = None
    return (fused_cross_entropy,)""")

    def test_hf_label_smoother_golden(self):
        trainer_pt_utils = pytest.importorskip("transformers.trainer_pt_utils")
        smoother = trainer_pt_utils.LabelSmoother(epsilon=0.1)

        def fn(x, y):
            return smoother((x,), y, shift_labels=True)

        rec = check(fn, logits(B, T + 1, V), labels(B, T + 1, ignore=-100, where=(2, 6)))
        (m,) = rec.result.matches
        self.assertEqual((m.family, m.params["eps"], m.params["convention"]), ("hand-written eps/V", 0.1, "eps/V"))
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_x_ : torch.Tensor, L_y_ : torch.Tensor):
    l_x_ = L_x_
    l_y_ = L_y_
    getitem_1 = l_y_[(Ellipsis, slice(1, None, None))];  l_y_ = None
    labels = getitem_1.contiguous();  getitem_1 = None
    labels_1 = labels.unsqueeze(-1)
    labels_2 = torch.clamp(labels_1, min = 0);  labels_1 = None
    getitem_2 = l_x_[(Ellipsis, slice(None, -1, None), slice(None, None, None))];  l_x_ = None
    reshape = getitem_2.reshape(-1, 11);  getitem_2 = None
    reshape_1 = labels_2.reshape(-1)
    ne = labels != -100;  labels = None
    reshape_2 = ne.reshape(-1);  ne = None
    where = torch.where(reshape_2, reshape_1, -100);  reshape_2 = reshape_1 = None
    reshape_3 = labels_2.reshape(-1);  labels_2 = None
    lt = reshape_3 < 0
    ge = reshape_3 >= 11;  reshape_3 = None
    or_ = lt | ge;  lt = ge = None
    where_1 = torch.where(or_, 11, where);  or_ = where = None
    fused_cross_entropy = smoothce_kernels_cross_entropy_fused_cross_entropy(reshape, where_1, None, ignore_index = -100, reduction = 'mean', label_smoothing = 0.1);  reshape = where_1 = None
    return (fused_cross_entropy,)""")


# ------------------------------------------------------------------------------------------------
# Hand-written label smoothing
# ------------------------------------------------------------------------------------------------


def smooth_masked_mul(x, y):
    lp = F.log_softmax(x, dim=-1)
    nll = -lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    smooth = -lp.mean(dim=-1)
    mask = (y != -100).float()
    loss = ((1 - EPS) * nll + EPS * smooth) * mask
    return loss.sum() / mask.sum()


def smooth_masked_fill(x, y):
    lp = torch.log_softmax(x, -1)
    pad = y == 0
    nll = -torch.gather(lp, 1, y[:, None])[:, 0]
    smooth = -lp.sum(-1) / V
    loss = (1.0 - EPS) * nll + EPS * smooth
    return loss.masked_fill(pad, 0.0).sum() / (~pad).sum()


def smooth_where_mean(x, y):
    # a mean over ALL rows of a masked loss: the op's per-row result, then .mean()
    lp = x.log_softmax(1)
    keep = y != -100
    nll = -lp.gather(1, torch.where(keep, y, 0).unsqueeze(1)).squeeze(1)
    loss = (1 - EPS) * nll - EPS * lp.mean(1)
    return torch.where(keep, loss, 0.0).mean()


def smooth_reduced_first(x, y):
    # every term reduced on its own, then combined, then normalised by the non-pad count
    lp = F.log_softmax(x, -1)
    mask = y != -100
    safe_y = y.masked_fill(~mask, 0)
    nll = (-lp.gather(-1, safe_y[:, None]).squeeze(-1) * mask).sum()
    smooth = (-lp.sum(-1) * mask).sum() / V
    return ((1 - EPS) * nll + EPS * smooth) / mask.sum()


def smooth_lse_by_hand(x, y):
    # log-probs spelled as x - logsumexp(x)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    lp = x - lse
    return ((EPS - 1) * lp.gather(-1, y[:, None]) - EPS / V * lp.sum(-1, keepdim=True)).mean()


HAND_EPS_V = [smooth_masked_mul, smooth_masked_fill, smooth_where_mean, smooth_reduced_first, smooth_lse_by_hand]


@pytest.mark.parametrize("fn", HAND_EPS_V, ids=lambda f: f.__name__)
def test_hand_written_eps_over_v(fn):
    ignore = 0 if fn is smooth_masked_fill else -100
    rec = check(fn, logits(N, V), labels(N, ignore=ignore, where=(1, 2)) if fn is not smooth_lse_by_hand
                else labels(N))
    (m,) = rec.result.matches
    assert m.family == "hand-written eps/V", m
    assert (m.params["eps"], m.params["convention"]) == (EPS, "eps/V"), m.params


def smooth_other_classes(x, y):
    # 1 - eps on the label, eps / (V - 1) on each other class
    lp = F.log_softmax(x, -1)
    nll = -lp.gather(1, y.unsqueeze(1)).squeeze(1)
    others = -lp.sum(-1) - nll
    mask = y != 0
    loss = (1 - EPS) * nll + EPS / (V - 1) * others
    return (loss * mask).sum() / mask.sum()


class GoldensHand(TestCase):
    maxDiff = None

    def test_eps_over_v_golden(self):
        rec = check(smooth_masked_mul, logits(N, V), labels(N, ignore=-100, where=(1, 2)))
        (m,) = rec.result.matches
        # the location is the line that produces the loss; the graph nodes it replaced are listed
        self.assertEqual(m.location, f"{FILE}:{inspect.getsourcelines(smooth_masked_mul)[1] + 6}")
        self.assertIn("lp", m.replaced)
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_x_ : torch.Tensor, L_y_ : torch.Tensor):
    l_x_ = L_x_
    l_y_ = L_y_
    clamp = l_y_.clamp(min = 0)
    ne_1 = l_y_ != -100;  l_y_ = None
    reshape = ne_1.reshape(-1);  ne_1 = None
    where = torch.where(reshape, clamp, -100);  reshape = None
    reshape_1 = clamp.reshape(-1);  clamp = None
    lt = reshape_1 < 0
    ge = reshape_1 >= 11;  reshape_1 = None
    or_ = lt | ge;  lt = ge = None
    where_1 = torch.where(or_, 11, where);  or_ = where = None
    fused_cross_entropy = smoothce_kernels_cross_entropy_fused_cross_entropy(l_x_, where_1, None, ignore_index = -100, reduction = 'mean', label_smoothing = 0.1);  l_x_ = where_1 = None
    return (fused_cross_entropy,)""")

    def test_eps_over_v_minus_one_golden(self):
        rec = check(smooth_other_classes, logits(N, V), labels(N, ignore=0, where=(0, 3)))
        (m,) = rec.result.matches
        self.assertEqual((m.family, m.params["eps"]), ("hand-written eps/(V-1)", EPS))
        # the constants the op gets are the user's: a = 1 - eps - eps/(V-1), b = eps/(V-1)
        self.assertEqual(m.params["uniform_coef"], EPS / (V - 1))
        self.assertExpectedInline(normalize(rec.gm.code), """\
def forward(self, L_x_ : torch.Tensor, L_y_ : torch.Tensor):
    l_x_ = L_x_
    l_y_ = L_y_
    fused_cross_entropy = smoothce_kernels_cross_entropy_fused_cross_entropy(l_x_, l_y_, None, ignore_index = 0, reduction = 'mean', label_smoothing = 0.1, smoothing = 'others');  l_x_ = l_y_ = None
    return (fused_cross_entropy,)""")


def test_hand_written_weighted():
    def fn(x, y, w):
        lp = F.log_softmax(x, -1)
        nll = -lp.gather(1, y[:, None]).squeeze(1) * w[y]
        smooth = -(lp * w).sum(-1)
        return ((1 - EPS) * nll + EPS / V * smooth).sum() / w[y].sum()

    rec = check(fn, logits(N, V), labels(N), WEIGHT)
    assert rec.result.matches[0].params["weight"] is not None


def test_eps_round_trips_exactly():
    # eps = 0.3 is not exact in binary; the op gets the graph's own constants, bit for bit
    def fn(x, y):
        lp = x.log_softmax(-1)
        return ((1 - 0.3) * -lp.gather(-1, y[:, None]).squeeze(-1) + 0.3 * -lp.mean(-1)).sum()

    rec = check(fn, logits(N, V), labels(N))
    (m,) = rec.result.matches
    assert m.params["eps"] == 0.3
    assert m.params["target_coef"] == 1 - 0.3
    assert m.params["uniform_coef"] == 0.3 / V  # 0.3 * (1/V) as an exact rational, rounded once


# ------------------------------------------------------------------------------------------------
# Smoothed target distributions
# ------------------------------------------------------------------------------------------------


def target_one_hot(x, y):
    t = F.one_hot(y, V).float() * (1 - EPS) + EPS / V
    return (-(t * F.log_softmax(x, -1)).sum(-1)).mean()


def target_scatter(x, y):
    t = torch.full_like(x, EPS / (V - 1)).scatter(1, y.unsqueeze(1), 1 - EPS)
    return torch.sum(-t * x.log_softmax(1), dim=1).sum()


def target_soft_cross_entropy(x, y):
    # probability targets built from the labels, through F.cross_entropy itself
    t = F.one_hot(y, V).to(x.dtype)
    return F.cross_entropy(x, t, label_smoothing=EPS)


@pytest.mark.parametrize("fn", [target_one_hot, target_scatter, target_soft_cross_entropy],
                         ids=lambda f: f.__name__)
def test_smoothed_targets(fn):
    rec = check(fn, logits(N, V), labels(N))
    (m,) = rec.result.matches
    expected = "cross_entropy" if fn is target_soft_cross_entropy else "smoothed-target"
    assert m.family == expected
    assert m.params["eps"] == EPS
    assert m.params["convention"] == ("eps/(V-1)" if fn is target_scatter else "eps/V")


# ------------------------------------------------------------------------------------------------
# KL divergence against a smoothed distribution
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_kl_div(reduction):
    def fn(x, y):
        p = torch.full_like(x, EPS / (V - 1)).scatter(1, y[:, None], 1 - EPS)
        return F.kl_div(F.log_softmax(x, 1), p, reduction=reduction)

    rec = check(fn, logits(N, V), labels(N))
    (m,) = rec.result.matches
    assert m.family == "kl_div"
    assert m.params["constant"] != 0.0  # sum p log p


def test_kl_div_module_one_hot_target():
    # a one-hot target (eps = 0): p log p = 0 everywhere
    kl = nn.KLDivLoss(reduction="batchmean")

    def fn(x, y):
        return kl(x.log_softmax(-1), F.one_hot(y, V).float())

    rec = check(fn, logits(N, V), labels(N))
    assert rec.result.matches[0].params["constant"] == 0.0


# ------------------------------------------------------------------------------------------------
# reduction='none', masked and averaged afterwards
# ------------------------------------------------------------------------------------------------


def test_none_reduction_masked_by_labels():
    def fn(x, y):
        ce = F.cross_entropy(x, y, reduction="none", label_smoothing=EPS)
        mask = y != 0
        return (ce * mask).sum() / mask.sum()

    rec = check(fn, logits(N, V), labels(N, ignore=0, where=(1, 3)))
    assert rec.result.matches[0].params["reduction"] == "sum"


def test_none_reduction_masked_by_attention_mask():
    # a mask that is not a label comparison: folded into the target as ignore_index rows
    def fn(x, y, attn):
        ce = F.cross_entropy(x.view(-1, V), y.view(-1), reduction="none")
        keep = attn.view(-1)
        return ce.masked_fill(~keep, 0.0).sum() / keep.sum()

    attn = torch.tensor([[True, True, False, True], [True, False, True, True]])
    check(fn, logits(B, T, V), labels(B, T, ignore=-100, where=(0,)), attn)


def test_none_reduction_kept_per_row():
    def fn(x, y):
        return F.cross_entropy(x, y, reduction="none").view(2, 3)

    check(fn, logits(N, V), labels(N))


# ------------------------------------------------------------------------------------------------
# z-loss and softcap
# ------------------------------------------------------------------------------------------------


def test_z_loss_by_hand():
    def fn(x, y):
        lse = torch.logsumexp(x, dim=-1)
        ce = F.cross_entropy(x, y, reduction="none", label_smoothing=EPS)
        mask = y != -100
        return ((ce + 1e-4 * lse.pow(2)) * mask).sum() / mask.sum()

    rec = check(fn, logits(N, V), labels(N, ignore=-100, where=(2,)))
    assert rec.result.matches[0].params["z_loss"] == 1e-4


def test_z_loss_with_different_mask_gets_its_own_call():
    # the z term covers ignored rows too: not the op's z-loss on the label term's rows, so a call
    # of its own computes it on every row
    def fn(x, y):
        return F.cross_entropy(x, y, reduction="sum") + 1e-4 * (torch.logsumexp(x, -1) ** 2).sum()

    rec = check(fn, logits(N, V), labels(N, ignore=-100, where=(2,)), calls=2)
    assert (rec.result.matches[0].params["z_loss"], rec.result.matches[0].params["calls"]) == (1e-4, 2)


def test_softcap():
    def fn(x, y):
        capped = 30.0 * torch.tanh(x / 30.0)
        return F.cross_entropy(capped.view(-1, V), y.view(-1))

    rec = check(fn, logits(B, T, V) * 10, labels(B, T))
    (m,) = rec.result.matches
    assert m.params["softcap"] == 30.0
    assert not any(op_name(n) == "tanh" for n in rec.gm.graph.nodes)


def test_z_loss_beside_a_padding_column_is_two_calls():
    # eps over every class but the padding column 0, rows labelled 0 kept: the label term with the
    # z term of its rows is one call, the smooth term with its padding column another, and
    # nothing of the row stays beside them
    def fn(x, y):
        lp = F.log_softmax(x, -1)
        nll = -lp.gather(-1, y[:, None]).squeeze(-1)
        smooth = -lp.sum(-1) + lp[:, 0]
        row = (1 - EPS) * nll + EPS / (V - 1) * smooth + 1e-4 * torch.logsumexp(x, -1) ** 2
        return row.mean()

    y = labels(N)
    y[1] = 0  # a row labelled with the padding class
    rec = check(fn, logits(N, V), y, calls=2)
    (m,) = rec.result.matches
    assert (m.params["calls"], m.params["z_loss"], rec.result.near_misses) == (2, 1e-4, [])


def test_padding_column_rows_kept_under_a_weight_mask():
    # one weight mask (given as data, not made from the labels) over label term, smooth term with
    # its padding column and z term: rows labelled 0 keep their weight
    def fn(x, y, m):
        lp = F.log_softmax(x, -1)
        nll = -lp.gather(1, y[:, None]).squeeze(1)
        smooth = -lp.sum(-1) + lp[:, 0]
        row = (1 - EPS - EPS / (V - 2)) * nll + EPS / (V - 2) * smooth + 1e-4 * torch.logsumexp(x, -1) ** 2
        return (row * m).sum() / m.sum()

    y = labels(N)
    y[1] = y[3] = 0
    rec = check(fn, logits(N, V), y, torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 1.0]), calls=2)
    assert rec.result.near_misses == []


# ------------------------------------------------------------------------------------------------
# Left alone, with a reason
# ------------------------------------------------------------------------------------------------


def _unchanged(fn, *inputs, grad=(0,)):
    rec = check(fn, *inputs, grad=grad, matches=0)
    assert fused_calls(rec.gm) == 0
    return [nm.reason for nm in rec.result.near_misses]


def test_log_probs_read_elsewhere_are_left_alone():
    def fn(x, y):
        lp = x.log_softmax(-1)
        return F.nll_loss(lp, y), lp.argmax(-1)

    reasons = _unchanged(fn, logits(N, V), labels(N))
    line = inspect.getsourcelines(fn)[1] + 2
    assert reasons == [f"log-probs also read at {FILE}:{line} (argmax)"]


def test_log_probs_returned_are_named_by_their_line():
    def fn(x, y):
        lp = x.log_softmax(-1)
        return F.nll_loss(lp, y), lp

    line = inspect.getsourcelines(fn)[1] + 1
    assert _unchanged(fn, logits(N, V), labels(N)) == [
        f"log-probs (log_softmax at {FILE}:{line}) also returned from the graph"]


def test_log_probs_indexed_by_other_tensors_say_how():
    def by_positions(x, y, rows):  # rows are not torch.arange: a row may be read twice
        return -x.log_softmax(-1)[rows, y].mean()

    rows = torch.tensor([0, 0, 1, 2, 3, 4])
    line = inspect.getsourcelines(by_positions)[1] + 1
    assert _unchanged(by_positions, logits(N, V), labels(N), rows) == [
        f"log-probs are indexed by tensors that are not the labels at the class dim and torch.arange at each "
        f"other dim (indexing at {FILE}:{line})"]


def test_log_probs_of_rows_a_boolean_mask_selects():
    def by_mask(x, y):  # the log-probs of x[y != 0]: the op reads those rows, however many
        return -x.log_softmax(-1)[y != 0].mean()

    (m,) = check(by_mask, logits(N, V), labels(N)).result.matches
    assert (m.params["reduction"], m.params["eps"]) == ("mean", 1.0)


def test_log_softmax_over_dim_0_is_left_alone():
    def fn(x, y):
        return F.nll_loss(F.log_softmax(x, 0), y)

    assert _unchanged(fn, logits(N, V), labels(N)) == [
        "log_softmax over dim 0, but nll_loss reads classes along dim 1"]


def test_per_row_factor_stays_user_arithmetic():
    # a per-row factor that is not a mask: the op gives the per-row loss, the rest stays as written
    def fn(x, y):
        lp = F.log_softmax(x, -1)
        return -(lp.gather(1, y[:, None]).squeeze(1) * torch.sigmoid(x[:, 0])).mean()

    rec = check(fn, logits(N, V), labels(N))
    (m,) = rec.result.matches
    # the op gives the label's log-prob per row (minus its cross-entropy), named as such
    assert (m.params["reduction"], m.family, m.form.scale) == ("none", "log-prob of the label", -1.0)
    assert any(op_name(n) is None and n.target is torch.sigmoid for n in rec.gm.graph.nodes)


def test_unknown_op_is_left_alone():
    def fn(x, y):  # entropy regulariser: exp of the log-probs is not part of the form
        lp = F.log_softmax(x, -1)
        return F.nll_loss(lp, y) - 0.1 * (lp.exp() * lp).sum(-1).mean()

    reasons = _unchanged(fn, logits(N, V), labels(N))
    line = inspect.getsourcelines(fn)[1] + 2
    assert reasons == [f"log-probs also read at {FILE}:{line} (exp)"], reasons


def focal_loss(x, y, gamma=2.0):
    logpt = F.log_softmax(x, -1).gather(1, y[:, None]).squeeze(1)
    pt = logpt.exp()
    return (-((1 - pt) ** gamma) * logpt).mean()


def poly1_loss(x, y, epsilon=1.0):
    ce = F.cross_entropy(x, y, reduction="none")
    pt = torch.sum(F.one_hot(y, V) * F.softmax(x, -1), dim=-1)
    return (ce + epsilon * (1 - pt)).mean()


def test_focal_loss_is_left_alone_in_words():
    # the label's log-prob goes through exp: not a cross-entropy, and not reported as one
    reasons = _unchanged(focal_loss, logits(N, V), labels(N))
    line = inspect.getsourcelines(focal_loss)[1] + 2
    assert reasons == [f"exp of a per-row loss at {FILE}:{line}: a focal, poly or entropy term, not a "
                       "cross-entropy; left as written"], reasons


def test_poly_loss_keeps_its_probability_term():
    # Poly-1: the cross-entropy is fused (one row each), the softmax term stays as written
    rec = check(poly1_loss, logits(N, V), labels(N), kept={"one_hot", "softmax"})
    (m,) = rec.result.matches
    assert (m.family, m.params["reduction"]) == ("cross_entropy", "none")
    assert any(op_name(n) == "softmax" for n in rec.gm.graph.nodes)


def test_labels_changed_in_place_are_left_alone():
    def fn(x, y):
        loss = F.cross_entropy(x, y, reduction="none")
        y.clamp_(max=V - 2)  # the op would run at .sum() and read the changed labels
        return loss.sum()

    rec = check(fn, logits(N, V), labels(N).clamp(min=V - 3), no_grad=True, matches=0)
    reasons = [nm.reason for nm in rec.result.near_misses]
    line = inspect.getsourcelines(fn)[1] + 2
    assert reasons == [f"y is changed in place by clamp_ at {FILE}:{line}"], reasons


# ------------------------------------------------------------------------------------------------
# Inference graphs and memory
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [lm_loss_token_mean, smooth_masked_mul, target_scatter], ids=lambda f: f.__name__)
def test_inference(fn):
    x = logits(B, T + 1, V) if fn is lm_loss_token_mean else logits(N, V)
    y = labels(*x.shape[:-1], ignore=-100, where=(1,)) if fn is not target_scatter else labels(N)
    check(fn, x, y, no_grad=True)


@pytest.mark.parametrize("fn", [target_one_hot, smooth_masked_mul], ids=lambda f: f.__name__)
def test_bf16(fn):
    y = labels(N, ignore=-100, where=(1,)) if fn is smooth_masked_mul else labels(N)
    check(fn, logits(N, V), y, dtype=torch.bfloat16)


def kl_batchmean(x, y):
    p = torch.full_like(x, EPS / (V - 1)).scatter(1, y[:, None], 1 - EPS)
    return F.kl_div(F.log_softmax(x, 1), p, reduction="batchmean")


@pytest.mark.parametrize("fn", [smooth_masked_mul, target_scatter, kl_batchmean, smooth_reduced_first],
                         ids=lambda f: f.__name__)
def test_only_the_logits_are_saved(fn):
    """Training: the forward graph saves exactly one (N, V) tensor for backward: the logits, which
    backward reads once to write their gradient (a few numbers per row besides)."""
    saved = []

    def fw(gm, inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        saved.extend(a.meta["val"].shape for a in out.args[0][1:] if isinstance(a, torch.fx.Node))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, _: make_boxed_func(gm.forward))

    def be(gm, inputs):
        rewrite_cross_entropy(gm)
        return backend(gm, inputs)

    x = logits(N, V).requires_grad_()
    torch.compile(fn, backend=be)(x, labels(N, ignore=-100, where=(1,)) if fn is not kl_batchmean
                                  and fn is not target_scatter else labels(N)).backward()
    assert [tuple(s) for s in saved if s.numel() >= N * V] == [(N, V)], saved


def test_dynamic_batch():
    """A symbolic batch size: the inserted reshapes use -1, one graph serves two batch sizes."""
    rec = Recorder()
    compiled = torch.compile(lm_loss_token_mean, backend=rec)
    for batch in (2, 3):
        x, y = logits(batch, T + 1, V), labels(batch, T + 1, ignore=-100, where=(1,))
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(y, 0)
        torch.testing.assert_close(compiled(x, y), lm_loss_token_mean(x, y))
    assert len(rec.results) == 1
    assert rec.results and all(len(r.matches) == 1 for r in rec.results), rec.results


def test_dynamic_class_count():
    # dynamic=True makes the class count symbolic for logits that are an input: the coefficients
    # depend on it, so the loss is left alone and the near miss says how to keep it static
    rec = Recorder()
    fn = torch.compile(smooth_masked_mul, backend=rec, dynamic=True)
    torch.testing.assert_close(fn(logits(N, V), labels(N)), smooth_masked_mul(logits(N, V), labels(N)))
    assert not [m for r in rec.results for m in r.matches]
    assert any(n.reason.startswith("the class count is dynamic") for r in rec.results for n in r.near_misses)
    # a head's weight keeps it static: the loss is rewritten under dynamic=True as well
    torch.manual_seed(0)
    model, h, y = TinyLM(), logits(B, T + 1, D, seed=9), labels(B, T + 1)
    rec = Recorder()
    torch.testing.assert_close(torch.compile(model, backend=rec, dynamic=True)(h, y), model(h, y))
    assert [m.family for r in rec.results for m in r.matches] == ["linear+cross_entropy"]


def test_mask_that_differs_between_classes_is_left_alone():
    def fn(x, y, keep):  # keep is (N, V): not a mask of rows
        lp = F.log_softmax(x, -1)
        return -(lp.masked_fill(~keep, 0.0) * F.one_hot(y, V)).sum()

    keep = torch.rand(N, V, generator=torch.Generator().manual_seed(4)) > 0.3
    reasons = _unchanged(fn, logits(N, V), labels(N), keep)
    line = inspect.getsourcelines(fn)[1] + 2
    assert reasons == [f"a mask of shape (6, 11) that is not one value per row (masked_fill at {FILE}:{line})"], reasons


def test_learned_class_weight_stays_user_arithmetic():
    def fn(x, y, w):  # a class weight that is trained: the op must not absorb it (no weight grad)
        lp = F.log_softmax(x, -1)
        return -(lp.gather(1, y[:, None]).squeeze(1) * w[y]).sum()

    rec = check(fn, logits(N, V), labels(N), WEIGHT, grad=(0, 2))
    (m,) = rec.result.matches
    assert (m.params["weight"], m.params["reduction"]) == (None, "none")


def test_log_softmax_dtype_upcast():
    def fn(x, y):
        return F.nll_loss(F.log_softmax(x, -1, dtype=torch.float32), y)

    rec = check(fn, logits(N, V), labels(N), dtype=torch.bfloat16)
    (m,) = rec.result.matches
    assert (m.params["dtype"], m.params["loss_dtype"]) == ("bfloat16", "float32")
    assert_reads_logits_in_their_dtype(rec.gm, torch.float32)


def assert_reads_logits_in_their_dtype(gm, loss_dtype):
    """No float32 copy of the logits: the op reads them as they are and returns loss_dtype."""
    assert not any(op_name(n) == "cast" for n in gm.graph.nodes), gm.code
    (call,) = [n for n in gm.graph.nodes if n.target in (fused_cross_entropy, fused_linear_cross_entropy)]
    assert call.kwargs["loss_dtype"] == loss_dtype


# ------------------------------------------------------------------------------------------------
# LM head + cross-entropy -> fused linear cross-entropy
# ------------------------------------------------------------------------------------------------

D = 5


class TinyLM(nn.Module):
    """An LM head and the loss of transformers' causal LMs, with a logit temperature."""

    def __init__(self, matmul=False, return_logits=False):
        super().__init__()
        self.head = nn.Linear(D, V, bias=False)
        self.matmul, self.return_logits = matmul, return_logits

    def forward(self, h, y):
        logits = h @ self.head.weight.t() if self.matmul else self.head(h)
        logits = logits.float() / 2.0
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = y[..., 1:].contiguous()
        loss = F.cross_entropy(shift_logits.view(-1, V), shift_labels.view(-1), label_smoothing=EPS)
        return (loss, logits) if self.return_logits else loss


def check_head(model, **kwargs):
    """check() plus the head weight's gradient against a float64 copy of the model."""
    h = logits(B, T + 1, D, seed=9)
    y = labels(B, T + 1, ignore=-100, where=(2, 6))
    reference = copy.deepcopy(model).double()
    rec = check(model, h, y, reference=reference, fuse_linear=True, **kwargs)
    torch.testing.assert_close(model.head.weight.grad.double(), reference.head.weight.grad, atol=1e-5, rtol=1e-5)
    return rec


@pytest.mark.parametrize("matmul", [False, True], ids=["linear", "matmul"])
def test_linear_cross_entropy(matmul):
    torch.manual_seed(0)
    rec = check_head(TinyLM(matmul=matmul))
    (m,) = rec.result.matches
    assert m.family == "linear+cross_entropy"
    assert m.params["logit_scale"] == 0.5
    assert not any(op_name(n) == "reshape" and shape_of(n)[-1] == V for n in rec.gm.graph.nodes)


def shape_of(node):
    return tuple(node.meta["example_value"].shape) if "example_value" in node.meta else (None,)


def test_logits_returned_keep_the_plain_op():
    torch.manual_seed(0)
    rec = check_head(TinyLM(return_logits=True))
    (m,) = rec.result.matches
    assert m.family == "cross_entropy"
    line = inspect.getsourcelines(TinyLM.forward)[1] + 1
    assert [nm.reason for nm in rec.result.near_misses] == [
        f"not fused with the linear layer that produces the logits (linear at {FILE}:{line}): "
        "the logits are returned to the caller"]


@pytest.mark.parametrize("fuse_linear, family", [(None, "linear+cross_entropy"), (False, "cross_entropy")])
def test_linear_fusion_is_the_default_and_can_be_turned_off(fuse_linear, family):
    torch.manual_seed(0)
    model = TinyLM()
    h, y = logits(B, T + 1, D, seed=9), labels(B, T + 1)
    graphs = []

    def backend(gm, inputs):
        kwargs = {} if fuse_linear is None else {"fuse_linear": fuse_linear}
        graphs.append(rewrite_cross_entropy(gm, **kwargs))
        return aot_eager(gm, inputs)

    torch.testing.assert_close(torch.compile(model, backend=backend)(h, y), model(h, y))
    assert [m.family for m in graphs[0].matches] == [family]


def test_rows_reduced_before_classes():
    # mean over the rows first, then the sum over the classes: the same loss
    def fn(x, y):
        t = F.one_hot(y, V) * (1 - EPS) + EPS / V
        return -(t * x.log_softmax(-1)).mean(0).sum()

    rec = check(fn, logits(N, V), labels(N))
    assert rec.result.matches[0].params["reduction"] == "mean"


@pytest.mark.inductor
def test_rewritten_graph_through_inductor():
    """The rewritten graph (the op's fake, autograd and the leftover arithmetic) under Inductor."""
    from torch._inductor.compile_fx import compile_fx

    results = []

    def backend(gm, inputs):
        results.append(rewrite_cross_entropy(gm))
        return compile_fx(gm, inputs)

    assert_equals_eager_in_float64(torch.compile(smooth_masked_mul, backend=backend), smooth_masked_mul,
                                   logits(N, V), labels(N, ignore=-100, where=(1,)))
    assert [m.family for r in results for m in r.matches] == ["hand-written eps/V"]


def test_grad_mode_switch_inside_the_loss_is_left_alone():
    def fn(x, y):
        with torch.no_grad():
            lp = x.log_softmax(-1)  # log-probs without a gradient ...
        return F.nll_loss(lp, y) + (x * 0).sum()  # ... in a loss that has one

    reasons = _unchanged(fn, logits(N, V), labels(N))
    assert len(reasons) == 1 and reasons[0].startswith("the grad mode changes inside the loss"), reasons


def test_bf16_log_probs_with_a_float32_target_give_a_float32_loss():
    # bf16 logits, float32 loss: the op reads the bf16 logits and returns the loss in float32
    def fn(x, y):
        t = F.one_hot(y, V).float() * (1 - EPS) + EPS / V
        return -(t * x.log_softmax(-1)).sum(-1).mean()

    rec = check(fn, logits(N, V), labels(N), dtype=torch.bfloat16)  # the float32 loss to float32 accuracy
    assert_reads_logits_in_their_dtype(rec.gm, torch.float32)


def test_targets_built_under_no_grad():
    # the classic recipe: the smoothed distribution is built under no_grad between lp and the loss
    def fn(x, y):
        lp = x.log_softmax(-1)
        with torch.no_grad():
            t = torch.full_like(lp, EPS / (V - 1)).scatter(1, y[:, None], 1 - EPS)
        return torch.mean(torch.sum(-t * lp, dim=-1))

    rec = check(fn, logits(N, V), labels(N))
    assert rec.result.matches[0].family == "smoothed-target"


def test_kl_div_none_masked():
    def fn(x, y):
        p = F.one_hot(y.clamp(min=0), V) * (1 - EPS) + EPS / V
        kl = F.kl_div(F.log_softmax(x, -1), p, reduction="none").sum(-1)
        mask = y != -100
        return (kl * mask).sum() / mask.sum()

    rec = check(fn, logits(N, V), labels(N, ignore=-100, where=(0, 4)))
    (m,) = rec.result.matches
    # (kl * mask).sum() / mask.sum() with mask = y != -100 is the op's mean over kept rows
    assert (m.family, m.params["reduction"], m.params["ignore_index"]) == ("kl_div", "mean", -100)


def test_graph_without_a_loss_is_untouched():
    # attention, a gather of logits, a logsumexp used as a feature: nothing to rewrite, no crash
    def fn(q, k, idx):
        att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
        picked = (q @ k.transpose(-1, -2)).gather(-1, idx[:, None]).squeeze(-1)
        return att.sum(-1) + picked + torch.logsumexp(q, -1)

    q, k = logits(N, V, seed=11), logits(N, V, seed=12)
    rec = check(fn, q, k, labels(N), grad=(0, 1), matches=0)
    assert rec.result.near_misses == []


def test_analyze_changes_nothing():
    from smoothce.patterns.cross_entropy import analyze_cross_entropy

    seen = []

    def backend(gm, inputs):
        before = gm.code
        plans, misses = analyze_cross_entropy(gm)
        seen.append((len(plans), misses, gm.code == before))
        return aot_eager(gm, inputs)

    torch.compile(smooth_masked_mul, backend=backend)(logits(N, V), labels(N))
    assert seen == [(1, [], True)]


def test_k_dim_hand_written():
    # classes along dim 1 of (B, V, T), smoothing by hand, padding mask
    def fn(x, y):
        lp = x.log_softmax(1)
        keep = y != 0
        nll = -lp.gather(1, y.unsqueeze(1)).squeeze(1)
        loss = (1 - EPS) * nll - EPS * lp.mean(1)
        return (loss * keep).sum() / keep.sum()

    rec = check(fn, logits(B, V, T), labels(B, T, ignore=0, where=(1, 5)))
    assert rec.result.matches[0].params["ignore_index"] == 0


def fairseq_label_smoothed_nll_loss(lprobs, target, epsilon, ignore_index=None):
    # fairseq's criterion: eps / (V - 1) on the other classes, pads masked in place
    if target.dim() == lprobs.dim() - 1:
        target = target.unsqueeze(-1)
    nll_loss = -lprobs.gather(dim=-1, index=target)
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    pad_mask = target.eq(ignore_index)
    nll_loss.masked_fill_(pad_mask, 0.0)
    smooth_loss.masked_fill_(pad_mask, 0.0)
    nll_loss = nll_loss.sum()
    smooth_loss = smooth_loss.sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss
    return loss, nll_loss


def test_fairseq_criterion():
    def fn(x, y):
        return fairseq_label_smoothed_nll_loss(F.log_softmax(x, -1), y, EPS, ignore_index=1)[0]

    rec = check(fn, logits(N, V), labels(N, ignore=1, where=(0, 2)))
    (m,) = rec.result.matches
    assert (m.family, m.params["eps"], m.params["ignore_index"]) == ("hand-written eps/(V-1)", EPS, 1)


def test_fairseq_criterion_returning_nll_gets_its_own_call():
    # the nll part is returned too (for logging): each output gets its op call, no log-probs stay
    def fn(x, y):
        return fairseq_label_smoothed_nll_loss(F.log_softmax(x, -1), y, EPS, ignore_index=1)

    rec = check(fn, logits(N, V), labels(N, ignore=1, where=(0,)), matches=2)
    assert sorted(m.params["eps"] for m in rec.result.matches) == [0.0, EPS]


@pytest.mark.parametrize("how", ["mul_", "scatter_", "setitem", "label clamp_"])
def test_targets_and_labels_changed_in_place(how):
    # the algebra must never use a value from before an in-place change it does not follow
    def fn(x, y):
        lp = x.log_softmax(-1)
        if how == "label clamp_":
            y2 = y.clone()
            y2.clamp_(max=V - 3)
            return -lp.gather(1, y2[:, None]).sum()
        t = F.one_hot(y, V).float()
        if how == "mul_":
            t.mul_(1 - EPS)
        elif how == "scatter_":
            t.scatter_(1, y[:, None], 0.5)
        else:
            t[:, 0] = 0.25
        return -(t * lp).sum()

    y = labels(N).clamp(min=V - 4)
    rec = check(fn, logits(N, V), y, matches=None)
    # a change the algebra follows (on the fresh float one-hot) is in the coefficients; any other
    # may only stay as user arithmetic
    label_coef = {"mul_": 1 - EPS, "scatter_": 0.5}.get(how, 1.0)
    for m in rec.result.matches:
        assert m.params["target_coef"] == label_coef and m.params["uniform_coef"] == 0.0
