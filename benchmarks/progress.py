"""A dependency-free progress bar on stderr."""

import sys
import time


class Progress:
    """``[#####.....]  12/48  0:42  label``, redrawn in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, width: int = 24, stream=None):
        self.total = max(total, 1)
        self.done = 0
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def _line(self, label: str) -> str:
        filled = self.width * self.done // self.total
        elapsed = int(time.perf_counter() - self.start)
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {self.done:>{len(str(self.total))}}/{self.total} {elapsed // 60}:{elapsed % 60:02d}  {label}"

    def show(self, label: str) -> None:
        """Announce the step about to run."""
        if self.tty:
            columns = 120
            self.stream.write("\r" + self._line(label)[:columns].ljust(columns))
        else:
            self.stream.write(self._line(label) + "\n")
        self.stream.flush()

    def advance(self, label: str = "") -> None:
        self.done += 1
        if self.tty:
            self.show(label)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def write(self, text: str) -> None:
        """Print a message without breaking the bar."""
        if self.tty:
            self.stream.write("\r" + " " * 120 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
