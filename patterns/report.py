"""What the detector found in one graph: rewritten losses and the near misses it left alone."""

from __future__ import annotations

import dataclasses
from typing import Any

from smoothce.kernels.form import LossForm


@dataclasses.dataclass(frozen=True)
class Match:
    """One loss replaced by smoothce op calls.

    ``form`` holds the parameters in the user's words (label_smoothing and its convention,
    ignore_index, reduction, z_loss, softcap, logit_scale = 1 / temperature); ``coefficients`` the
    exact numbers the detector recovered (a, b, c, z of the module docstring of ``algebra``), for
    a verbose view; ``details`` what else a reader may want (classes, dtypes, class weights, the
    head, how many op calls).
    """

    family: str  # "cross_entropy", "log_softmax+nll", "kl_div", "smoothed-target", "hand-written eps/V", ...
    location: str  # the line that produces the loss, "file.py:42" ("<unknown>" without a stack trace)
    form: LossForm
    coefficients: dict[str, float]
    details: dict[str, Any]
    replaced: tuple[str, ...]  # names of the graph nodes the op calls replace

    @property
    def params(self) -> dict[str, Any]:
        """One flat dict: eps and convention, the form's fields, coefficients and details."""
        f = self.form
        out: dict[str, Any] = {
            "eps": f.label_smoothing,
            "convention": ({"all": "eps/V", "others": "eps/(V-1)"}[f.smoothing] if f.label_smoothing else None),
            "ignore_index": f.ignore_index, "reduction": f.reduction, "z_loss": f.z_loss, "softcap": f.softcap,
        }
        if f.logit_scale != 1.0:
            out["logit_scale"] = f.logit_scale
        if f.scale != 1.0:
            out["scale"] = f.scale
        out.update({k: v for k, v in self.details.items()})
        out.update({"target_coef": self.coefficients["a"], "uniform_coef": self.coefficients["b"],
                    "constant": self.coefficients["c"]})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "location": self.location, "form": self.form.describe(),
                "coefficients": dict(self.coefficients), "details": dict(self.details),
                "replaced": list(self.replaced)}


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
