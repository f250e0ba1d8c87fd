"""Plain-text tables that fit a terminal: no dependencies, wraps long cells, trims long paths.

A column either wraps its text onto more lines ("wrap") or keeps one line and drops the start
of the text ("path": a location keeps its file name and line, the part a reader needs).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import textwrap

_GAP = "  "
_MIN_WIDTH = 40


def terminal_width(default: int = 100) -> int:
    """Columns of the terminal (or $COLUMNS), `default` when output is not a terminal."""
    return max(_MIN_WIDTH, shutil.get_terminal_size((default, 24)).columns)


@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    mode: str = "wrap"  # "wrap" | "path" | "fixed" (never shrinks)
    min_width: int = 8


def short_path(filename: str) -> str:
    """A file name relative to the working directory when it lies below it, else unchanged."""
    if not os.path.isabs(filename):
        return filename
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith("..") else rel


def short_location(location: str) -> str:
    """'/abs/dir/model.py:42' -> 'dir/model.py:42' when under the working directory."""
    path, sep, line = location.rpartition(":")
    if sep and line.isdigit():
        return f"{short_path(path)}:{line}"
    return short_path(location)


def _trim_start(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[len(text) - width + 3 :]


def _cell_lines(text: str, width: int, mode: str) -> list[str]:
    lines: list[str] = []
    for raw in str(text).splitlines() or [""]:
        if mode == "path":
            lines.append(_trim_start(raw, width))
        else:
            lines.extend(textwrap.wrap(raw, width, break_long_words=True, break_on_hyphens=False) or [""])
    return lines


def _fit(natural: list[int], words: list[int], columns: list[Column], width: int) -> list[int]:
    """Column widths whose sum (with gaps) is at most `width`, shrinking the widest first.

    Columns first give way down to their `min_width` (or their longest word, which should not be
    broken); on a terminal too narrow even for that they
    go on down to a few characters (wrapped text stays readable, just long)."""
    widths = list(natural)
    budget = width - len(_GAP) * (len(widths) - 1)
    soft = [
        w if c.mode == "fixed" else min(w, max(c.min_width, len(c.header), word if c.mode == "wrap" else 0))
        for w, word, c in zip(natural, words, columns)
    ]
    hard = [w if c.mode == "fixed" else min(w, 6) for w, c in zip(natural, columns)]
    for floors in (soft, hard):
        while sum(widths) > budget:
            # Shrink the widest column still above its floor, one character at a time: long text
            # columns give way first and end up about equally wide.
            shrinkable = [k for k in range(len(widths)) if widths[k] > floors[k]]
            if not shrinkable:
                break
            widths[max(shrinkable, key=lambda k: widths[k])] -= 1
    return widths  # may still exceed `width` when fixed columns alone do; nothing is lost


def paragraph(text: str, width: int) -> str:
    """`text` wrapped to `width` columns."""
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def table(columns: list[Column], rows: list[list[str]], width: int, indent: int = 2) -> str:
    """Render rows under headers, every line at most `width` characters when that is possible."""
    cells = [[str(c) for c in row] for row in rows]
    natural = [
        max([len(col.header)] + [max((len(l) for l in row[i].splitlines()), default=0) for row in cells])
        for i, col in enumerate(columns)
    ]
    words = [max([len(word) for row in cells for word in row[i].split()], default=0) for i in range(len(columns))]
    widths = _fit(natural, words, columns, width - indent)
    pad = " " * indent

    def emit(parts: list[list[str]]) -> list[str]:
        height = max(len(p) for p in parts)
        out = []
        for k in range(height):
            line = _GAP.join(
                (p[k] if k < len(p) else "").ljust(w) for p, w in zip(parts, widths)
            )
            out.append((pad + line).rstrip())
        return out

    lines = emit([[_trim_start(c.header, w)] for c, w in zip(columns, widths)])
    for row in cells:
        lines.extend(emit([_cell_lines(text, w, c.mode) for text, c, w in zip(row, columns, widths)]))
    return "\n".join(lines)
