"""Data-parallel training engines keep the rewrite: DDP and FSDP2 (``fully_shard``) compiled with
smoothce, on 2 CPU processes with gloo (tests/ranks.py).

Each rank trains the tiny LM on its own batch; the loss of each rank and every parameter's
gradient (DDP's average over the ranks, FSDP2's gathered from its shards) must equal a float64
single-process reference, the LM head and its loss must have been fused into one
``smoothce::linear_cross_entropy`` call, and that op must have run (profiler). DDPOptimizer splits
a graph at its gradient buckets; the tiny model fits one bucket, so the loss stays in one graph.
"""

import pytest
import torch
import torch.distributed as dist

from smoothce.compiler.measure.tiny_lm import TinyLM

V, D, BATCH, SEQ = 64, 16, 2, 8

# fp32 against float64: a mean over 16 tokens of terms of size log(64), a few matmuls of width 64
RTOL, ATOL = 1e-5, 1e-6


def _batch(rank: int):
    """Rank ``rank``'s tokens and targets (padding included): different on every rank."""
    _, idx, target = TinyLM.build("cpu", vocab=V, dim=D, batch=BATCH, seq=SEQ, seed=100 + rank)
    return idx, target


def _reference(world: int):
    """Float64, one process: each rank's loss, and the gradients of their mean (what DDP and
    FSDP2 hand every rank)."""
    model, _, _ = TinyLM.build("cpu", vocab=V, dim=D, batch=BATCH, seq=SEQ, seed=0)
    model = model.double()
    losses = [model(*_batch(r)) for r in range(world)]
    (sum(losses) / world).backward()
    return [loss.item() for loss in losses], {k: p.grad for k, p in model.named_parameters()}


def _step(model, idx, target):
    """One compiled step, profiled (the compile happens in an unprofiled step before)."""
    from torch.profiler import profile

    model(idx, target).backward()
    model.zero_grad()
    with profile() as prof:
        loss = model(idx, target)
        loss.backward()
    return loss, sorted({e.name for e in prof.events() if e.name.startswith("smoothce::")})


def _train(engine: str, backend: str):
    from smoothce.compiler.backend import rewrite_pass

    rewrite_pass.clear()
    rank, world = dist.get_rank(), dist.get_world_size()
    model, _, _ = TinyLM.build("cpu", vocab=V, dim=D, batch=BATCH, seq=SEQ, seed=0)
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in (model.up, model.down):
            fully_shard(block)
        wrapped = fully_shard(model)
    compiled = torch.compile(wrapped, backend=backend)
    loss, ops = _step(compiled, *_batch(rank))
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for k, p in model.named_parameters()}
    families = [m.family for m in rewrite_pass.matches]
    return loss.item(), grads, families, ops


def _check(results, world):
    losses, grads = _reference(world)
    for rank, (loss, got, families, ops) in enumerate(results):
        assert families == ["linear+cross_entropy"], families
        assert ops == ["smoothce::linear_cross_entropy"], ops
        torch.testing.assert_close(loss, losses[rank], rtol=RTOL, atol=ATOL)
        assert got.keys() == grads.keys()
        for name, g in got.items():
            torch.testing.assert_close(g.double(), grads[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_data_parallel_engines_stay_rewritten(ranks2, engine):
    _check(ranks2.run(_train, engine, "smoothce_aot_eager"), 2)
