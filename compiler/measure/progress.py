"""A dependency-free progress bar on stderr."""

from __future__ import annotations

import sys
import time

_COLUMNS = 120


class Progress:
    """``label [#####.....]  12/48 0:42  note``: redrawn in place on a terminal; elsewhere each
    :meth:`show` prints one line (a log keeps what was announced, not a line per step)."""

    def __init__(self, total: int, label: str = "", width: int = 24, stream=None):
        self.total = max(total, 1)
        self.done = 0
        self.label = label
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def _line(self, note: str) -> str:
        filled = self.width * self.done // self.total
        elapsed = int(time.perf_counter() - self.start)
        bar = "#" * filled + "." * (self.width - filled)
        head = f"{self.label} " if self.label else ""
        return f"{head}[{bar}] {self.done:>{len(str(self.total))}}/{self.total} {elapsed // 60}:{elapsed % 60:02d}  {note}"

    def show(self, note: str = "") -> None:
        """Draw the bar with ``note`` (what runs next, or where things stand)."""
        if self.tty:
            self.stream.write("\r" + self._line(note)[:_COLUMNS].ljust(_COLUMNS))
        else:
            self.stream.write(self._line(note) + "\n")
        self.stream.flush()

    def advance(self, note: str = "") -> None:
        """One unit done; on a terminal the bar is redrawn with ``note``."""
        self.done += 1
        if self.tty:
            self.show(note)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def write(self, text: str) -> None:
        """Print a message without breaking the bar."""
        if self.tty:
            self.stream.write("\r" + " " * _COLUMNS + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
