"""What the detector found in one graph: rewritten losses and the near misses it left alone."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from smoothce.kernels.form import LossForm


@dataclasses.dataclass(frozen=True)
class Match:
    """One loss replaced by smoothce op calls.

    ``form`` holds the parameters in the user's words (label_smoothing and its convention,
    ignore_index, reduction, class weights, z_loss, softcap, logit_scale = 1 / temperature);
    ``coefficients`` the exact numbers the detector recovered (a, b, c, z of the form in
    ``algebra``'s docstring), for a verbose view. ``params`` is the flat dict earlier readers
    use: eps and convention, the form's fields, the coefficients, classes and dtypes.
    """

    family: str  # "cross_entropy", "log_softmax+nll", "kl_div", "smoothed-target", "hand-written eps/V", ...
    location: str  # the line that produces the loss, "file.py:42" ("<unknown>" without a stack trace)
    params: dict[str, Any]
    replaced: tuple[str, ...]  # names of the graph nodes the op calls replace
    form: Optional[LossForm] = None
    coefficients: Optional[dict[str, float]] = None
    # Op calls whose class weights differ are no one form: each call's form and weight's name,
    # in the order of ``params["weight"]``; empty when ``form`` describes the whole loss.
    call_forms: tuple[tuple[LossForm, Optional[str]], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {"family": self.family, "location": self.location, "params": dict(self.params),
               "replaced": list(self.replaced)}
        if self.form is not None:
            out["form"] = self.form.describe()
        if self.call_forms:
            out["calls"] = [{"form": f.describe(), "weight": w} for f, w in self.call_forms]
        if self.coefficients is not None:
            out["coefficients"] = dict(self.coefficients)
        return out


@dataclasses.dataclass(frozen=True)
class NearMiss:
    """A cross-entropy-like computation left alone, with a reason a person can act on."""

    node: str  # graph node the candidate starts from (the log_softmax or the loss call)
    location: str  # the line where the detector stopped ("file.py:42")
    reason: str  # e.g. "log-probs also read at model.py:42 (argmax)"

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
