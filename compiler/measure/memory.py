"""Peak memory of one training step, above what was allocated when it started.

GPU: ``torch.cuda.max_memory_allocated()`` during the step minus ``memory_allocated()`` before
     it. Exact, allocator-level.
CPU: the process's resident set size: VmHWM (the kernel's high-water mark, reset through
     ``/proc/self/clear_refs``) after the step minus the resident size just before it. Run the
     process with :data:`MALLOC_ENV` in its environment (glibc reads it at start): every block
     above 128 KiB is then a mapping of its own, returned to the OS when freed, so the resident
     size follows live tensors instead of a heap that keeps freed memory. Where clear_refs cannot
     be written a thread samples ``/proc/self/statm`` every 0.2 ms instead (it can miss a very
     short peak). Measure in a fresh process, after the compiling steps.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Callable, Optional

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def peak_cuda(step: Callable, clear: Optional[Callable] = None) -> int:
    """Peak bytes allocated on the current CUDA device during ``step()`` above its start.

    ``clear()`` first frees what the previous step left behind (gradients), before the baseline."""
    import torch

    if clear is not None:
        clear()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_cpu(step: Callable, clear: Optional[Callable] = None) -> tuple[int, str]:
    """(peak resident bytes during ``step()`` above the pre-step baseline, how it was measured:
    ``"VmHWM"`` or ``"statm sampled"``). ``clear`` as for :func:`peak_cuda`."""
    if clear is not None:
        clear()
    gc.collect()
    base = _rss()
    if _reset_hwm() and _hwm() <= base + 16 * _PAGE:
        step()
        # HWM was reset to the resident size at the reset, a page or two under `base` at most.
        return max(_hwm() - base, 0), "VmHWM"
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()
    peak[0] = max(peak[0], _rss())
    stop.set()
    sampler.join()
    return peak[0] - base, "statm sampled"


def describe(method: str) -> str:
    """A reader's words for a measurement method returned above."""
    return {
        "cuda": "CUDA memory allocated during one step above its start (max_memory_allocated)",
        "VmHWM": "resident memory high-water mark during one step above its start (VmHWM)",
        "statm sampled": "resident memory during one step above its start (sampled every 0.2 ms)",
    }.get(method, method)
