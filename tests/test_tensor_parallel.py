"""Tensor parallelism compiled with smoothce, on 2 and 4 CPU processes with gloo (tests/ranks.py).

A two-layer model whose LM head is ``ColwiseParallel(use_local_output=False)``: its logits are a
DTensor sharded on the classes (V = 11, so the last shard is smaller). The loss is written as
people write it: ``F.cross_entropy`` with replicated DTensor labels, the same inside
``loss_parallel()`` with plain labels, or by hand (softcap, log_softmax, gather, z-loss). Every
rank's loss and every parameter's gradient (the head's gathered from its shards) must equal the
loss of the whole model in float64 in one process (tests/reference.py's loss of the whole logits).
"""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

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


SPELLINGS = {"cross_entropy": cross_entropy_loss, "loss_parallel": loss_parallel_loss, "hand": hand_written_loss}

# name: (spelling, the loss's parameters in LossForm's words, data options)
CASES = {
    "eps0": ("cross_entropy", dict(), {}),
    "eps": ("cross_entropy", dict(label_smoothing=0.1), {}),
    "ignore-weight": ("cross_entropy", dict(label_smoothing=0.1), dict(ignore=True, weight=True)),
    "sum": ("cross_entropy", dict(label_smoothing=0.1, reduction="sum"), dict(ignore=True)),
    "loss_parallel": ("loss_parallel", dict(), dict(ignore=True)),
    "hand": ("hand", dict(label_smoothing=0.1, z_loss=1e-2), dict(ignore=True)),
}


def _reference_kwargs(case):
    spelling, kw, _ = case
    if spelling == "hand":
        return dict(label_smoothing=kw["label_smoothing"], smoothing="others", z_loss=kw["z_loss"], softcap=CAP)
    return kw


# -- one step on every rank -----------------------------------------------------------------


def _step(name: str, backend: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module
    from torch.profiler import profile

    from smoothce.compiler.backend import rewrite_pass

    rewrite_pass.clear()
    spelling, kw, options = CASES[name]
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = parallelize_module(_model(), mesh, {"head": ColwiseParallel(use_local_output=False)})
    x, y, w = _data(options)
    loss_fn = SPELLINGS[spelling]
    step = torch.compile(lambda x, y, w: loss_fn(model, x, y, w, kw), backend=backend)
    within = loss_parallel if spelling == "loss_parallel" else contextlib.nullcontext
    with within():
        eager = loss_fn(model, x, y, w, kw)
        step(x, y, w).backward()  # compiles
        model.zero_grad()
        with profile() as prof:
            loss = step(x, y, w)
            loss.backward()
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for k, p in model.named_parameters()}
    # what the user's code returned: a DTensor placed as eager's
    return dict(loss=loss.full_tensor().detach().clone(), placed_as_eager=loss.placements == eager.placements,
                grads=grads,
                families=[m.family for m in rewrite_pass.matches],
                near_misses=[m.reason for m in rewrite_pass.near_misses],
                ops=sorted({e.name for e in prof.events() if e.name.startswith("smoothce::")}))


def _expected(name: str):
    spelling, kw, options = CASES[name]
    model = _model().double()
    x, y, w = _data(options)
    loss = reference(model(x.double()), y, w, **_reference_kwargs(CASES[name]))
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


def _check_numerics(name, results):
    want, grads = _expected(name)
    for rank, r in enumerate(results):
        assert r["placed_as_eager"]
        torch.testing.assert_close(r["loss"].double(), want, rtol=RTOL, atol=ATOL, msg=lambda m: f"rank {rank}: {m}")
        assert r["grads"].keys() == grads.keys()
        for k, g in r["grads"].items():
            torch.testing.assert_close(g.double(), grads[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_head_compiles_and_equals_float64(ranks2, name):
    results = ranks2.run(_step, name, "smoothce_aot_eager")
    _check_numerics(name, results)
    for r in results:
        assert r["families"] == [], r["families"]
        assert any("are a DTensor, a tensor subclass" in m for m in r["near_misses"]), r["near_misses"]
