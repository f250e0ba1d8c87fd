"""Problems, inputs and timing shared by every benchmark case (peak memory: smoothce.compiler.measure.memory).

Every measurement is of one training step of the loss: forward AND backward, gradients of the
inputs that require grad written (``.grad`` cleared first, so each step allocates its gradients
the way a real step does).
"""

from __future__ import annotations

import dataclasses
import statistics
import warnings
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Rows of the gradients kept for the correctness check (the full gradient of an LLM-sized step
# is tens of GB: a slice is enough to catch a wrong kernel).
CHECK_ROWS = 64

IGNORE_INDEX = -100  # F.cross_entropy's default

# CPU timing takes at least this many samples, so the interquartile range is not empty.
MIN_SAMPLES = 5


@dataclasses.dataclass(frozen=True)
class Problem:
    case: str  # name of the case (benchmarks.cases) that builds the inputs and methods
    n: int  # rows (tokens)
    v: int  # classes (vocabulary)
    d: int | None  # hidden size, for cases with one
    dtype: str
    smoothing: float
    device: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"label smoothing must be in [0, 1], got {self.smoothing!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * self.itemsize

    def label(self) -> str:
        shape = f"N={self.n} V={self.v}" + (f" D={self.d}" if self.d else "")
        return f"{self.case} {shape} {self.dtype} ls={self.smoothing:g}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Inputs:
    args: tuple  # positional arguments of the loss function
    leaves: list  # tensors whose .grad the step writes

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None


def make_target(p: Problem, generator: torch.Generator, ignore_every: int | None = None) -> torch.Tensor:
    """Class labels (N,) in [0, V), with every ``ignore_every``-th row (from row 0) set to
    ignore_index -100 when given, as padded batches have."""
    target = torch.randint(0, p.v, (p.n,), device=p.device, generator=generator)
    if ignore_every:
        target[::ignore_every] = IGNORE_INDEX
    return target


def make_step(loss_fn: Callable, inputs: Inputs) -> Callable[[], torch.Tensor]:
    def step():
        inputs.clear_grads()
        loss = loss_fn(*inputs.args)
        if isinstance(loss, tuple):  # some peers return (loss, z_loss)
            loss = loss[0]
        loss.backward()
        return loss

    return step


def first_call(step: Callable) -> tuple[torch.Tensor, list[str]]:
    """Run the step once (compiles, autotunes), returning the loss and the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = step()
    return loss.detach(), [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------
# Correctness guard: a broken method must not look fast.


@dataclasses.dataclass
class Reference:
    loss: float
    grads: list  # first CHECK_ROWS rows of each leaf's gradient, float32 on CPU


def snapshot(loss: torch.Tensor, inputs: Inputs) -> Reference:
    return Reference(
        float(loss.float()),
        [t.grad[:CHECK_ROWS].float().cpu().clone() for t in inputs.leaves],
    )


def compare(ref: Reference, got: Reference, dtype: str) -> str | None:
    """None when ``got`` matches ``ref`` within the dtype's tolerance, else what differs."""
    # Low-precision outputs round each gradient entry to 8 (bf16) / 11 (fp16) bits; accumulation
    # order differs between methods, so compare against the reference's scale, not entrywise.
    rtol = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}[dtype]
    if not abs(got.loss - ref.loss) <= rtol * max(abs(ref.loss), 1.0):
        return f"loss {got.loss:.6g} != {ref.loss:.6g}"
    for i, (r, g) in enumerate(zip(ref.grads, got.grads)):
        scale = r.abs().max().item() or 1.0
        err = (r - g).abs().max().item()
        if not err <= 10 * rtol * scale:
            return f"grad[{i}] max err {err:.3g} (scale {scale:.3g})"
    return None


# ---------------------------------------------------------------------------------------------
# Timing


def time_step(step: Callable, device: str, min_run_time: float) -> tuple[float, float]:
    """(median, interquartile range) of one step, in milliseconds. The step has run once."""
    if device == "cuda":
        from triton.testing import do_bench

        # do_bench flushes L2 between calls and synchronizes; quantiles give median and IQR.
        q1, median, q3 = do_bench(step, warmup=25, rep=int(min_run_time * 1000), quantiles=[0.25, 0.5, 0.75])
        return median, q3 - q1
    from torch.utils.benchmark import Timer

    step()  # one more warm-up: the first call compiled, this one warms caches and allocator
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    times = list(timer.blocked_autorange(min_run_time=min_run_time).times)  # seconds per call, per block
    # A step slower than min_run_time gives one block: add single calls until an IQR means something.
    while len(times) < MIN_SAMPLES:
        times += timer.timeit(number=1).times
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median * 1e3, (q3 - q1) * 1e3


# A copy of this many bytes runs from memory, not cache: 1 GiB is 17x an H200's 60 MB L2, 256 MiB
# is several times the last-level cache of a server CPU.
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}


def copy_bandwidth(device: str, min_run_time: float) -> float:
    """Bytes per second that a large same-device copy (``dst.copy_(src)``) moves, counting bytes
    read plus bytes written: the practical ceiling of a memory-bound kernel on this device,
    measured in the same run as the rows read against it."""
    nbytes = COPY_BYTES[device]
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    step = lambda: dst.copy_(src)  # noqa: E731
    step()
    median_ms, _ = time_step(step, device, min_run_time)
    return 2 * nbytes / (median_ms / 1e3)
