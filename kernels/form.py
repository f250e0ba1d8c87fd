"""LossForm: what a cross-entropy loss computes, in the words its users write it with.

One vocabulary from end to end: the public functionals, the ``smoothce::`` ops and the detector's
rewrite all describe a loss by these fields, and the report shows them as they are named here.

For logits x (after ``logit_scale`` and the optional softcap x -> cap * tanh(x / cap)), labels y,
class weights w (ones without a weight) and V classes, every supported loss is

    loss_i = sum_j q_ij (lse_i - x_ij) + c + z_loss * lse_i^2,   q_ij = a w[y_i] [j == y_i] + b w_j

on the rows it keeps, then reduced. The target distribution q is a label-smoothed one-hot, scaled:

    smoothing="all"     (PyTorch's label_smoothing): eps / V on every class, 1 - eps more on the label
                        a = scale (1 - eps),              b = scale eps / V
    smoothing="others"  eps / (V - 1) on every other class, 1 - eps on the label
                        a = scale (1 - eps V / (V - 1)),  b = scale eps / (V - 1)

Both describe the same family of distributions; the convention names the constant the user wrote.
``kl=True`` is the KL divergence to that distribution instead of the cross-entropy: it adds
c = scale sum_j q^_j log q^_j (q^ the unscaled distribution, 0 log 0 = 0).

Nothing here imports triton: the detector uses it on machines that only trace graphs.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Optional

__all__ = ["LossForm", "REDUCTIONS", "SMOOTHINGS"]

REDUCTIONS = ("none", "sum", "mean")
SMOOTHINGS = ("all", "others")


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise TypeError(f"smoothce: {name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (math.inf, -math.inf):  # math.isfinite does not trace under dynamic=True
        raise ValueError(f"smoothce: {name}={value!r} must be finite")
    return value


def _xlogx(t: float) -> float:
    return t * math.log(t) if t > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class LossForm:
    """A (label-smoothed) cross-entropy, as the user wrote it. See the module docstring for the math."""

    ignore_index: Optional[int] = -100  # rows with this label count nowhere; None: no label is ignored
    reduction: str = "mean"  # 'none', 'sum', or 'mean' (PyTorch's: divided by the sum of w[y] over kept rows)
    label_smoothing: float = 0.0  # eps
    smoothing: str = "all"  # how eps is spread: "all" (eps / V, PyTorch) or "others" (eps / (V - 1))
    scale: float = 1.0  # the cross-entropy (or KL) part times this constant, e.g. 0.5 * loss
    kl: bool = False  # KL divergence to the smoothed target instead of cross-entropy
    z_loss: float = 0.0  # z_loss * lse^2 per kept row (PaLM's auxiliary loss)
    softcap: Optional[float] = None  # x -> softcap * tanh(x / softcap) before the loss (Gemma 2)
    logit_scale: float = 1.0  # x -> logit_scale * x first (1 / temperature)

    def __post_init__(self):
        if self.ignore_index is not None and (isinstance(self.ignore_index, bool)
                                              or not isinstance(self.ignore_index, int)):
            raise TypeError(f"smoothce: ignore_index must be an int or None, got {self.ignore_index!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"smoothce: reduction={self.reduction!r} is not one of 'none', 'sum', 'mean'")
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothce: smoothing={self.smoothing!r} is not one of 'all' (eps / V) "
                             "or 'others' (eps / (V - 1))")
        if not isinstance(self.kl, bool):
            raise TypeError(f"smoothce: kl must be a bool, got {self.kl!r}")
        for name in ("label_smoothing", "scale", "z_loss", "logit_scale"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if self.z_loss < 0:
            raise ValueError(f"smoothce: z_loss={self.z_loss!r} must be >= 0")
        if self.logit_scale <= 0:
            raise ValueError(f"smoothce: logit_scale={self.logit_scale!r} must be > 0")
        if self.softcap is not None:
            cap = _finite("softcap", self.softcap)
            if cap <= 0:
                raise ValueError(f"smoothce: softcap={self.softcap!r} must be None or > 0")
            object.__setattr__(self, "softcap", cap)

    # -- the coefficients the kernels use ------------------------------------------------------

    def coefficients(self, classes: int) -> tuple[float, float, float]:
        """(a, b, c) of the general form for ``classes`` classes."""
        a, b = self._ab(classes)
        c = self.scale * self._entropy_term(classes) if self.kl else 0.0
        return float(a), float(b), c

    def _ab(self, classes: int) -> tuple[float, float]:
        eps, s = self.label_smoothing, self.scale
        if eps == 0.0:
            return s, 0.0
        if self.smoothing == "all":
            return s * (1.0 - eps), s * eps / classes
        if classes < 2:
            raise ValueError(f"smoothce: smoothing='others' (eps / (V - 1)) needs at least 2 classes, got V={classes}")
        return s * (1.0 - eps * classes / (classes - 1)), s * eps / (classes - 1)

    def _entropy_term(self, classes: int) -> float:
        """sum_j q^_j log q^_j of the unscaled target distribution."""
        eps = self.label_smoothing
        if self.smoothing == "all":
            other = eps / classes
            return _xlogx(1.0 - eps + other) + (classes - 1) * _xlogx(other)
        other = eps / (classes - 1) if classes > 1 else 0.0
        return _xlogx(1.0 - eps) + (classes - 1) * _xlogx(other)

    @classmethod
    def from_coefficients(cls, a: Fraction, b: Fraction, c: float, classes: int, **fields) -> "LossForm":
        """The form whose coefficients are (a, b, c) for ``classes`` classes; ValueError when none is.

        The convention is the one whose eps is the shorter decimal (what the user most likely
        wrote: 0.1 rather than 0.0999...); eps and the scale are read within a few ulps of the
        recovered values (:func:`_shortest`). A nonzero c must be the KL term of that distribution.
        """
        a, b = Fraction(a), Fraction(b)
        mass = a + b * classes
        if mass == 0:
            raise ValueError("smoothce: the target distribution has zero mass (a + b V = 0)")
        options = []
        for smoothing, spread in (("all", classes), ("others", classes - 1)):
            if spread <= 0 and b != 0:
                continue
            eps = b * spread / mass if spread > 0 else Fraction(0)
            options.append((len(repr(_shortest(eps))), smoothing, _shortest(eps)))
        options.sort(key=lambda o: (o[0], o[1] != "all"))
        _, smoothing, eps = options[0]
        form = cls(label_smoothing=eps, smoothing=smoothing if eps else "all", scale=_shortest(mass), **fields)
        if c:
            kl = dataclasses.replace(form, kl=True)
            expected = kl.coefficients(classes)[2]
            if not math.isclose(expected, float(c), rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(f"smoothce: the per-row constant {float(c)!r} is not the KL term "
                                 f"{expected!r} of the target distribution")
            form = kl
        return form

    def as_args(self) -> tuple:
        """The fields in order: the ``smoothce::`` op schemas take them as these positional arguments."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    # -- words ---------------------------------------------------------------------------------

    def describe(self) -> dict:
        """The fields a user would name, without defaults: {'label_smoothing': 0.1, ...}."""
        out: dict = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("ignore_index", "reduction") or value != f.default:
                out[f.name] = value
        if not self.label_smoothing:
            out.pop("smoothing", None)
        return out


# A recovered eps went through the user's own float arithmetic (eps / (V - 1), then times V - 1
# here): each operation rounds by half an ulp, so the constant the user wrote is within a few
# ulps of the double recovered (0.2 / 10 * 10 is 0.19999999999999998).
_ULPS = 4


def _shortest(q: Fraction) -> float:
    """The shortest decimal within a few ulps of q rounded to a double (0.1 for the Fraction of
    0.1, and for 0.1 / 31 * 31)."""
    raw = float(q)
    for digits in range(1, 18):
        short = float(f"{raw:.{digits}g}")
        if abs(short - raw) <= _ULPS * math.ulp(raw):
            return short
    return raw
