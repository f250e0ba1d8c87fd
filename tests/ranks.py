"""Several CPU processes joined by gloo on 127.0.0.1: the ranks of the distributed tests.

``Ranks(world)`` spawns ``world`` processes once and keeps them: ``ranks.run(fn, *args)`` runs
``fn(*args)`` on every rank (``fn`` a module-level function, found by the children by its module's
name) and returns the results in rank order. Spawning costs a torch import per process, so a test
session starts each size once (the ``ranks2`` / ``ranks4`` fixtures of conftest.py) and every test
reuses it; each call starts from a reset Dynamo.

A collective that some ranks enter and others do not fails after TIMEOUT_S (the process group's
timeout) instead of hanging. The timeout must still outlast the skew between ranks compiling the
same graph (one rank waits in the first collective while another still compiles), which on a
loaded 2-core machine with 4 ranks takes tens of seconds. After a failure the group may be out of
step (one rank a collective ahead), so it is replaced by a fresh one.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp

TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, timeout_s: float, tasks, results) -> None:
    import torch.distributed as dist

    # gloo's own connections on the loopback too (its default follows the host name)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results.put((rank, True, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        torch._dynamo.reset()
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which raises it
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def world_mesh():
    """A one-dim CPU device mesh of every rank (in a rank's process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


class RankFailed(AssertionError):
    """A rank raised (its traceback is the message) or did not answer in time."""


class Ranks:
    """``world`` processes in one gloo process group; see the module docstring."""

    def __init__(self, world: int, timeout_s: float = TIMEOUT_S):
        self.world, self.timeout_s = world, timeout_s
        self._procs: list = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_serve, args=(r, self.world, port, self.timeout_s, self._tasks[r],
                                                        self._results), daemon=True)
                       for r in range(self.world)]
        for p in self._procs:
            p.start()
        self._collect("starting the process group")

    def _collect(self, what: str) -> list:
        out: dict = {}
        errors = []
        # every rank answers within the process group's timeout once the others failed
        deadline = self.timeout_s + 60.0
        while len(out) + len(errors) < self.world:
            try:
                rank, ok, value = self._results.get(timeout=deadline)
            except queue.Empty:
                self.close()
                raise RankFailed(f"{what}: ranks {sorted(set(range(self.world)) - set(out))} did not answer "
                                 f"within {deadline:.0f} s") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            self.close()
            self._start()  # the group may be out of step: the next test gets a fresh one
            raise RankFailed(f"{what}:\n" + "\n".join(sorted(errors)))
        return [out[r] for r in range(self.world)]

    def run(self, fn, *args) -> list:
        """fn(*args) on every rank; the results in rank order. Raises RankFailed with each failed
        rank's traceback."""
        if not self._procs:
            self._start()
        for t in self._tasks:
            t.put((fn, args))
        return self._collect(f"{fn.__module__}.{fn.__qualname__}")

    def close(self) -> None:
        for t, p in zip(self._tasks, self._procs):
            if p.is_alive():
                t.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
