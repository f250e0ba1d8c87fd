"""Commands run from the repository root with a deadline, their output appended to a log."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(cmd: list[str], log_path: str, deadline: float, env: dict | None = None) -> int | None:
    """Run ``cmd`` in its own process group, appending its output to ``log_path``; the exit
    status, or None when it was stopped at ``deadline`` (a ``time.monotonic()`` value; a command
    gets at least a second). Whatever it left running in its group is ended with it."""
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(a if len(a) < 120 else a.strip()[:40] + "..." for a in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.write("\n[stopped: time limit reached]\n")
            return None
        finally:
            try:  # compile workers and the like, still in the command's group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def status(rc: int | None) -> str:
    return "ok" if rc == 0 else ("stopped at its time limit" if rc is None else f"failed (exit {rc})")
