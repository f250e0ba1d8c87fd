"""A rewrite never changes a result: the compiled loss equals eager, or raises what eager raises.

Each case runs the eager function first. When eager raises, the compiled function must raise an
exception of the same type with the same message, or for a label outside the classes the op's
error (both the IndexError of nll_loss and the RuntimeError of gather and indexing); otherwise the
values (and dtypes) must agree.
"""

import inspect
import os

import pytest
import torch
import torch.nn.functional as F

from rewrite_check import B, EPS, N, T, V, Recorder, assert_raises_as_eager, labels, logits

from smoothce import compat

FILE = os.path.basename(__file__)


def same_as_eager(fn, *inputs, rewritten=True):
    """fn compiled with the detector agrees with eager on these inputs; returns the Recorder."""
    rec = Recorder()
    compiled = torch.compile(fn, backend=rec)
    try:
        expected = fn(*inputs)
    except (RuntimeError, IndexError) as err:  # what eager raises is the expected result
        assert_raises_as_eager(lambda: compiled(*inputs), err)
    else:
        got = compiled(*inputs)
        assert got.dtype == expected.dtype and got.shape == expected.shape, (got, expected)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    if rewritten is not None:
        assert bool(sum(len(r.matches) for r in rec.results)) == rewritten, rec.results
    return rec


def with_label(value, at=2):
    y = labels(N)
    y[at] = value
    return y


def gather_nll(x, y):
    return -x.log_softmax(-1).gather(1, y[:, None]).mean()


def gather_nll_masked_by_attention(x, y, attn):
    nll = -x.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    return (nll * attn).sum() / attn.sum()


def indexed_nll(x, y):
    return -x.log_softmax(-1)[torch.arange(N), y].mean()


def clamped_gather(x, y):
    keep = y != -100
    nll = -x.log_softmax(-1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    return (nll * keep).sum() / keep.sum()


def arange_one_hot(x, y):
    t = (torch.arange(V) == y[:, None]).float() * (1 - EPS) + EPS / V
    return -(t * x.log_softmax(-1)).sum(-1).mean()


def one_hot_target(x, y):
    return -(F.one_hot(y, V) * x.log_softmax(-1)).sum(-1).mean()


def take_along_nll(x, y):
    return -torch.take_along_dim(x.log_softmax(-1), y[:, None], dim=1).mean()


def target_by_index_assignment(x, y):
    p = torch.full_like(x, EPS / (V - 1))
    p[torch.arange(x.shape[0]), y] = 1 - EPS
    return -(p * x.log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("fn, label", [
    (gather_nll, -100),  # a stray ignore value the code never masks: eager raises, so must we
    (gather_nll, V),
    (indexed_nll, -1),  # advanced indexing: -1 is the last class
    (indexed_nll, -100),
    (clamped_gather, -5),  # kept by the mask, clamped to class 0 by the user's code
    (arange_one_hot, -5),  # matches no class: that row has the smoothing term only
    (arange_one_hot, V + 3),
    (one_hot_target, -1),
    (gather_nll, -1),
    (take_along_nll, -1),  # take_along_dim reads y mod V: no label raises
    (take_along_nll, -5),
    (take_along_nll, V),
    (take_along_nll, 100),
    (take_along_nll, -100),
    (target_by_index_assignment, -1),  # writes the last class
    (target_by_index_assignment, -V - 1),
    (target_by_index_assignment, V),
], ids=lambda v: getattr(v, "__name__", repr(v)))
def test_labels_outside_the_classes(fn, label):
    same_as_eager(fn, logits(N, V), with_label(label))


def indexed_nll_over_time(x, y):
    b, t, _ = x.shape
    return -x.log_softmax(-1)[torch.arange(b)[:, None], torch.arange(t)[None, :], y].mean()


@pytest.mark.parametrize("label", [-1, -V, -V - 1, V, -100])
def test_labels_outside_the_classes_over_time(label):
    # advanced indexing of (B, T, V): -V to -1 count from the end, the rest raise
    y = labels(B, T)
    y[1, 2] = label
    same_as_eager(indexed_nll_over_time, logits(B, T, V), y)


def one_hot_of_labels_per_class(x, labels_per_class):
    return -((torch.arange(V) == labels_per_class).float() * x.log_softmax(-1)).sum(-1).mean()


def one_hot_of_one_label_for_every_row(x, y):
    return -(F.one_hot(y[:1], V).float() * x.log_softmax(-1)).sum(-1).mean()


def test_labels_that_are_not_one_per_row_are_left_alone():
    # the op reads one label per row: a label per class, or one label broadcast over the rows, is not that
    per_class = torch.randint(0, V, (N, V), generator=torch.Generator().manual_seed(3))
    same_as_eager(one_hot_of_labels_per_class, logits(N, V), per_class, rewritten=False)
    rec = same_as_eager(one_hot_of_one_label_for_every_row, logits(N, V), labels(N), rewritten=False)
    (miss,) = rec.results[0].near_misses
    line = inspect.getsourcelines(one_hot_of_one_label_for_every_row)[1] + 1
    assert miss.reason == (f"a one-hot of shape (1, {V}) is broadcast to ({N}, {V}) (mul at {FILE}:{line}); the op "
                           "takes one label per row"), miss


def test_a_label_on_a_masked_row_that_eager_gathers():
    # the attention mask drops row 2, but eager's gather still reads its label -100 and raises
    attn = torch.ones(N)
    attn[2] = 0
    same_as_eager(gather_nll_masked_by_attention, logits(N, V), with_label(-100), attn)
    same_as_eager(gather_nll_masked_by_attention, logits(N, V), with_label(4), attn)


@pytest.mark.parametrize("eps", [-0.1, 0.0, 1.0])
def test_label_smoothing_at_and_past_its_bounds(eps):
    # PyTorch smooths only for eps > 0: a negative eps is no smoothing
    same_as_eager(lambda x, y: F.cross_entropy(x, y, label_smoothing=eps), logits(N, V), labels(N))


def test_label_smoothing_above_one_raises_as_eager():
    same_as_eager(lambda x, y: F.cross_entropy(x, y, label_smoothing=1.5), logits(N, V), labels(N),
                  rewritten=None)


@pytest.mark.parametrize("fn", [lambda x, y: F.cross_entropy(x, y), gather_nll, take_along_nll],
                         ids=["cross_entropy", "gather", "take_along_dim"])
def test_int32_labels(fn):
    # eager's verdict on int32 labels (nll_loss refuses them, gather takes them on recent torch)
    same_as_eager(fn, logits(N, V), labels(N).int(), rewritten=None)


def test_int32_labels_of_a_one_hot_are_left_alone():
    # eager's one_hot refuses int32; torch.compile accepts them where it traces one_hot by a
    # decomposition (2.13): the detector keeps out of it. Elsewhere (2.11) Dynamo raises as eager does.
    rec = Recorder()
    compiled = torch.compile(one_hot_target, backend=rec)
    if not compat.one_hot_traces_int32_labels():
        with pytest.raises(RuntimeError, match="one_hot is only applicable to index tensor of type LongTensor"):
            compiled(logits(N, V), labels(N).int())
        assert not rec.results
        return
    compiled(logits(N, V), labels(N).int())
    (result,) = rec.results
    assert not result.matches
    (miss,) = result.near_misses
    line = inspect.getsourcelines(one_hot_target)[1] + 1
    assert miss.reason == (f"the labels y are int32, which one_hot at {FILE}:{line} rejects: eager raises, "
                           "so the loss is left to it"), miss


@pytest.mark.parametrize("smoothing", ["all", "others"])
def test_one_class(smoothing):
    def fn(x, y):
        if smoothing == "all":
            return F.cross_entropy(x, y, label_smoothing=0.1)
        lp = x.log_softmax(-1)
        return (-(0.9 * lp.gather(1, y[:, None])) - 0.1 * lp.sum(-1, keepdim=True)).mean()

    same_as_eager(fn, logits(N, 1), torch.zeros(N, dtype=torch.long))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    # nan for 'mean' (0 / 0), 0 for 'sum', an empty tensor for 'none'
    same_as_eager(lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1, reduction=reduction),
                  logits(0, V), labels(0))
