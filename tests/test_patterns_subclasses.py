"""Never worse than Inductor: a loss the op cannot take is left as written, with a near miss.

Tensor subclasses run their own code for every op on them, which knows nothing of smoothce's:
logits, labels or class weights that are one (here torch's TwoTensor, which runs each op on two
tensors) leave the loss alone, and a head whose weight is one is not fused. An exception while a
rewrite is emitted leaves the graph exactly as it was. Each case must still compute what eager
does.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.two_tensor import TwoTensor

from rewrite_check import Recorder, fused_calls, normalize
from smoothce.patterns import emit

N, V, D = 6, 11, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, V, generator=g), torch.randn(N, V, generator=g),
            torch.randint(0, V, (N,), generator=g), torch.rand(V, generator=g) + 0.5)


def _compiled(fn, *args):
    rec = Recorder(fuse_linear=True)
    out = torch.compile(fn, backend=rec, fullgraph=True)(*args)
    return out, rec


def _reasons(rec) -> list:
    return [m.reason for r in rec.results for m in r.near_misses]


def _same(out, ref):
    for part in ("a", "b"):
        torch.testing.assert_close(getattr(out, part), getattr(ref, part), rtol=1e-6, atol=1e-6)


def test_subclass_logits_left_alone():
    x, x2, y, _ = _inputs()

    def loss(x, y):
        return F.cross_entropy(x, y, label_smoothing=0.1)

    out, rec = _compiled(loss, TwoTensor(x, x2), y)
    _same(out, loss(TwoTensor(x, x2), y))
    assert rec.result.matches == []
    assert _reasons(rec) == ["the logits (x) are a TwoTensor, a tensor subclass smoothce's op has no rule for: "
                             "the loss is left to PyTorch"]


def test_subclass_class_weights_left_alone():
    x, _, y, w = _inputs()

    def loss(x, y, w):
        return F.cross_entropy(x, y, weight=w)

    out, rec = _compiled(loss, x, y, TwoTensor(w, 2 * w))
    _same(out, loss(x, y, TwoTensor(w, 2 * w)))
    assert rec.result.matches == []
    assert _reasons(rec) == ["the class weights (w) are a TwoTensor, a tensor subclass smoothce's op has no "
                             "rule for: the loss is left to PyTorch"]


class Dequantized(torch.Tensor):
    """A weight stored apart that every op reads as a plain tensor (as quantized weights are read):
    its linear layer's logits are plain, only the weight is a subclass."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=data.device,
                                                   requires_grad=data.requires_grad)

    def __init__(self, data):
        self.data_ = data

    def __tensor_flatten__(self):
        return ["data_"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Dequantized(inner["data_"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.data_ if isinstance(t, Dequantized) else t  # noqa: E731
        return func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))

    def __repr__(self):
        return f"Dequantized({self.data_!r})"


def test_head_with_a_subclass_weight_is_not_fused():
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    y = _inputs()[2]

    def loss(h, W, y):
        return F.cross_entropy(F.linear(h, W), y, label_smoothing=0.1)

    out, rec = _compiled(loss, h, Dequantized(W), y)
    torch.testing.assert_close(out, loss(h, W, y), rtol=1e-6, atol=1e-6)
    assert [m.family for m in rec.result.matches] == ["cross_entropy"]
    line = loss.__code__.co_firstlineno + 1
    assert _reasons(rec) == [f"not fused with the linear layer that produces the logits (linear at "
                             f"test_patterns_subclasses.py:{line}): W is a Dequantized, a tensor subclass the fused "
                             "head has no rule for"]


def test_an_exception_while_emitting_leaves_the_graph_as_it_was(monkeypatch):
    x, _, y, _ = _inputs()
    before = []

    def failing_ops():
        def fails(*args, **kwargs):
            raise RuntimeError("no kernel for these inputs\nsecond line")

        return fails, fails

    class Backend(Recorder):
        def __call__(self, gm, example_inputs):
            before.append(normalize(gm.code))
            return super().__call__(gm, example_inputs)

    def loss(x, y):
        return F.cross_entropy(x, y, label_smoothing=0.1, ignore_index=3)

    monkeypatch.setattr(emit, "_ops", failing_ops)
    rec = Backend()
    out = torch.compile(loss, backend=rec, fullgraph=True)(x, y)
    torch.testing.assert_close(out, loss(x, y), rtol=1e-6, atol=1e-6)
    assert rec.result.matches == []
    assert _reasons(rec) == ["the rewrite raised RuntimeError (no kernel for these inputs): the loss is left as "
                             "written"]
    assert normalize(rec.gm.code) == before[0]
    assert fused_calls(rec.gm) == 0


@pytest.mark.parametrize("failing", ["first", "second"])
def test_one_failing_loss_leaves_the_others_rewritten(monkeypatch, failing):
    x, x2, y, _ = _inputs()
    real = emit._ops()
    calls = []

    def op(*args, **kwargs):
        calls.append(1)
        if len(calls) == {"first": 1, "second": 2}[failing]:
            raise ValueError("cannot")
        return real[0](*args, **kwargs)

    def losses(x, x2, y):
        return F.cross_entropy(x, y), F.cross_entropy(x2, y, label_smoothing=0.1)

    monkeypatch.setattr(emit, "_ops", lambda: (op, real[1]))
    out, rec = _compiled(losses, x, x2, y)
    for o, r in zip(out, losses(x, x2, y)):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    assert len(rec.result.matches) == 1
    assert sum(n.target is op for n in rec.gm.graph.nodes) == 1
    assert _reasons(rec) == ["the rewrite raised ValueError (cannot): the loss is left as written"]
