"""What the detector found in one graph: rewritten losses and the near misses it left alone."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Match:
    """One loss subgraph replaced by a smoothce op."""

    family: str  # "cross_entropy", "log_softmax+nll", "hand-written eps/V", "hand-written eps/(V-1)", "kl_div", ...
    location: str  # user source "file.py:42" from the node's stack trace, "<unknown>" without one
    params: dict[str, Any]  # recovered parameters: eps, convention, ignore_index, reduction, weight, z_loss, softcap, dtype
    replaced: tuple[str, ...]  # names of the graph nodes the op replaces

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class NearMiss:
    """A cross-entropy-like subgraph left alone, with a reason a person can act on."""

    node: str  # graph node the candidate starts from (the log_softmax or the loss call)
    location: str
    reason: str  # e.g. "log-probs also read at model.py:42"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RewriteResult:
    """Everything one detector run over one graph found."""

    matches: list[Match] = dataclasses.field(default_factory=list)
    near_misses: list[NearMiss] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "matches": [m.to_dict() for m in self.matches],
            "near_misses": [n.to_dict() for n in self.near_misses],
        }
