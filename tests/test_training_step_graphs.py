"""The forward and backward graphs of a compiled training step: the logits' size is read or written
three times in all, by smoothce's ops only, whatever the incoming gradient.

Read from the graphs AOTAutograd hands its compilers: a capturing AOT backend after the rewrite
(min-cut partitioning, as Inductor's), and Inductor's own post-grad graphs under
backend="smoothce" and register_patterns() (marker ``inductor``). Every case also checks the loss
and the logits' gradient against float64 eager.
"""

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from logits_access import accesses, graph_calls
from reference import reference
from torch._dynamo.backends.common import aot_autograd
from torch.testing._internal.common_utils import TestCase

import smoothce
from smoothce import compat
from smoothce.compiler.backend import rewrite_pass

N, V, D = 8, 50, 16
THREE = [("smoothce.cross_entropy_stats", 1, 0), ("smoothce.cross_entropy_grad", 1, 1)]


def _handwritten(x, y, eps=0.1):
    # label smoothing written out, as training scripts do
    logp = torch.log_softmax(x, dim=-1)
    keep = y != -100
    nll = -logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (((1.0 - eps) * nll - eps * logp.mean(dim=-1)) * keep).sum() / keep.sum()


# Each loss as user code writes it, with the incoming gradient the logits' loss term receives.
CASES = {
    "plain": lambda x, y, s: F.cross_entropy(x, y, label_smoothing=0.1),  # loss.backward(): 1
    "accumulated": lambda x, y, s: F.cross_entropy(x, y) / 4,  # a constant: 0.25
    "tensor_scale": lambda x, y, s: F.cross_entropy(x, y, label_smoothing=0.1) * s[0],  # known when it runs
    "rows_weighted": lambda x, y, s: (F.cross_entropy(x, y, reduction="none") * s).sum(),  # one per row
    "handwritten": lambda x, y, s: _handwritten(x, y),
    "op": lambda x, y, s: smoothce.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3) * s[0],
}
# The float64 oracle of each case: eager PyTorch on the same code, except where that code is
# smoothce's own op (its float64 eager run is the torch path, not an oracle).
REFERENCES = {"op": lambda x, y, s: reference(x, y, label_smoothing=0.1, z_loss=1e-3) * s[0]}


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, V, generator=g) * 2).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 5]] = -100
    s = torch.linspace(-1.5, 2.0, N)  # row weights; s[0] a scale
    return x, y, s


def aot_capturing():
    """A backend that rewrites like smoothce_aot_eager and keeps the forward and backward graphs."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        rewrite_pass.rewrite_recursive(gm)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep,
                            partition_fn=min_cut_rematerialization_partition)(gm, example_inputs)

    return backend, graphs


class PostGradGraphs(compat.CustomGraphPass):
    """Inductor's forward and backward graphs after its own passes, as an Inductor option."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append(graph)

    def uuid(self):
        return None  # never from the cache: the graphs must be built to be seen


def _step(case, backend, **compile_kwargs):
    """One forward and backward of CASES[case] compiled with ``backend``, checked against float64."""
    fn = CASES[case]
    x, y, s = _inputs()
    loss = torch.compile(fn, backend=backend, fullgraph=True, **compile_kwargs)(x, y, s)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    ref = REFERENCES.get(case, fn)(x64, y, s.double())
    ref.backward()
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def _accesses(graphs):
    return [a for g in graphs for a in accesses(graph_calls(g), N * V)]


@pytest.fixture(autouse=True)
def _fresh_pass():
    rewrite_pass.clear()
    yield
    rewrite_pass.clear()


@pytest.mark.parametrize("case", list(CASES))
def test_the_step_reads_or_writes_the_logits_three_times(case):
    backend, graphs = aot_capturing()
    _step(case, backend)
    assert len(graphs) == 2  # a forward and a backward
    assert _accesses(graphs) == THREE


def test_a_fused_head_never_has_the_logits():
    # The head's matmul and the loss are one op: nothing of the logits' size exists, and the
    # incoming gradient scales the (N, D) and (V, D) results.
    backend, graphs = aot_capturing()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    loss = torch.compile(lambda h, w, y: F.cross_entropy(F.linear(h, w), y, label_smoothing=0.1) / 3,
                         backend=backend, fullgraph=True)(h, w, y)
    loss.backward()
    calls = [c for gm in graphs for c in graph_calls(gm)]
    assert any(str(op).startswith("smoothce.linear_cross_entropy") for op, _, _ in calls)
    assert accesses(calls, N * V) == []


class TestStepGraphGolden(TestCase):
    def test_golden(self):
        backend, graphs = aot_capturing()
        _step("rows_weighted", backend)
        lines = [f"{kind}: {op} reads {r} writes {w}" for kind, gm in zip(("forward", "backward"), graphs)
                 for op, r, w in accesses(graph_calls(gm), N * V)]
        self.assertExpectedInline("\n".join(lines), """\
forward: smoothce.cross_entropy_stats reads 1 writes 0
backward: smoothce.cross_entropy_grad reads 1 writes 1""")


# --- Inductor's own graphs ------------------------------------------------------------------------

INDUCTOR_CASES = ["plain", "tensor_scale", "rows_weighted"]


@pytest.mark.inductor
@pytest.mark.parametrize("case", INDUCTOR_CASES)
def test_backend_smoothce_step_reads_or_writes_the_logits_three_times(case):
    spy = PostGradGraphs()
    with compat.fresh_inductor_cache():
        _step(case, "smoothce", options={"post_grad_custom_post_pass": spy})
    assert len(spy.graphs) == 2
    assert _accesses(spy.graphs) == THREE


@pytest.mark.inductor
@pytest.mark.parametrize("case", INDUCTOR_CASES)
def test_register_patterns_step_reads_or_writes_the_logits_three_times(case):
    spy = PostGradGraphs()
    smoothce.register_patterns()
    try:
        with compat.fresh_inductor_cache():
            _step(case, "inductor", options={"post_grad_custom_post_pass": spy})
    finally:
        smoothce.unregister_patterns()
    assert len(spy.graphs) == 2
    assert _accesses(spy.graphs) == THREE
