"""Tensor parallelism compiled with smoothce, on 2 and 4 CPU processes with gloo (tests/ranks.py).

A two-layer model whose LM head is ``ColwiseParallel(use_local_output=False)``: its logits are a
DTensor sharded on the classes (V = 11, so the last shard is smaller). The loss is written as
people write it: ``F.cross_entropy`` with replicated DTensor labels, the same inside
``loss_parallel()`` with plain labels, label smoothing written out inside ``loss_parallel()`` (which
refuses ``label_smoothing``), or by hand (softcap, log_softmax, nll_loss, z-loss). Each becomes,
with the head, the split fused head (kernels/linear_vocab_parallel.py); where the logits are also
returned, the head stays and the loss becomes the vocab-parallel op (kernels/vocab_parallel.py),
with a near miss. Every rank's loss and every parameter's gradient
(the head's gathered from its shards) must equal the loss of the whole model in float64 in one
process (tests/reference.py's loss of the whole logits). DTensors placed otherwise are left to
PyTorch with a near miss.
"""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ranks import world_mesh
from reference import reference

N, D_IN, D, V = 7, 8, 16, 11
CAP = 3.0

# fp32 against float64: two small matmuls and a mean over 7 rows of terms of size log(11)
RTOL, ATOL = 1e-5, 1e-6


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D_IN, D)
        self.head = torch.nn.Linear(D, V, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def _data(case: dict):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[-1] = V - 1  # a label in the last shard
    if case.get("ignore"):
        y[2] = -100
    w = torch.rand(V, generator=g) + 0.5 if case.get("weight") else None
    return x, y, w


def _model():
    torch.manual_seed(0)
    return TinyModel()


# -- the losses, as written ------------------------------------------------------------------


def _replicated(t, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return None if t is None else DTensor.from_local(t, mesh, [Replicate()], run_check=False)


def cross_entropy_loss(model, x, y, w, kw):
    logits = model(x)
    mesh = logits.device_mesh
    return F.cross_entropy(logits, _replicated(y, mesh), weight=_replicated(w, mesh), **kw)


def loss_parallel_loss(model, x, y, w, kw):
    return F.cross_entropy(model(x), y, **kw)


def hand_written_loss(model, x, y, w, kw):
    """Softcapped logits, label smoothing over the other classes (eps / (V - 1)) and z-loss. (The
    label's log-prob by nll_loss: gather on these DTensor log-probs fails while Dynamo traces it.)"""
    logits = model(x)
    y = _replicated(y, logits.device_mesh)
    capped = CAP * torch.tanh(logits / CAP)
    lse = capped.logsumexp(-1)
    logp = capped - lse.unsqueeze(-1)
    eps = kw["label_smoothing"]
    nll = F.nll_loss(logp, y, reduction="none")
    others = (-logp.sum(-1) - nll) / (V - 1)  # -log p over the classes other than the label
    keep = (y != -100).float()
    loss = ((1 - eps) * nll + eps * others + kw["z_loss"] * lse ** 2) * keep
    return loss.sum() / keep.sum()


def smoothed_loss_parallel(model, x, y, w, kw):
    """Label smoothing written out inside loss_parallel(), which refuses F.cross_entropy's
    label_smoothing: eager PyTorch gets this loss right and its gradient wrong."""
    logp = F.log_softmax(model(x), -1)
    eps = kw["label_smoothing"]
    return (1 - eps) * F.nll_loss(logp, y) + eps * (-logp.mean(-1)).mean()


def logits_returned(model, x, y, w, kw):
    """The loss and the logits it read: the head stays, its logits feed the vocab-parallel op."""
    logits = model(x)
    # (detached: a returned DTensor that backward gets no gradient for fails in AOTAutograd)
    return F.cross_entropy(logits, _replicated(y, logits.device_mesh), **kw), logits.detach()


SPELLINGS = {"cross_entropy": cross_entropy_loss, "loss_parallel": loss_parallel_loss, "hand": hand_written_loss,
             "smoothed_loss_parallel": smoothed_loss_parallel, "logits_returned": logits_returned}

# name: (spelling, the loss's parameters in LossForm's words, data options)
CASES = {
    "eps0": ("cross_entropy", dict(), {}),
    "eps": ("cross_entropy", dict(label_smoothing=0.1), {}),
    "ignore-weight": ("cross_entropy", dict(label_smoothing=0.1), dict(ignore=True, weight=True)),
    "sum": ("cross_entropy", dict(label_smoothing=0.1, reduction="sum"), dict(ignore=True)),
    "none": ("cross_entropy", dict(label_smoothing=0.1, reduction="none"), dict(ignore=True)),
    "loss_parallel": ("loss_parallel", dict(), dict(ignore=True)),
    "hand": ("hand", dict(label_smoothing=0.1, z_loss=1e-2), dict(ignore=True)),
    "smoothed-loss_parallel": ("smoothed_loss_parallel", dict(label_smoothing=0.1), {}),
    "logits-returned": ("logits_returned", dict(label_smoothing=0.1), dict(ignore=True)),
}


def _reference_kwargs(case):
    spelling, kw, _ = case
    if spelling == "hand":
        return dict(label_smoothing=kw["label_smoothing"], smoothing="others", z_loss=kw["z_loss"], softcap=CAP)
    return kw


# -- one step on every rank -----------------------------------------------------------------


def _step(name: str, backend: str):
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module
    from torch.profiler import profile

    from smoothce.compiler.backend import rewrite_pass

    rewrite_pass.clear()
    spelling, kw, options = CASES[name]
    mesh = world_mesh()
    model = parallelize_module(_model(), mesh, {"head": ColwiseParallel(use_local_output=False)})
    x, y, w = _data(options)
    loss_fn = SPELLINGS[spelling]

    def first(out):  # the loss, of a loss returned with its logits too
        return out[0] if isinstance(out, tuple) else out

    compiled = torch.compile(lambda x, y, w: loss_fn(model, x, y, w, kw), backend=backend)

    def step(x, y, w):
        return first(compiled(x, y, w))

    within = loss_parallel if spelling.endswith("loss_parallel") else contextlib.nullcontext
    with within():
        eager = first(loss_fn(model, x, y, w, kw)).placements
        step(x, y, w).sum().backward()  # compiles
        model.zero_grad()
        with profile() as prof:
            loss = step(x, y, w)
            loss.sum().backward()  # (reduction 'none': the rows' sum)
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for k, p in model.named_parameters()}
    # what the user's code returned: a DTensor placed as eager's (a partial sum comes back replicated)
    from torch.distributed.tensor import Replicate

    as_eager = tuple(Replicate() if p.is_partial() else p for p in eager)
    return dict(loss=loss.full_tensor().detach().clone(), placed_as_eager=tuple(loss.placements) == as_eager,
                grads=grads,
                families=[m.family for m in rewrite_pass.matches],
                replaced=[name for m in rewrite_pass.matches for name in m.replaced],
                near_misses=[m.reason for m in rewrite_pass.near_misses],
                ops=sorted({e.name for e in prof.events() if e.name.startswith("smoothce::")}))


def _expected(name: str):
    spelling, kw, options = CASES[name]
    model = _model().double()
    x, y, w = _data(options)
    loss = reference(model(x.double()), y, w, **_reference_kwargs(CASES[name]))
    loss.sum().backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


def _check_numerics(name, results):
    want, grads = _expected(name)
    for rank, r in enumerate(results):
        assert r["placed_as_eager"]
        torch.testing.assert_close(r["loss"].double(), want, rtol=RTOL, atol=ATOL, msg=lambda m: f"rank {rank}: {m}")
        assert r["grads"].keys() == grads.keys()
        for k, g in r["grads"].items():
            torch.testing.assert_close(g.double(), grads[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")


HEAD_OPS = ["smoothce::combine_partials", "smoothce::linear_shard_grad", "smoothce::linear_shard_partials"]
LOGITS_OPS = ["smoothce::combine_partials", "smoothce::shard_grad", "smoothce::shard_partials"]
# what the rewrite reports the loss as, the ops that ran (the split head's, or the vocab-parallel
# op's on logits that stay) and how the near miss that says why the head stays ends
EXPECTED = {
    "cross_entropy": ("linear+cross_entropy", HEAD_OPS, None),
    "loss_parallel": ("linear+cross_entropy", HEAD_OPS, None),
    "hand": ("linear+log_softmax+nll", HEAD_OPS, None),
    "smoothed_loss_parallel": ("log_softmax+nll", LOGITS_OPS,
                               "its smoothing term counts on other rows than its label term, which the fused head "
                               "does not take"),
    "logits_returned": ("cross_entropy", LOGITS_OPS, "(detach)"),
}


def _check_rewrite(name, results):
    family, ops, why = EXPECTED[CASES[name][0]]
    for r in results:
        assert r["families"] == [family] and r["ops"] == ops, r
        assert [m.endswith(why) for m in r["near_misses"]] == ([] if why is None else [True]), r["near_misses"]
        # a fused head leaves no matmul behind (the label's placement reads the mesh off the weight)
        assert any(n.startswith("linear") for n in r["replaced"]) == (ops == HEAD_OPS), r["replaced"]


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_head_and_loss_become_the_split_head(ranks2, name):
    results = ranks2.run(_step, name, "smoothce_aot_eager")
    _check_numerics(name, results)
    _check_rewrite(name, results)


@pytest.mark.inductor
def test_tensor_parallel_loss_through_inductor(ranks2):
    """backend="smoothce": Inductor compiles the graph around the ops and the functional all-gather."""
    results = ranks2.run(_step, "ignore-weight", "smoothce")
    _check_numerics("ignore-weight", results)
    _check_rewrite("ignore-weight", results)


@pytest.mark.parametrize("name", ["ignore-weight", "hand"])
def test_four_ranks(ranks4, name):
    results = ranks4.run(_step, name, "smoothce_aot_eager")
    _check_numerics(name, results)
    _check_rewrite(name, results)


def _placed(logits: str, labels: str):
    """A head whose logits are a DTensor placed ``logits`` ("Shard(1)": on the classes), with labels
    placed ``labels``, compiled and eager: (loss, the head's gradient) of each, and the near misses."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from smoothce.compiler.backend import rewrite_pass

    rewrite_pass.clear()
    mesh = world_mesh()
    place = {"Replicate": Replicate(), "Shard(0)": Shard(0), "Shard(1)": Shard(1)}
    x, y, _ = _data({})
    x, y = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])  # rows that the ranks split evenly

    def loss_fn(x, y):
        # (no label smoothing: on torch 2.11, DTensor's own smoothed loss over row-sharded logits fails
        # while Dynamo traces it, "Redistribution from one partial type (P(sum)) to another (P(avg))")
        return F.cross_entropy(model(x), _replicated(y, mesh).redistribute(placements=[place[labels]]))

    out = []
    for compiled in (True, False):  # compiled first: a DTensor step before it makes AOTAutograd fail on 2.13
        model = parallelize_module(_model(), mesh, {"head": ColwiseParallel(output_layouts=place[logits],
                                                                            use_local_output=False)})
        loss = (torch.compile(loss_fn, backend="smoothce_aot_eager") if compiled else loss_fn)(x, y)
        loss.backward()
        out.append((loss.full_tensor().detach(), model.head.weight.grad.full_tensor()))
    return out, [m.reason for m in rewrite_pass.near_misses]


LOGITS_ELSEWHERE = ("the logits are a DTensor placed ({}): smoothce takes DTensor logits sharded on the classes "
                    "(dim 1) over one mesh dim, replicated over the others: the loss is left to PyTorch")
LABELS_ELSEWHERE = ("the labels are a DTensor placed ({}): smoothce takes them replicated: the loss is left to "
                    "PyTorch")
PLACED = {  # (logits, labels): the near miss
    ("Shard(0)", "Shard(0)"): LOGITS_ELSEWHERE.format("Shard(dim=0),"),
    ("Replicate", "Replicate"): LOGITS_ELSEWHERE.format("Replicate(),"),
    ("Shard(1)", "Shard(0)"): LABELS_ELSEWHERE.format("Shard(dim=0),"),
}


def test_dtensors_placed_otherwise_are_left_to_dtensor():
    """On ranks of their own: after a compiled step on class-sharded logits and one on replicated
    logits, compiling row-sharded logits fails inside AOTAutograd on torch 2.13 with any backend
    (aot_eager too: "Node tangents_2 was invalid, but is output")."""
    from ranks import Ranks

    ranks = Ranks(2)
    try:
        for placed, reason in PLACED.items():
            for (compiled, eager), reasons in ranks.run(_placed, *placed):
                torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-6)
                assert reasons == [reason], (placed, reasons)
    finally:
        ranks.close()
