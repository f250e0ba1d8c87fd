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

``SoftTargetForm`` is its sibling for a target given as a tensor, one distribution per row
(probability targets, knowledge distillation, mixup): see its docstring.

Nothing here imports triton: the detector uses it on machines that only trace graphs.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Optional

__all__ = ["LossForm", "REDUCTIONS", "SMOOTHINGS", "SoftTargetForm", "TARGETS"]

REDUCTIONS = ("none", "sum", "mean")
SMOOTHINGS = ("all", "others")
TARGETS = ("probs", "log_probs", "logits")


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
        recovered values (:func:`shortest`). A nonzero c must be the KL term of that distribution.
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
            options.append((len(repr(shortest(eps))), smoothing, shortest(eps)))
        options.sort(key=lambda o: (o[0], o[1] != "all"))
        _, smoothing, eps = options[0]
        form = cls(label_smoothing=eps, smoothing=smoothing if eps else "all", scale=shortest(mass), **fields)
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


def shortest(q: Fraction) -> float:
    """The shortest decimal within a few ulps of q rounded to a double (0.1 for the Fraction of
    0.1, and for 0.1 / 31 * 31)."""
    raw = float(q)
    for digits in range(1, 18):
        short = float(f"{raw:.{digits}g}")
        if abs(short - raw) <= _ULPS * math.ulp(raw):
            return short
    return raw


@dataclasses.dataclass(frozen=True)
class SoftTargetForm:
    """The term of a loss against a distribution given as a tensor, one per row (the target q).

    LossForm's target distribution is built from the labels with constants the detector recovers
    exactly; here q is data: probabilities (``F.cross_entropy`` with a float target, timm's mixup
    targets), log-probabilities (``F.kl_div(..., log_target=True)``) or a teacher's logits, whose
    softmax is taken in the kernel and never stored. It is a sibling rather than more fields of
    LossForm because its constants are of another kind (no a, b, c: the term's mass, entropy and
    'mean' divisor depend on the data), and because a call often holds both: a label term, in
    LossForm's words, next to this one (Hinton distillation: a cross-entropy on the labels at
    temperature 1 plus a KL divergence at temperature T). One op call takes both forms.

    For the student's logits x (after LossForm's logit_scale and softcap), s = soft_logit_scale x,
    p = softmax(s), class weights w (ones without), eps = soft_label_smoothing, V classes:

        soft_i = soft_scale [ sum_j w_j ((1 - eps) q_ij + eps / V) (lse(s_i) - s_ij)
                              + soft_kl sum_j q_ij log q_ij ]                     (0 log 0 = 0)
                 + reverse_kl sum_j p_ij (log p_ij - log q_ij)

    The first line is PyTorch's probability-target cross-entropy (label smoothing applied to q as
    PyTorch applies it; q is not renormalised), and with soft_kl it is ``F.kl_div(log_softmax(s),
    q)`` summed over the classes; the second is KL(p || q), torchtune's reverse KL (their
    symmetric KL is both). 'mean' divides this term by the number of rows it counts (every row,
    or those whose label is kept when labels mask the rows: torchtune's mean over valid tokens),
    not by class weights: probability-target cross-entropy's rule.
    """

    target_kind: str = "probs"  # what the target tensor holds: "probs", "log_probs" (kl_div's log_target) or "logits"
    target_logit_scale: float = 1.0  # target_kind="logits": q = softmax(target_logit_scale * target) (1 / temperature)
    soft_logit_scale: float = 1.0  # the student's logits times this in this term (1 / temperature)
    soft_label_smoothing: float = 0.0  # q -> (1 - eps) q + eps / V, as F.cross_entropy with a float target
    soft_scale: float = 1.0  # the cross-entropy (or KL(q || p)) term times this: T**2, 1 - alpha, 0 for none
    soft_kl: bool = False  # KL(q || p): adds sum_j q_j log q_j
    reverse_kl: float = 0.0  # KL(p || q) times this

    def __post_init__(self):
        if self.target_kind not in TARGETS:
            raise ValueError(f"smoothce: target_kind={self.target_kind!r} is not one of 'probs', 'log_probs', 'logits'")
        if not isinstance(self.soft_kl, bool):
            raise TypeError(f"smoothce: soft_kl must be a bool, got {self.soft_kl!r}")
        for name in ("target_logit_scale", "soft_logit_scale", "soft_label_smoothing", "soft_scale", "reverse_kl"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        for name in ("target_logit_scale", "soft_logit_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"smoothce: {name}={getattr(self, name)!r} must be > 0")
        if self.target_kind != "logits" and self.target_logit_scale != 1.0:
            raise ValueError(f"smoothce: target_logit_scale={self.target_logit_scale!r} needs target_kind='logits' "
                             f"(got {self.target_kind!r})")
        if self.soft_label_smoothing and (self.soft_kl or self.reverse_kl):
            raise ValueError("smoothce: soft_label_smoothing applies to a cross-entropy (F.cross_entropy's); "
                             "a KL divergence takes its target as it is")

    @property
    def active(self) -> bool:
        """Whether the term reads the target at all."""
        return self.soft_scale != 0.0 or self.reverse_kl != 0.0

    def smoothing(self, classes: int) -> tuple[float, float]:
        """(alpha, beta): the cross-entropy's target is alpha q_j + beta, per class weight."""
        eps = self.soft_label_smoothing
        return 1.0 - eps, (eps / classes if classes else 0.0)

    def as_args(self) -> tuple:
        """The fields in order, as the ``smoothce::soft_cross_entropy`` schema takes them."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def describe(self) -> dict:
        """The fields a user would name, without defaults."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if getattr(self, f.name) != f.default}
        out["target_kind"] = self.target_kind
        return out
