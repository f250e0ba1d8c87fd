"""What smoothce::soft_cross_entropy does with its inputs before a kernel runs.

Both kernels (kernels/soft_cross_entropy_triton.py, kernels/soft_cross_entropy_torch.py) compute,
for each row i, the loss that LossForm (the label part) and SoftTargetForm (the target part)
describe as one sum of per-row terms, each with its own coefficient:

    loss_i = k_y (lse_i - x_iy) + k_yb (lse_i - x_iyb) + k_u (W lse_i - sum_j w_j x_ij) + k_z lse_i^2
             + k_f F_i + k_r R_i

with x the student's logits after LossForm's logit_scale and softcap, lse = logsumexp(x), W = sum_j
w_j, F the cross-entropy (or KL) against the target and R the reverse KL of SoftTargetForm (at
the student's soft_logit_scale). The coefficients hold everything that depends on the labels
alone: the constants a and b, w[y], mixup's lam and 1 - lam, the row masks and the reduction's
'mean' divisors. They are computed here in torch, on the device and without a host sync, as an
(rows, 6) tensor: the kernels stay one body for every reduction, and the gradient they write is
d(sum_i loss_i) / dx. With the gradient deferred to backward, the same kernel runs again with the
coefficients times grad_output.

A term counts nowhere on a row whose coefficient is exactly 0: rows the labels ignore, even when
'mean' found no row at all (a 1 / 0 divisor), as in PyTorch, whose loss is then nan
(``nan_if_empty``) but whose gradient is 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

from smoothce.kernels.form import LossForm, SoftTargetForm
from smoothce.kernels.inputs import Labels, check_labels

# Columns of the coefficient tensor.
K_Y, K_YB, K_U, K_Z, K_F, K_R = range(6)
COEFFICIENTS = 6
# Columns of the per-row statistics kept for a gradient computed in backward.
S_LSE, S_LSE_SOFT, S_MASS, S_REVERSE, S_LSE_TARGET = range(5)
STATISTICS = 5

__all__ = ["COEFFICIENTS", "STATISTICS", "RowCoefficients", "Terms", "check_lam", "check_mixup_labels",
           "check_soft_target", "check_target_rows"]


@dataclasses.dataclass(frozen=True)
class Terms:
    """Which terms a call has and the constants its kernels need (the compile-time switches)."""

    label: bool  # a term reads the labels' logits (k_y, and k_yb with mixup)
    mixup: bool  # labels_b and lam
    uniform: bool  # k_u: the label part's smoothing
    z: bool  # k_z
    forward: bool  # k_f: the target's cross-entropy or KL(q || p)
    reverse: bool  # k_r: KL(p || q)
    kl: bool  # F adds the target's entropy term
    target_kind: str  # "probs", "log_probs" or "logits"
    target_logit_scale: float
    soft_logit_scale: float
    alpha: float  # F's target: alpha q + beta (soft label smoothing)
    beta: float
    softcap: Optional[float]
    logit_scale: float

    @property
    def hard(self) -> bool:
        """Terms at the student's own scale (logsumexp of x)."""
        return self.label or self.uniform or self.z

    @property
    def soft(self) -> bool:
        """Terms at soft_logit_scale that read the target."""
        return self.forward or self.reverse

    @property
    def two_scales(self) -> bool:
        """Both kinds of term, at different scales: two logsumexps of the student's row."""
        return self.hard and self.soft and self.soft_logit_scale != 1.0

    @property
    def smoothing_sum(self) -> bool:
        """Whether sum_j w_j x_j is needed (label smoothing on either part)."""
        return self.uniform or (self.forward and self.beta != 0.0)

    @classmethod
    def of(cls, form: LossForm, soft: SoftTargetForm, classes: int, has_labels: bool, has_target: bool,
           mixup: bool) -> "Terms":
        a, b, _ = form.coefficients(classes) if has_labels else (0.0, 0.0, 0.0)
        alpha, beta = soft.smoothing(classes)
        return cls(label=a != 0.0, mixup=mixup and a != 0.0, uniform=b != 0.0, z=has_labels and form.z_loss != 0.0,
                   forward=has_target and soft.soft_scale != 0.0, reverse=has_target and soft.reverse_kl != 0.0,
                   kl=soft.soft_kl, target_kind=soft.target_kind, target_logit_scale=soft.target_logit_scale,
                   soft_logit_scale=soft.soft_logit_scale, alpha=alpha, beta=beta, softcap=form.softcap,
                   logit_scale=form.logit_scale)


class RowCoefficients:
    """The per-row coefficients of a call, its per-row constants and its reduction (no host sync).

    labels (rows) carry the label term; labels_b and lam make it mixup's lam * loss(labels) +
    (1 - lam) * loss(labels_b), each reduced as PyTorch reduces it ('mean': by its own sum of w[y]).
    The target part counts on target_rows (bool), by default on the rows whose label is not
    ignore_index (every row without labels), and its 'mean' divides by their number.
    """

    def __init__(self, form: LossForm, soft: SoftTargetForm, terms: Terms, rows: tuple, classes: int,
                 labels: Optional[torch.Tensor], labels_b: Optional[torch.Tensor], lam: Optional[torch.Tensor],
                 weight: Optional[torch.Tensor], acc: torch.dtype, device: torch.device,
                 target_rows: Optional[torch.Tensor] = None):
        self.form, self.soft, self.terms, self.rows, self.acc, self.device = form, soft, terms, rows, acc, device
        self.classes = classes
        self.reduction = form.reduction
        ignore = form.ignore_index
        self.parts = []  # (Labels, mixing weight) of each label set
        if labels is not None:
            lam_rows = None if lam is None else torch.broadcast_to(lam.to(acc), rows).reshape(-1)
            self.parts.append((Labels(labels.reshape(-1), weight, ignore, classes, acc), lam_rows))
            if labels_b is not None:
                self.parts.append((Labels(labels_b.reshape(-1), weight, ignore, classes, acc), 1.0 - lam_rows))
        self.n = math.prod(rows)
        self.target_rows = None if target_rows is None else target_rows.reshape(-1)

    # -- the divisors of 'mean' -------------------------------------------------------------------

    def _mean(self, divisor) -> torch.Tensor:
        """1 / divisor under 'mean' (inf for 0), else 1."""
        if self.reduction != "mean":
            return torch.ones((), dtype=self.acc, device=self.device)
        return 1.0 / torch.as_tensor(divisor, dtype=self.acc, device=self.device)

    @functools.cached_property
    def soft_rows(self) -> torch.Tensor:
        """1 on the rows the target part counts, else 0 (acc)."""
        if self.target_rows is not None:
            return self.target_rows.to(self.acc)
        if not self.parts:
            return torch.ones(self.n, dtype=self.acc, device=self.device)
        return self.parts[0][0].valid.to(self.acc)

    @functools.cached_property
    def _soft_divisor(self):
        return self.soft_rows.sum() if self.parts or self.target_rows is not None else float(self.n)

    # -- coefficients ----------------------------------------------------------------------------

    @staticmethod
    def _masked(on: torch.Tensor, value) -> torch.Tensor:
        """value on rows where ``on`` is nonzero, an exact 0 elsewhere (no 0 * inf)."""
        return torch.where(on == 0.0, 0.0, on * value)

    def coefficients(self) -> torch.Tensor:
        """(rows, 6) in acc: k_y, k_yb, k_u, k_z, k_f, k_r (the module docstring)."""
        k = torch.zeros(self.n, 6, dtype=self.acc, device=self.device)
        a, b, _ = self.form.coefficients(self.classes)
        t = self.terms
        for i, (lab, mix) in enumerate(self.parts):
            mix = 1.0 if mix is None else mix
            ce = self._mean(lab.wy_sum)
            if t.label:
                k[:, K_Y + i] = self._masked(lab.row_mask, a * lab.wy * ce * mix)
            if t.uniform:
                k[:, K_U] += self._masked(lab.row_mask, b * ce * mix)
            if t.z:
                k[:, K_Z] += self._masked(lab.row_mask, self.form.z_loss * self._mean(lab.count) * mix)
        soft = self._masked(self.soft_rows, self._mean(self._soft_divisor))
        if t.forward:
            k[:, K_F] = self.soft.soft_scale * soft
        if t.reverse:
            k[:, K_R] = self.soft.reverse_kl * soft
        return k

    def constant_rows(self) -> Optional[torch.Tensor]:
        """The label part's per-row constant (its KL term c), reduced like its rows; None when 0."""
        _, _, c = self.form.coefficients(self.classes)
        if not c or not self.parts:
            return None
        out = torch.zeros(self.n, dtype=self.acc, device=self.device)
        for lab, mix in self.parts:
            out += self._masked(lab.row_mask, c * self._mean(lab.wy_sum) * (1.0 if mix is None else mix))
        return out

    def nan_if_empty(self) -> Optional[torch.Tensor]:
        """'mean' over no row is 0 / 0 in PyTorch: nan where a term's divisor is 0, else 0."""
        if self.reduction != "mean":
            return None
        divisors = []
        t = self.terms
        for lab, _ in self.parts:
            if t.label or t.uniform:
                divisors.append(lab.wy_sum)
            if t.z:
                divisors.append(lab.count)
        if t.soft:
            divisors.append(self._soft_divisor)
        if not divisors:
            return None
        d = torch.stack([torch.as_tensor(v, dtype=self.acc, device=self.device) for v in divisors])
        return torch.where((d == 0).any(), math.nan, 0.0).to(self.acc)

    def reduce(self, loss_rows: torch.Tensor) -> torch.Tensor:
        """The call's loss from the kernel's per-row loss (rows already carry 'mean's divisors)."""
        c = self.constant_rows()
        if c is not None:
            loss_rows = loss_rows + c
        if self.reduction == "none":
            return loss_rows.view(self.rows)
        loss = loss_rows.sum()
        nan = self.nan_if_empty()
        return loss if nan is None else loss + nan


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def check_soft_target(target: torch.Tensor, logits: torch.Tensor) -> None:
    """A floating-point target of the logits' shape."""
    if not target.dtype.is_floating_point:
        raise TypeError(f"smoothce: target dtype {target.dtype} must be floating point (a distribution per row); "
                        "class indices go in labels")
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"smoothce: target shape {tuple(target.shape)} must equal the logits' shape "
                         f"{tuple(logits.shape)}")


def check_lam(lam, rows: tuple) -> None:
    """mixup's lam: a number or a floating-point tensor broadcastable to the rows, without grad."""
    if not isinstance(lam, torch.Tensor) or not lam.dtype.is_floating_point:
        got = lam.dtype if isinstance(lam, torch.Tensor) else type(lam).__name__
        raise TypeError(f"smoothce: lam must be a floating-point tensor, got {got}")
    try:
        torch.broadcast_shapes(tuple(lam.shape), rows)
    except RuntimeError:
        raise ValueError(f"smoothce: lam shape {tuple(lam.shape)} does not broadcast to the rows {rows}") from None
    if lam.requires_grad:
        raise ValueError("smoothce: a lam that requires grad is not supported (its gradient would be dropped); "
                         "pass lam.detach()")


def check_target_rows(target_rows, rows: tuple) -> None:
    if not isinstance(target_rows, torch.Tensor) or target_rows.dtype != torch.bool:
        got = target_rows.dtype if isinstance(target_rows, torch.Tensor) else type(target_rows).__name__
        raise TypeError(f"smoothce: target_rows must be a bool tensor, got {got}")
    if tuple(target_rows.shape) != tuple(rows):
        raise ValueError(f"smoothce: target_rows shape {tuple(target_rows.shape)} must equal the rows {rows}")


def check_mixup_labels(labels, labels_b, lam, rows: tuple) -> None:
    """labels (and labels_b) of the rows' shape; labels_b and lam come together."""
    if labels is not None:
        check_labels(labels, rows, "the logits' rows (the class dim is 1)")
    if (labels_b is None) != (lam is None):
        raise ValueError("smoothce: labels_b and lam go together (mixup: lam * loss(labels) + "
                         "(1 - lam) * loss(labels_b))")
    if labels_b is not None:
        if labels is None:
            raise ValueError("smoothce: labels_b needs labels")
        check_labels(labels_b, rows, "the logits' rows (the class dim is 1)")
        check_lam(lam, rows)
