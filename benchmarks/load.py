"""Other processes keeping the CPU busy while a benchmark runs (``--busy K``).

A shared machine is the normal state of a CPU run: another training job, a compile, a test
suite. Code that is fine alone can collapse there (every parallel region waits for a thread the
OS has parked), so the CPU promises are also measured with K processes that each spin on a core
for the whole run. They are plain Python loops at normal priority, started before the first
measurement and killed after the last.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

_SPIN = "while True: pass"


@contextlib.contextmanager
def busy(processes: int):
    """Run the body while ``processes`` other processes each keep one core busy."""
    if processes < 0:
        raise ValueError(f"busy processes must be >= 0, got {processes}")
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL) for _ in range(processes)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
