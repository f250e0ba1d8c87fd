"""What a benchmark case is, and which cases exist.

A case is one kind of training step through a loss (cross-entropy on given logits, an LM head and
its loss, a whole model): its methods, its default shapes per device, how its inputs are built and
which rates its rows report. Each case lives in its own module, which exports ``CASES`` (name ->
Case); adding a case is a new module plus one line in :data:`CASE_MODULES`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from benchmarks.harness import Inputs, Problem
from benchmarks.methods import Method

# Modules holding cases, in the order `--list` and the default run show them.
CASE_MODULES = (
    "benchmarks.cross_entropy",
    "benchmarks.linear_cross_entropy",
)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The shapes a case runs: every (dtype, n, v) with each smoothing value."""

    ns: tuple
    vs: tuple
    dtypes: tuple
    smoothings: tuple = (0.0, 0.1)
    d: int | None = None  # hidden size, for cases with a hidden dimension


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # the --case key and the JSON "case"
    title: str  # table and plot heading
    methods: dict[str, Method]  # name -> method, in the order rows are shown
    grid: Callable[[str, bool], Grid]  # (device, quick) -> default shapes
    make_inputs: Callable[[Problem], Inputs]
    reference: Method  # what every method is checked against (on the same inputs)
    # Bytes an ideal kernel must move for one step (effective bandwidth), or None.
    bytes_moved: Callable[[Problem], int | None] = lambda p: None
    # Floating-point operations of one step (TFLOP/s), or None.
    flops: Callable[[Problem], int | None] = lambda p: None

    def method(self, name: str) -> Method:
        if name not in self.methods:
            raise ValueError(f"no method {name!r} for case {self.name!r}; choose from {', '.join(self.methods)}")
        return self.methods[name]


def all_cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for module in CASE_MODULES:
        cases.update(importlib.import_module(module).CASES)
    return cases


def get_case(name: str) -> Case:
    cases = all_cases()
    if name not in cases:
        raise ValueError(f"no benchmark case {name!r}; choose from {', '.join(cases)}")
    return cases[name]
