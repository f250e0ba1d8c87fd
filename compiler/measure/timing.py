"""Step times as a median and a spread, and when a ratio of two medians means something.

A busy machine (other jobs on the same cores) makes single steps several times slower at random:
a ratio of two medians is only worth printing when each median comes with enough steps and a
spread (interquartile range) small against it. Otherwise the honest answer is that the
measurement cannot tell, and why.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Optional, Sequence

MIN_SAMPLES = 5  # timed steps below which a spread is not worth computing
MAX_RELATIVE_SPREAD = 0.25  # IQR / median above which a ratio of medians is not printed


@dataclasses.dataclass(frozen=True)
class Spread:
    """Median and quartiles of ``n`` samples (seconds, or any unit: ratios do not care)."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Spread":
        if not samples:
            raise ValueError("smoothce: no samples to summarise")
        if len(samples) == 1:
            (x,) = samples
            return cls(x, x, x, 1)
        q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(median, q1, q3, len(samples))

    @property
    def relative(self) -> float:
        """IQR / median: 0.1 means the middle half of the samples lies within 10% of the median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else float("inf")

    def why_not_comparable(self) -> Optional[str]:
        """None when this median can enter a ratio, else the reason in a reader's words."""
        if self.n < MIN_SAMPLES:
            return f"{self.n} timed step{'s' if self.n != 1 else ''}, a spread needs {MIN_SAMPLES}"
        if self.relative > MAX_RELATIVE_SPREAD:
            return f"IQR {self.relative:.0%} of the median, a ratio needs under {MAX_RELATIVE_SPREAD:.0%}"
        return None


def ratio(a: Spread, b: Spread) -> Optional[tuple[float, float, float]]:
    """(a / b of the medians, low, high) with low and high the quartiles divided crosswise
    (q1_a / q3_b, q3_a / q1_b); None when either spread makes a ratio meaningless."""
    if a.why_not_comparable() is not None or b.why_not_comparable() is not None:
        return None
    return a.median / b.median, a.q1 / b.q3, a.q3 / b.q1
