"""The loss over logits whose classes are split across processes (kernels/vocab_parallel.py), on 2
and 4 CPU processes with gloo (tests/ranks.py): every rank's loss and its shard's gradient against
the float64 loss of the whole logits in one process (tests/reference.py), for every field of the
loss.

Each rank builds the same whole logits from a seed and keeps its columns: ``process_group=`` with
equal slices (V = 12), DTensor logits sharded by DTensor itself (V = 11: 6 + 5 columns on 2 ranks,
3 + 3 + 3 + 2 on 4, so the last shard is smaller).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ranks import world_mesh
from reference import reference
from smoothce.kernels.cross_entropy import fused_cross_entropy

N = 7  # rows: odd, and more than the ranks

# fp32 against float64 on V <= 12: the loss is a sum of ~N terms of size log(V), the gradient
# entries are probabilities; 1e-5 relative covers fp32 rounding of the log-sum-exp.
RTOL, ATOL = 1e-5, 1e-6

CASES = {
    "plain": dict(),
    "eps-all": dict(label_smoothing=0.1),
    "eps-others": dict(label_smoothing=0.1, smoothing="others"),
    "ignore_index": dict(label_smoothing=0.1, ignore=True),
    "weight": dict(weight=True),
    "weight-eps": dict(weight=True, label_smoothing=0.2, ignore=True),
    "z_loss": dict(z_loss=1e-2, ignore=True),
    "softcap-logit_scale": dict(softcap=3.0, logit_scale=1.5, label_smoothing=0.1),
    "sum": dict(reduction="sum", label_smoothing=0.1, ignore=True),
    "none": dict(reduction="none", label_smoothing=0.1, smoothing="others", ignore=True, z_loss=1e-3),
    "kl": dict(kl=True, label_smoothing=0.1, scale=0.5),
    "uniform_rows": dict(label_smoothing=0.1, uniform=True, ignore=True),
    "all-ignored": dict(label_smoothing=0.1, ignore="all"),
}


def _inputs(V: int, case: dict):
    """The whole logits, labels, class weights and uniform_rows of a case, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g) * 3
    y = torch.randint(0, V, (N,), generator=g)
    y[-1] = V - 1  # a label in the last (smallest) shard
    if case.get("ignore") == "all":
        y[:] = -100
    elif case.get("ignore"):
        y[1] = y[4] = -100
    w = torch.rand(V, generator=g) + 0.5 if case.get("weight") else None
    u = torch.rand(N, generator=g) > 0.3 if case.get("uniform") else None
    return x, y, w, u


def _form(case: dict) -> dict:
    return {k: v for k, v in case.items() if k not in ("ignore", "weight", "uniform")}


def _cotangent(reduction: str, rows: int):
    return torch.linspace(-1.0, 2.0, rows, dtype=torch.float64) if reduction == "none" else None


def _backward(loss, cot):
    (loss if cot is None else (loss * cot.to(loss.dtype)).sum()).backward()


def _process_group_cases(names):
    """Each case's loss and this rank's shard gradient, through process_group=."""
    rank, world = dist.get_rank(), dist.get_world_size()
    V = 12
    C = V // world
    out = {}
    for name in names:
        case = CASES[name]
        x, y, w, u = _inputs(V, case)
        local = x[:, rank * C:(rank + 1) * C].clone().requires_grad_()
        w_local = None if w is None else w[rank * C:(rank + 1) * C]
        loss = fused_cross_entropy(local, y, w_local, uniform_rows=u, process_group=dist.group.WORLD, **_form(case))
        _backward(loss, _cotangent(case.get("reduction", "mean"), N))
        out[name] = (loss.detach(), local.grad)
    return out


def _compiled_process_group_cases(names):
    """Each case through process_group=, compiled whole (fullgraph: the collective is traced), with
    the ops in the compiled graph."""
    rank, world = dist.get_rank(), dist.get_world_size()
    V = 12
    C = V // world
    out, graphs = {}, []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    for name in names:
        case = CASES[name]
        x, y, w, u = _inputs(V, case)
        local = x[:, rank * C:(rank + 1) * C].clone().requires_grad_()
        w_local = None if w is None else w[rank * C:(rank + 1) * C]
        form = _form(case)
        step = torch.compile(lambda x, y, w, u: fused_cross_entropy(x, y, w, uniform_rows=u,
                                                                     process_group=dist.group.WORLD, **form),
                             backend=backend, fullgraph=True)
        loss = step(local, y, w_local, u)
        _backward(loss, _cotangent(case.get("reduction", "mean"), N))
        out[name] = (loss.detach(), local.grad)
        torch._dynamo.reset()
    return out, graphs


def _dtensor_cases(names):
    """Each case's loss (a Replicate DTensor) and the gathered gradient, through DTensor logits."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = world_mesh()
    V = 11
    out = {}
    for name in names:
        case = CASES[name]
        x, y, w, u = _inputs(V, case)
        xd = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
        yd = DTensor.from_local(y, mesh, [Replicate()], run_check=False)
        wd = None if w is None else distribute_tensor(w, mesh, [Shard(0)])
        loss = fused_cross_entropy(xd, yd, wd, uniform_rows=u, **_form(case))
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), loss
        _backward(loss.to_local(), _cotangent(case.get("reduction", "mean"), N))
        out[name] = (loss.to_local().detach(), xd.grad.full_tensor())
    return out


def _expected(V: int, case: dict):
    x, y, w, u = _inputs(V, case)
    x = x.double().requires_grad_()
    if case.get("ignore") == "all":  # PyTorch's: a nan loss and a zero gradient
        loss = F.cross_entropy(x, y, label_smoothing=case["label_smoothing"])
    else:
        loss = reference(x, y, w, uniform_rows=u, **_form(case))
    _backward(loss, _cotangent(case.get("reduction", "mean"), N))
    return loss.detach(), x.grad


def _check(results, V: int, names, gathered: bool):
    for name in names:
        want, want_grad = _expected(V, CASES[name])
        grads = [r[name][1] for r in results]
        got_grad = grads[0] if gathered else torch.cat(grads, 1)
        for rank, r in enumerate(results):
            torch.testing.assert_close(r[name][0].double(), want, rtol=RTOL, atol=ATOL, equal_nan=True,
                                       msg=lambda m: f"{name}, rank {rank}: {m}")
            if gathered:
                torch.testing.assert_close(r[name][1], got_grad, rtol=0, atol=0)
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{name}: {m}")


def test_process_group_slices(ranks2):
    _check(ranks2.run(_process_group_cases, list(CASES)), 12, list(CASES), gathered=False)


def test_process_group_compiled(ranks2):
    """Dynamo traces the whole loss into one graph: the all-gather is a functional collective."""
    names = ["eps-others", "weight-eps", "none"]
    results = ranks2.run(_compiled_process_group_cases, names)
    _check([r[0] for r in results], 12, names, gathered=False)
    for _, graphs in results:
        assert len(graphs) == len(names), graphs
        for ops in graphs:
            assert ops.count("_c10d_functional.all_gather_into_tensor") == 1, ops
            assert "smoothce.shard_partials" in ops and "smoothce.combine_partials" in ops, ops


def test_dtensor_logits(ranks2):
    _check(ranks2.run(_dtensor_cases, list(CASES)), 11, list(CASES), gathered=True)


def test_four_ranks(ranks4):
    names = ["weight-eps", "none", "softcap-logit_scale"]
    _check(ranks4.run(_process_group_cases, names), 12, names, gathered=False)
    _check(ranks4.run(_dtensor_cases, names), 11, names, gathered=True)


def megatron_style_loss(local, y, rank: int):
    """The vocab-parallel loss as Megatron-LM and torchtitan write it, with functional collectives:
    the row max (detached: a max all_reduce has no backward), the sum of exponentials and the
    label's logit, each all-reduced over the group; rank r holds classes [r C, (r + 1) C)."""
    import torch.distributed._functional_collectives as funcol

    group, C = dist.group.WORLD, local.shape[1]
    m = funcol.all_reduce(local.max(-1).values.detach(), "max", group)
    x = local - m.unsqueeze(-1)
    sum_exp = funcol.all_reduce(x.exp().sum(-1), "sum", group)
    inside = (y >= rank * C) & (y < (rank + 1) * C)
    x_y = torch.where(inside, x.gather(-1, torch.where(inside, y - rank * C, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    return (sum_exp.log() - funcol.all_reduce(x_y, "sum", group)).mean()


def _megatron_style():
    """The loss and gradient of megatron_style_loss eager and compiled by smoothce, and what the
    rewrite reported."""
    from smoothce.compiler.backend import rewrite_pass

    rank, C = dist.get_rank(), 12 // dist.get_world_size()
    x, y, _, _ = _inputs(12, {})
    out = []
    for backend in (None, "smoothce_aot_eager"):
        rewrite_pass.clear()
        local = x[:, rank * C:(rank + 1) * C].clone().requires_grad_()
        fn = megatron_style_loss if backend is None else torch.compile(megatron_style_loss, backend=backend)
        loss = fn(local, y, rank)
        loss.backward()
        out.append((loss.detach(), local.grad))
    return out, [m.family for m in rewrite_pass.matches], [m.reason for m in rewrite_pass.near_misses]


def test_megatron_style_loss_gets_a_near_miss(ranks2):
    """Not rewritten: its eager gradient is tp times the loss's own (the functional all_reduce's
    backward sums the ranks' gradients of the same loss), which the rewrite would not keep; the near
    miss says so and what to write instead."""
    want, want_grad = _expected(12, {})
    results = ranks2.run(_megatron_style)
    for rank, ((eager, compiled), families, reasons) in enumerate(results):
        torch.testing.assert_close(eager[0].double(), want, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(eager[1].double(), 2 * want_grad[:, rank * 6:(rank + 1) * 6], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
        assert families == [] and len(reasons) == 1, (families, reasons)
        assert reasons[0].startswith("a cross-entropy over classes split across processes, written with "
                                     "collectives (the sum of exponentials all-reduced at test_vocab_parallel.py:"), reasons
        assert "the row max all-reduced at test_vocab_parallel.py:" in reasons[0], reasons
        assert "in eager PyTorch its gradient is tp times the loss's own" in reasons[0], reasons
        assert "Write smoothce.cross_entropy(local_logits, labels, process_group=group)" in reasons[0], reasons
