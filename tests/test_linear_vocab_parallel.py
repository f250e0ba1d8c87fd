"""The fused LM head with its classes split across processes (kernels/linear_vocab_parallel.py), on 2
and 4 CPU processes with gloo (tests/ranks.py): every rank's loss, the hidden states' gradient
(the whole one, on every rank), and its slice of the weight's and bias' gradients against the float64
loss of the whole head in one process (tests/reference.py), for every field of the loss.

Each rank builds the same whole head from a seed and keeps its classes: ``process_group=`` with
equal slices (V = 12), DTensor arguments sharded by DTensor itself (V = 11: 6 + 5 classes on 2
ranks, 3 + 3 + 3 + 2 on 4). N = 7 rows in chunks of 3 (3 + 3 + 1) unless a case says otherwise.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ranks import world_mesh
from reference import reference
from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy

N, D = 7, 5

# fp32 against float64: a head of D = 5 and a loss over V <= 12 classes
RTOL, ATOL = 1e-5, 1e-6

CASES = {
    "plain": dict(),
    "eps-all": dict(label_smoothing=0.1, bias=True),
    "eps-others": dict(label_smoothing=0.1, smoothing="others"),
    "ignore_index": dict(label_smoothing=0.1, ignore=True, bias=True),
    "weight": dict(weight=True),
    "weight-eps": dict(weight=True, label_smoothing=0.2, ignore=True, bias=True),
    "z_loss": dict(z_loss=1e-2, ignore=True),
    "softcap-logit_scale": dict(softcap=3.0, logit_scale=1.5, label_smoothing=0.1, bias=True),
    "sum": dict(reduction="sum", label_smoothing=0.1, ignore=True),
    "none": dict(reduction="none", label_smoothing=0.1, smoothing="others", ignore=True, z_loss=1e-3, bias=True),
    "kl": dict(kl=True, label_smoothing=0.1, scale=0.5),
    "one-chunk": dict(label_smoothing=0.1, weight=True, chunk=None),
    "rows-2d": dict(label_smoothing=0.1, ignore=True, rows=(2, 4)),
}

_DATA = ("ignore", "weight", "bias", "chunk", "rows")


def _inputs(V: int, case: dict):
    """The whole head (hidden, weight, bias), labels and class weights of a case, alike on every rank."""
    g = torch.Generator().manual_seed(0)
    rows = case.get("rows", (N,))
    h = torch.randn(*rows, D, generator=g)
    w = torch.randn(V, D, generator=g)
    b = torch.randn(V, generator=g) if case.get("bias") else None
    y = torch.randint(0, V, rows, generator=g)
    y.view(-1)[-1] = V - 1  # a label in the last (smallest) shard
    if case.get("ignore"):
        y.view(-1)[1] = y.view(-1)[4] = -100
    cw = torch.rand(V, generator=g) + 0.5 if case.get("weight") else None
    return h, w, b, y, cw


def _form(case: dict) -> dict:
    return {k: v for k, v in case.items() if k not in _DATA}


def _chunk(case: dict):
    return case.get("chunk", 3)


def _backward(loss, rows):
    cot = torch.linspace(-1.0, 2.0, loss.numel(), dtype=torch.float64).view(loss.shape) if loss.dim() else None
    (loss if cot is None else (loss * cot.to(loss.dtype)).sum()).backward()


def _grads(h, w, b):
    return h.grad, w.grad, None if b is None else b.grad


def _process_group_cases(names, compiled=False):
    """Each case's loss and gradients through process_group= (compiled: whole, fullgraph, with the
    op names of its forward and backward graphs)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    rank, world = dist.get_rank(), dist.get_world_size()
    V = 12
    C = V // world
    out, graphs = {}, []

    def record(gm, _):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    for name in names:
        case = CASES[name]
        h, w, b, y, cw = _inputs(V, case)
        h = h.requires_grad_()
        mine = slice(rank * C, (rank + 1) * C)
        w = w[mine].clone().requires_grad_()
        b = None if b is None else b[mine].clone().requires_grad_()
        cw = None if cw is None else cw[mine]
        form, chunk = _form(case), _chunk(case)

        def loss_fn(h, w, b, y, cw):
            return fused_linear_cross_entropy(h, w, b, y, cw, process_group=dist.group.WORLD, chunk_size=chunk,
                                              **form)

        if compiled:
            loss_fn = torch.compile(loss_fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record),
                                    fullgraph=True)
        loss = loss_fn(h, w, b, y, cw)
        _backward(loss, N)
        out[name] = (loss.detach(), *_grads(h, w, b))
        torch._dynamo.reset()
    return out, graphs


def _dtensor_cases(names):
    """Each case through DTensor arguments: the loss (a Replicate DTensor) and the gradients gathered."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = world_mesh()
    V = 11
    out = {}
    for name in names:
        case = CASES[name]
        h, w, b, y, cw = _inputs(V, case)
        hd = distribute_tensor(h, mesh, [Replicate()]).requires_grad_()
        wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        bd = None if b is None else distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
        yd = DTensor.from_local(y, mesh, [Replicate()], run_check=False)
        cwd = None if cw is None else distribute_tensor(cw, mesh, [Shard(0)])
        loss = fused_linear_cross_entropy(hd, wd, bd, yd, cwd, chunk_size=_chunk(case), **_form(case))
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), loss
        _backward(loss.to_local(), N)
        assert hd.grad.placements == (Replicate(),), hd.grad.placements
        out[name] = tuple(None if t is None else t.full_tensor() for t in (loss.detach(), *_grads(hd, wd, bd)))
    return out


def _expected(V: int, case: dict):
    h, w, b, y, cw = (None if t is None else t.double() if t.is_floating_point() else t for t in _inputs(V, case))
    for t in (h, w, b):
        if t is not None:
            t.requires_grad_()
    loss = reference(F.linear(h, w, b).movedim(-1, 1), y, cw, **_form(case))
    _backward(loss, N)
    return (loss.detach(), *_grads(h, w, b))


def _check(results, V: int, names, gathered: bool):
    """Every rank's loss and hidden gradient whole; the weight's and bias' gradients are each
    rank's slice (``gathered``: every rank has the whole already)."""
    for name in names:
        want = _expected(V, CASES[name])
        for rank, r in enumerate(results):
            got = r[name]
            for what, g, e in (("loss", got[0], want[0]), ("grad hidden", got[1], want[1])):
                torch.testing.assert_close(g.double(), e, rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{name}, rank {rank}, {what}: {m}")
        for k, what in ((2, "grad weight"), (3, "grad bias")):
            if want[k] is None:
                assert all(r[name][k] is None for r in results)
                continue
            got = results[0][name][k] if gathered else torch.cat([r[name][k] for r in results])
            torch.testing.assert_close(got.double(), want[k], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{name}, {what}: {m}")


def test_process_group_slices(ranks2):
    results = ranks2.run(_process_group_cases, list(CASES))
    _check([r[0] for r in results], 12, list(CASES), gathered=False)


def test_process_group_compiled(ranks2):
    """Dynamo traces the whole loss into one graph: one all-gather in forward, the hidden states'
    all-reduce in backward, both functional collectives, around the two ops."""
    names = ["weight-eps", "none"]
    results = ranks2.run(_process_group_cases, names, True)
    _check([r[0] for r in results], 12, names, gathered=False)
    for _, graphs in results:
        assert len(graphs) == 2 * len(names), graphs
        for forward, backward in zip(graphs[::2], graphs[1::2]):
            assert forward.count("_c10d_functional.all_gather_into_tensor.default") == 1, forward
            assert "smoothce.linear_shard_partials.default" in forward, forward
            assert "smoothce.linear_shard_grad.default" not in forward, forward
            assert backward.count("_c10d_functional.all_reduce.default") == 1, backward
            assert "smoothce.linear_shard_grad.default" in backward, backward
            assert not any("all_gather" in op for op in backward), backward


def test_dtensor_head(ranks2):
    _check(ranks2.run(_dtensor_cases, list(CASES)), 11, list(CASES), gathered=True)


def test_four_ranks(ranks4):
    names = ["weight-eps", "none", "softcap-logit_scale"]
    _check([r[0] for r in ranks4.run(_process_group_cases, names)], 12, names, gathered=False)
    _check(ranks4.run(_dtensor_cases, names), 11, names, gathered=True)


def _misplaced(what: str):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = world_mesh()
    h, w, _, y, _ = _inputs(12, {})
    place = {"hidden": ([Shard(0)], [Shard(0)]), "weight": ([Replicate()], [Shard(1)])}[what]
    try:
        fused_linear_cross_entropy(distribute_tensor(h, mesh, place[0]), distribute_tensor(w, mesh, place[1]), None, y)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("what, message", [
    ("hidden", "the hidden states are a DTensor placed (Shard(dim=0),): smoothce takes them replicated"),
    ("weight", "the head's weight is a DTensor placed (Shard(dim=1),): the fused head takes it sharded on its "
               "classes (dim 0)"),
])
def test_dtensors_placed_otherwise_raise(ranks2, what, message):
    for reason in ranks2.run(_misplaced, what):
        assert reason is not None and message in reason, reason


@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(weighted):
    """The two ops' schemas, fakes and registrations (no collective inside them: one process)."""
    import smoothce.kernels.linear_vocab_parallel  # noqa: F401 - registers the ops
    h, w, b, y, cw = _inputs(12, dict(bias=True, weight=weighted, ignore=True))
    cw = None if cw is None else cw[4:8]
    w, b = w[4:8].clone(), b[4:8].clone()
    torch.library.opcheck(torch.ops.smoothce.linear_shard_partials.default,
                          (h, w, b, y, cw, 4, 12, -100, 1.5, 3.0, True, 3))
    rows = [torch.rand(N) for _ in range(4)]
    torch.library.opcheck(torch.ops.smoothce.linear_shard_grad.default,
                          (h, w, b, y, cw, *rows, 4, -100, 1.5, 3.0, 3))
