"""The normal form: is a loss value an instance of the fused op's form, and with which parameters?

A value reaching a loss output (``RowV`` per row, ``ScalarV`` reduced) is a sum of terms, each
restricted to the rows its own mask keeps. ``normal_form`` groups the terms by mask and reads
every group as

    a * L_label + b * sum_j w_j L_j + z * lse^2 + c,    L = lse - x  (minus the log-probs)

with w_j = 1 except at "padding columns" the target leaves out. A loss is an instance of the op
when there is one label term (its mask folds into the labels as ignore_index), one uniform term
(its own mask becomes the op's ``uniform_rows``), the z and constant terms on the label term's
rows, and one divisor per op call. A label term under PyTorch's mean next to a uniform term averaged
over its own rows (the seed formula: nll_loss's mean next to (-lp.sum(-1)).mean()) is one call,
the op's 'mean' with uniform_rows dividing each term by its own rows; other terms divided by
different counts become one call each. Anything else is a Reject that says why.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any, Optional

import torch.fx

from smoothce.kernels.form import LossForm, SoftTargetForm
from smoothce.patterns.algebra import (
    SOFT_ATOMS, CondAtom, Dense, Divisor, LabelV, Logits, Q, Reject, RowV, ScalarV, lam_atom, lams, simplify,
    static_classes, two_labels,
)
from smoothce.patterns.nodes import fake, shape, words

Node = torch.fx.Node

__all__ = ["Target", "Call", "Mix", "SoftPart", "Unmixed", "normal_form", "classes_of", "logits_shape"]


@dataclasses.dataclass(frozen=True)
class Target:
    """The labels one op call reads: ``node`` (the user's labels, or the tensor their code built
    from them), ``ignore`` (the op's ignore_index; None: no label is ignored), ``fold``: the
    conditions of the label term's mask that are not "labels != ignore" and are folded into the
    labels as where(fold, labels, ignore); ``wrap``: the labels' ``LabelV.wrap`` (applied before
    the fold)."""

    node: Optional[Node]
    ignore: Optional[int]
    fold: frozenset = frozenset()
    wrap: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class SoftPart:
    """The term of a call against a target given as data (``Dense``): its form, the class weights
    it reads, the rows it counts (``rows``, a mask; empty: every row) and how it is reduced."""

    dense: Dense
    weight: Optional[Node]
    rows: frozenset
    form: SoftTargetForm
    reduction: str
    divisor: Optional[Divisor]


@dataclasses.dataclass(frozen=True)
class Mix:
    """Mixup's second labels in the same call: lam * loss(labels) + (1 - lam) * loss(labels_b),
    each part reduced as its own loss (the op's labels_b and lam). ``lam``: the user's tensor (a
    Node, one number or one per row) or a constant (a Fraction: the two losses' coefficients were
    numbers)."""

    label: LabelV
    target: Target
    lam: Any


@dataclasses.dataclass(frozen=True)
class Call:
    """One fused op call: the terms of a loss that share a divisor."""

    a: Fraction
    b: Fraction
    c: Fraction
    z: Fraction
    label: Optional[LabelV]
    target: Target
    uniform_rows: Optional[frozenset]  # None: the label term's rows; else the uniform term's own mask
    weight: Optional[Node]  # the user's class weights
    columns: tuple  # ((p, w_p), ...): class weights of the target's padding columns (w = 1 elsewhere)
    reduction: str  # the op's: 'none', 'sum' or 'mean'
    divisor: Optional[Divisor]  # what the op's 'sum' is divided by afterwards
    form: LossForm  # the parameters the op gets (for V classes)
    words: LossForm  # the same loss as the user wrote it (a padding column is no class to spread over)
    soft: Optional[SoftPart] = None  # the term against a target given as data: smoothce::soft_cross_entropy
    mix: Optional[Mix] = None  # mixup's second labels and lam: smoothce::soft_cross_entropy

    @property
    def targets(self) -> tuple:
        """The labels the call reads: its own, and mixup's second ones."""
        return (self.target,) if self.mix is None else (self.target, self.mix.target)


class Unmixed(Reject):
    """A loss weighted by a tensor that is not mixup's lam (a per-row weight, a loss scale given
    as a tensor): left as written outside the op, whose terms are rewritten each. Multiplying a
    loss by a tensor is no reason for a near miss."""


def logits_shape(key: Logits) -> Optional[tuple]:
    node = key.layout[-1] if key.layout else key.source
    return shape(node)


def classes_of(key: Logits) -> int:
    shp = logits_shape(key)
    if shp is None or key.cd is None:
        raise Reject("the logits have no known shape")
    return static_classes(shp[key.cd])


def normal_form(value) -> tuple[Logits, list[Call]]:
    """(the logits, the op calls) for a loss value, or Reject."""
    if isinstance(value, RowV):
        parts, per_row = ((None, value),), True
    elif isinstance(value, ScalarV):
        parts, per_row = value.parts, False
    else:
        raise Reject("not a loss")
    key = value.key
    V = classes_of(key)
    shp = logits_shape(key)
    if not shp:
        raise Reject("the logits are 0-D")
    if key.cd not in (-1, 1 - len(shp)):
        raise Reject(f"classes along dim {len(shp) + key.cd} of a {len(shp)}-D tensor "
                     "(the op takes them at dim 1 or last)")
    if fake(key.source) is None or not fake(key.source).dtype.is_floating_point:
        raise Reject("the logits are not a floating-point tensor")
    tagged = [(divisor, lam, call) for divisor, row in parts if row.terms
              for lam, call in _part_calls(row, divisor, V, key, per_row)]
    pairs = _mixups(tagged, V)
    pairs.sort(key=lambda p: (p[1].a == 0, p[1].b == 0))  # the call with the label term first
    merged = _own_means(pairs, V)
    calls = [merged] if merged is not None else [c for _, c in pairs]
    calls = _target_beside_labels(calls, shp, key.cd)
    if not calls or all(c.a == 0 and c.b == 0 and c.soft is None for c in calls):
        # lse^2 alone: the op would add a gradient buffer where logsumexp needs none
        raise Reject("no log-prob term (a z-loss alone is left as written)")
    labels = {c.label for c in calls if c.label is not None}
    if len(labels) > 1:
        raise Reject(two_labels(labels))
    return key, calls


# ------------------------------------------------------------------------------------------------
# Mixup: two labels in one call
# ------------------------------------------------------------------------------------------------


def _part_calls(row: RowV, divisor: Optional[Divisor], V: int, key: Logits, per_row: bool) -> list:
    """(lam factor or None, call) for the terms that share a divisor. Terms weighted by lam and by
    1 - lam (``algebra.lam_atom``) are read apart, each with the terms that carry no lam, which
    are lam times themselves plus 1 - lam times themselves; terms on two labels with constant
    coefficients (mixup's target lam * one_hot(y_a) + (1 - lam) * one_hot(y_b) with a number lam)
    become one call per label, with the terms on no label shared in the labels' proportion."""
    terms = _merge_masks(dict(row.terms))
    found = {a.node for _, conds in terms for a in lams(conds)}
    if len(found) > 1:
        raise Reject("the loss is mixed by two different tensors; mixup mixes two losses by one lam")
    if found:
        (lam,) = found
        out = []
        for holds in (True, False):
            atom = lam_atom(lam, holds)
            part: dict = {}
            for (a, conds), c in terms.items():
                if atom in conds or not lams(conds):
                    k = (a, conds - {atom})
                    part[k] = part.get(k, 0) + c
            part = _clean_terms(part)
            if part:
                out += [(atom, call) for call in _calls(RowV(row.key, part, row.seeds), divisor, V, key, per_row)]
        return out
    return [(None, call) for r in _by_label(row, terms) for call in _calls(r, divisor, V, key, per_row)]


def _clean_terms(terms: dict) -> tuple:
    return tuple((k, v) for k, v in terms.items() if v != 0)


def _by_label(row: RowV, terms: dict) -> list:
    """The row, or two rows when its terms read two labels: each label's terms, and a term on no
    label goes with the label read on the same rows (its mask), split between the two as their
    coefficients are when both or neither is read there (the sum of the two rows is the row)."""
    def labels_on(items) -> dict:
        on: dict = {}
        for (atom, _), c in items:
            if atom[0] in ("XG", "WG"):
                on[atom[1]] = on.get(atom[1], Q(0)) - c
        return on

    total = labels_on(terms.items())
    if len(total) != 2 or 0 in total.values() or sum(total.values()) == 0:
        return [RowV(row.key, _clean_terms(terms), row.seeds)]
    parts: dict = {label: {} for label in total}
    for conds in {conds for _, conds in terms}:
        group = [(k, c) for k, c in terms.items() if k[1] == conds]
        on = labels_on(group)
        share = on if len(on) == 2 and sum(on.values()) != 0 else total if not on else None
        for (atom, _), c in group:
            if atom[0] in ("XG", "WG"):
                parts[atom[1]][(atom, conds)] = c
            elif share is None:
                (label,) = on
                parts[label][(atom, conds)] = c
            else:
                for label in parts:
                    parts[label][(atom, conds)] = c * share[label] / sum(share.values())
    order = {n: i for i, n in enumerate(row.key.source.graph.nodes)}
    first = sorted(parts, key=lambda label: order.get(label.node if label.node is not None else label.base, 0))
    return [RowV(row.key, _clean_terms(parts[label]), row.seeds) for label in first]  # as the graph reads them


def _mixups(tagged: list, V: int) -> list:
    """(divisor, call) pairs, mixup's two calls made one: the call weighted by lam and the one
    weighted by 1 - lam, or two calls on two labels whose coefficients are proportional."""
    mixed = [(d, lam, c) for d, lam, c in tagged if lam is not None]
    pairs = [(d, c) for d, lam, c in tagged if lam is None]
    if mixed:
        on = [(d, c) for d, lam, c in mixed if lam.holds]
        off = [c for _, lam, c in mixed if not lam.holds]
        lam = mixed[0][1].node
        if len(on) != 1 or len(off) != 1:
            raise Unmixed(f"a loss weighted by {words(lam)} is no mixup of two losses")
        (d, a), (b,) = on[0], off
        why = _unmixable(a, b, same_scale=True)
        if why is not None:
            raise Reject(f"mixup by {words(lam)}: {why}")
        if fake(lam) is None or fake(lam).requires_grad:
            raise Reject(f"mixup by {words(lam)}, which requires grad: the op does not differentiate lam "
                         "(pass lam.detach(), or a number)")
        return pairs + [(d, dataclasses.replace(a, mix=Mix(b.label, b.target, lam)))]
    labelled = [i for i, (_, c) in enumerate(pairs) if c.label is not None]
    if len(labelled) == 2 and len({pairs[i][1].label for i in labelled}) == 2:
        i, j = labelled
        a, b = pairs[i][1], pairs[j][1]
        if _unmixable(a, b, same_scale=False) is None:
            lam = a.a / (a.a + b.a)
            merged = _proportional_mix(a, b, V, lam)
            if merged is not None:
                return [p for k, p in enumerate(pairs) if k != j and k != i] + [(pairs[i][0], merged)]
    return pairs


def _unmixable(a: Call, b: Call, same_scale: bool) -> Optional[str]:
    """Why two calls are no mixup of two losses (None: they are): the op mixes two label terms of
    one form, on the same class weights, each reduced as its own loss."""
    for c in (a, b):
        if c.label is None or c.a == 0:
            return "a part reads no label"
        if c.soft is not None or c.uniform_rows is not None or c.columns:
            return "a part has a target given as a tensor, a smoothing term masked apart or padding columns"
    if a.weight is not b.weight:
        return "the two losses read different class weights"
    if (a.reduction, a.divisor) != (b.reduction, b.divisor):
        return "the two losses are reduced differently"
    if a.target.ignore != b.target.ignore:
        return f"the two losses ignore different labels ({a.target.ignore} and {b.target.ignore})"
    if a.form != dataclasses.replace(b.form, scale=a.form.scale, z_loss=a.form.z_loss) \
            or (a.z == 0) != (b.z == 0):
        return "the two losses differ in more than their labels (label smoothing, z-loss, softcap or temperature)"
    if same_scale and (a.form.scale, a.form.z_loss) != (b.form.scale, b.form.z_loss):
        return f"the two losses are scaled differently ({a.form.scale!r} and {b.form.scale!r})"
    if not same_scale and (a.a * b.b != a.b * b.a or a.a * b.c != a.c * b.a or a.a * b.z != a.z * b.a):
        return "the two losses' coefficients are not proportional"
    return None


def _proportional_mix(a: Call, b: Call, V: int, lam: Fraction) -> Optional[Call]:
    """One call for a.a L(y_a) + b.a L(y_b) (and their smoothing, z and constant terms, in the
    same proportion): lam = a.a / (a.a + b.a), the form of their sum."""
    f = a.form
    try:
        form = LossForm.from_coefficients(a.a + b.a, a.b + b.b, float(a.c + b.c), V, ignore_index=f.ignore_index,
                                          reduction=f.reduction, z_loss=float(a.z + b.z), softcap=f.softcap,
                                          logit_scale=f.logit_scale)
    except ValueError:  # LossForm's "no form has these coefficients"
        return None
    return dataclasses.replace(a, a=a.a + b.a, b=a.b + b.b, c=a.c + b.c, z=a.z + b.z, form=form, words=form,
                               mix=Mix(b.label, b.target, lam))


# ------------------------------------------------------------------------------------------------
# One call
# ------------------------------------------------------------------------------------------------


def _merge_masks(terms: dict) -> dict:
    """k [C] + (-k) [C and c] = k [C and not c]: a term minus its masked copy."""
    changed = True
    while changed:
        changed = False
        for (atom, conds), k in list(terms.items()):
            for c in conds:
                smaller = (atom, conds - {c})
                if terms.get(smaller) == -k and (atom, conds) in terms:
                    rest = simplify((conds - {c}) | {c.negated()})
                    del terms[(atom, conds)], terms[smaller]
                    if rest is not None:
                        terms[(atom, rest)] = terms.get((atom, rest), 0) + k
                    changed = True
                    break
            if changed:
                break
    return {k: v for k, v in terms.items() if v != 0}


def _label_of(terms: dict) -> Optional[LabelV]:
    labels = {atom[1] for atom, _ in terms if atom[0] in ("XG", "WG")}
    if len(labels) > 1:
        raise Reject(two_labels(labels))
    return next(iter(labels), None)


def _columns_at_label(terms: dict, label: Optional[LabelV]) -> dict:
    """x[i, p] on rows where the label is p is x at the label."""
    out: dict = {}
    for (atom, conds), k in terms.items():
        if atom[0] == "XC" and label is not None and label.plain \
                and CondAtom(("ne", label.base, atom[1]), False) in conds:
            atom = ("XG", label)
        out[(atom, conds)] = out.get((atom, conds), 0) + k
    return {k: v for k, v in out.items() if v != 0}


@dataclasses.dataclass
class _Group:
    a: Fraction = Q(0)
    b: Fraction = Q(0)
    cols: dict = dataclasses.field(default_factory=dict)  # p -> coefficient of x[:, p]
    lse: Fraction = Q(0)
    z: Fraction = Q(0)
    c: Fraction = Q(0)
    weight: Optional[Node] = None
    weighted: bool = False


def _read_group(atoms: dict, V: int) -> _Group:
    g = _Group()
    weights = {a[-1] for a in atoms if a[0] in ("WG", "WS")}
    if len(weights) > 1:
        raise Reject("two different class-weight tensors")
    if weights:
        (g.weight,) = weights
        g.weighted = True
    for atom, k in atoms.items():
        kind = atom[0]
        if kind in ("XG", "XS", "XC", "LSE") and g.weighted:
            raise Reject("weighted and unweighted log-prob terms are mixed")
        if kind in ("XG", "WG"):
            g.a -= k
        elif kind in ("XS", "WS"):
            g.b -= k
        elif kind == "XC":
            g.cols[atom[1]] = g.cols.get(atom[1], 0) + k
        elif kind == "LSE":
            g.lse += k
        elif kind == "Z":
            g.z += k
        else:
            g.c += k
    if not g.weighted:
        # lse must enter with the target mass: then the group is sum_j q_j (lse - x_j)
        mass = g.a + g.b * V - sum(g.cols.values(), Q(0))
        if g.lse != mass:
            if g.a == 0 and g.b == 0 and not g.cols:
                if g.lse:
                    raise Reject("logsumexp alone is not a log-prob term (only its square is a z-loss)")
            else:
                raise Reject(f"lse enters with coefficient {float(g.lse)!r} but the target mass is "
                             f"{float(mass)!r}: not log-probs")
    if g.cols and g.b == 0:
        raise Reject(f"the loss reads the log-prob of class {min(g.cols)} alone (not a padding "
                     "column of a smoothed target)")
    return g


def _one(groups: dict, what: str, field_: str):
    found = [(m, g) for m, g in groups.items() if getattr(g, field_)]
    if len(found) > 1:
        raise Reject(f"the {what} terms are masked in {len(found)} different ways")
    return found[0] if found else (None, None)


def _calls(row: RowV, divisor: Optional[Divisor], V: int, key: Logits, per_row: bool) -> list[Call]:
    """The op calls for the terms that share a divisor: one, or two when the z-loss term is
    masked apart from the cross-entropy terms (a mask of padding that is a valid class, next to
    nll_loss's ignore_index -100 that only the label term has): the z term then gets a call of
    its own on its own rows, and each call is exact. Two as well when the target leaves out a
    padding column p but rows labelled p count (the op would weigh their label term by the
    column's weight 0): the label term with the z and constant terms, and the uniform term with
    its padding columns, each on its own rows and with the row's divisor; their sum is the row."""
    try:
        return [_call(row, divisor, V, key, per_row)]
    except _ZMaskedApart:
        z = {t: k for t, k in row.terms if t[0] == ("Z",)}
        rest = {t: k for t, k in row.terms if t[0] != ("Z",)}
        return [_call(RowV(row.key, tuple(rest.items()), row.seeds), divisor, V, key, per_row),
                _call(RowV(row.key, tuple(z.items()), row.seeds), divisor, V, key, per_row)]
    except _PaddingRowsKept as err:
        label, uniform = _label_apart_from_uniform(row)
        try:
            return [_call(label, divisor, V, key, per_row), _call(uniform, divisor, V, key, per_row)]
        except Reject:
            raise err from None


def _label_apart_from_uniform(row: RowV) -> tuple[RowV, RowV]:
    """The row's label term (with its share of lse, the z and constant terms) and its uniform term
    (the sum over classes, the padding columns and the rest of lse), per mask."""
    label_lse: dict = {}  # conds -> the label term's mass, its share of lse there
    for (atom, conds), k in row.terms:
        if atom[0] in ("XG", "WG"):
            label_lse[conds] = label_lse.get(conds, Q(0)) - k
    label, uniform = [], []
    for (atom, conds), k in row.terms:
        if atom[0] == "LSE":
            share = label_lse.get(conds, Q(0))
            label.append(((atom, conds), share))
            uniform.append(((atom, conds), k - share))
        elif atom[0] in ("XS", "WS", "XC"):
            uniform.append(((atom, conds), k))
        else:  # the label's log-prob, z and constants
            label.append(((atom, conds), k))
    return (RowV(row.key, tuple(t for t in label if t[1] != 0), row.seeds),
            RowV(row.key, tuple(t for t in uniform if t[1] != 0), row.seeds))


class _ZMaskedApart(Reject):
    """The z-loss term is masked differently from the cross-entropy terms."""


class _PaddingRowsKept(Reject):
    """The target leaves out a padding column but keeps rows labelled with it."""


def _call(row: RowV, divisor: Optional[Divisor], V: int, key: Logits, per_row: bool) -> Call:
    terms = _merge_masks(dict(row.terms))
    soft = {k: c for k, c in terms.items() if k[0][0] in SOFT_ATOMS}
    if soft:
        return _with_soft(soft, {k: c for k, c in terms.items() if k not in soft}, divisor, V, key, per_row)
    label = _label_of(terms)
    terms = _columns_at_label(terms, label)
    by_mask: dict = {}
    for (atom, conds), k in terms.items():
        by_mask.setdefault(conds, {})[atom] = k
    groups = {m: _read_group(atoms, V) for m, atoms in by_mask.items()}
    m_a, ga = _one(groups, "label", "a")
    m_b, gb = _one(groups, "uniform", "b")
    m_z, gz = _one(groups, "z-loss", "z")
    m_c, gc = _one(groups, "constant", "c")
    if ga is None and gb is None and gz is None:
        raise Reject("no term reads the log-probs")
    rows = m_a if ga is not None else m_b if gb is not None else m_z
    if m_z is not None and m_z != rows:
        raise _ZMaskedApart("the z-loss term is masked differently from the label term")
    if m_c is not None and m_c != rows:
        raise Reject("the constant term is masked differently from the label term" + _dropped_apart(rows, m_c))
    weights = {g.weight for g in groups.values() if g.weighted}
    weight = next(iter(weights), None)
    if len(weights) > 1:
        raise Reject("two different class-weight tensors")
    if weight is not None and any(not g.weighted and (g.a or g.b) for g in groups.values()):
        raise Reject("weighted and unweighted log-prob terms are mixed")
    a = ga.a if ga is not None else Q(0)
    b = gb.b if gb is not None else Q(0)
    z = gz.z if gz is not None else Q(0)
    c = gc.c if gc is not None else Q(0)
    if z < 0:
        raise Reject(f"the z-loss coefficient {float(z)!r} is negative")
    columns = tuple(sorted((p, 1 - k / b) for p, k in (gb.cols.items() if gb is not None else ())))
    if weight is not None and (fake(weight) is None or fake(weight).requires_grad):
        raise Reject(f"the class weight {words(weight)} requires grad (the op does not differentiate it)")
    if columns and weight is not None:
        raise Reject("class weights and a padding column together")
    if label is None and a != 0:
        raise Reject("no term reads the log-prob of the label")
    target = _target(label, rows, V)
    # the op weighs the label term by w[y] too: a padding column p needs rows with label p dropped
    for p, w in columns:
        if w != 1 and a != 0 and not _drops_label(target, label, m_a, p):
            raise _PaddingRowsKept(f"the target leaves out class {p} but keeps rows whose label is {p}")
    uniform = None if gb is None or ga is None or m_b == m_a else m_b
    if uniform is not None and c:
        raise Reject("a KL divergence whose smoothing term is masked apart from its label term")
    reduction, after = _reduction(divisor, per_row, weight, label, rows, uniform, z, c)
    fields = dict(ignore_index=target.ignore, reduction=reduction, z_loss=float(z),
                  softcap=None if key.cap is None else float(key.cap), logit_scale=float(key.scale))
    if a == 0 and b == 0:  # a z-loss term divided apart from the cross-entropy: no target at all
        if c:
            raise Reject("a constant term without log-probs")
        form = LossForm(scale=0.0, **fields)
        return Call(a, b, c, z, None, target, None, None, (), reduction, after, form, form)
    try:
        form = LossForm.from_coefficients(a, b, float(c), V, **fields)
    except ValueError as err:  # the form cannot express these coefficients
        raise Reject(str(err).removeprefix("smoothce: ")) from err
    left_out = sum(1 for _, w in columns if w == 0)
    return Call(a, b, c, z, label, target, uniform, weight, columns, reduction, after, form,
                _in_words(form, a, b, c, V - left_out, fields) if left_out else form)


def _dropped_apart(rows: frozenset, other: frozenset) -> str:
    """What the label term's rows drop that another term's do not, in the user's words, and what
    to change: an ignore_index the label term alone drops (nll_loss's -100) next to a mask."""
    apart = [a for a in rows - other if a.key[0] == "ne" and a.holds]
    shared = [a for a in rows & other if a.key[0] == "ne" and a.holds and a.key[1] is not None]
    if not apart:
        return ""
    a = apart[0]
    hint = f"; pass ignore_index={shared[0].key[2]} (the label the mask drops)" if shared else ""
    return (f": the label term also drops the rows where {words(a.key[1])} == {a.key[2]} (an ignore_index), "
            f"the other term does not{hint}, or mask both terms the same way")


def _with_soft(soft: dict, rest: dict, divisor, V: int, key: Logits, per_row: bool) -> Call:
    """A call with a term against a target given as data, next to label terms (``rest``) or not."""
    reverse, student = _reverse_kl(soft)
    denses = {atom[1] for atom, _ in soft if atom[0] != "PE"}
    if len(denses) > 1:
        raise Reject("the loss reads two target distributions given as tensors; the op takes one")
    (dense,) = denses
    masks = {conds for _, conds in soft}
    if len(masks) > 1:
        raise Reject("the terms against the target distribution are masked in different ways")
    (rows,) = masks
    reads = {atom[2:] for atom, _ in soft if atom[0] == "DS"}
    if student is not None:
        reads = reads or {(None, student)}
    if len(reads) != 1 or student is not None and reads != {(None, student)}:
        raise Reject("the terms against the target distribution read the logits at different temperatures "
                     "or with different class weights")
    ((weight, student),) = reads
    cross = -sum((c for (atom, _), c in soft.items() if atom[0] == "DS"), Q(0))
    entropy = sum((c for (atom, _), c in soft.items() if atom[0] == "DE"), Q(0))
    if entropy not in (0, cross):
        raise Reject("the target's entropy term does not go with its cross-entropy (not a KL divergence)")
    if weight is not None and entropy:
        raise Reject("class weights in a KL divergence against a target given as a tensor")
    if weight is not None and (fake(weight) is None or fake(weight).requires_grad):
        raise Reject(f"the class weight {words(weight)} requires grad (the op does not differentiate it)")
    smoothing = not entropy and student == key.scale
    eps, label_terms = _target_smoothing(rest, rows, weight, cross, V) if smoothing else (Q(0), rest)
    if eps:
        cross = cross / (1 - eps)  # the term's scale: (1 - eps) of it went to the target
    soft_form = SoftTargetForm(target_kind=dense.kind, target_logit_scale=float(dense.logits.scale),
                               soft_logit_scale=float(student / key.scale), soft_label_smoothing=float(eps),
                               soft_scale=float(cross), soft_kl=bool(entropy), reverse_kl=float(reverse))
    reduction, after = _soft_reduction(divisor, per_row, rows)
    part = SoftPart(dense, weight, rows, soft_form, reduction, after)
    if not label_terms:
        form = LossForm(scale=0.0, ignore_index=None, reduction=reduction,
                        softcap=None if key.cap is None else float(key.cap), logit_scale=float(key.scale))
        return Call(Q(0), Q(0), Q(0), Q(0), None, Target(None, None), None, weight, (), reduction, after,
                    form, form, part)
    return _attach(_call(RowV(key, tuple(label_terms.items())), divisor, V, key, per_row), part, divisor)


ENTROPY = ("the log-probs are multiplied by a softmax of the very logits it is computed from (an entropy or a "
           "self-distillation term, not a cross-entropy against a target)")


def _reverse_kl(soft: dict) -> tuple:
    """(the coefficient of KL(p || q), the student's scale or None) of the terms weighted by the
    student's probabilities p: sum_j p_j log p_j (PE) and minus the same of sum_j p_j log q_j
    (PQ), q a teacher's softmax, at one temperature of the student."""
    pe = sum((c for (atom, _), c in soft.items() if atom[0] == "PE"), Q(0))
    pq = sum((c for (atom, _), c in soft.items() if atom[0] == "PQ"), Q(0))
    if pe == 0 and pq == 0:
        return Q(0), None
    if pq == 0:
        raise Reject(ENTROPY)
    if pe != -pq:
        raise Reject("the student's probabilities weigh its log-probs and the teacher's differently (not a "
                     "reverse KL divergence)")
    scales = {atom[-1] for (atom, _), _ in soft.items() if atom[0] in ("PE", "PQ")}
    if len(scales) > 1:
        raise Reject("the reverse KL reads the student's logits at two temperatures")
    return pe, next(iter(scales))


def _target_beside_labels(calls: list, shp: tuple, cd: int) -> list:
    """A label call and a call with only a target term, each reduced by the op itself (Hinton
    distillation: F.cross_entropy's mean next to kl_div's batchmean): one call, whose 'mean'
    divides each part by its own rows. A target term summed over every row of a static count n
    (divided by a constant by hand) is n times its mean."""
    if len(calls) != 2:
        return calls
    soft = [c for c in calls if c.soft is not None]
    if len(soft) != 1 or soft[0].label is not None or soft[0].a or soft[0].b or soft[0].z or soft[0].c:
        return calls
    (target,), (label,) = soft, [c for c in calls if c.soft is None]
    part = target.soft
    rows = math.prod(d for i, d in enumerate(shp) if i != len(shp) + cd)
    if (label.reduction, part.reduction) == ("mean", "sum") and not part.rows and isinstance(rows, int) \
            and part.divisor is None:
        form = dataclasses.replace(part.form, soft_scale=part.form.soft_scale * rows)
        part = dataclasses.replace(part, form=form, reduction="mean")
    if label.divisor is not None or part.divisor is not None or label.reduction != part.reduction:
        return calls
    try:
        return [_attach(label, part, None)]
    except Reject:  # not one call: two
        return calls


def _target_smoothing(rest: dict, rows: frozenset, weight, cross, V: int) -> tuple:
    """(eps, the label terms left) when the terms next to the target's are F.cross_entropy's
    smoothing of it, (1 - eps) q + eps / V: a uniform term on the target's rows and no label term."""
    if not rest or any(atom[0] in ("XG", "WG") for atom, _ in rest):
        return Q(0), rest
    if any(conds != rows for _, conds in rest):
        return Q(0), rest
    atoms = {atom: c for (atom, _), c in rest.items()}
    if weight is not None:
        b = -atoms.get(("WS", weight), Q(0))
        fits = set(atoms) == {("WS", weight)}
    else:
        b = -atoms.get(("XS",), Q(0))
        fits = set(atoms) == {("XS",), ("LSE",)} and atoms[("LSE",)] == b * V
    if not fits or b <= 0 or cross <= 0:
        return Q(0), rest
    return b * V / (cross + b * V), {}


def _attach(call: Call, part: SoftPart, divisor) -> Call:
    """A label call and a target term that share a divisor, as one call."""
    if call.soft is not None or call.uniform_rows is not None or call.columns or call.mix is not None:
        raise Reject("a term against a target given as a tensor next to label terms masked apart, "
                     "with padding columns or mixed by lam")
    if call.weight is not part.weight:
        raise Reject("the label terms and the target's term read different class weights")
    if call.z and call.label is None:  # the op counts a z term on the labels' rows: it has none
        raise Reject("a z-loss term next to a target given as a tensor, with no label term to count its rows")
    if call.form.softcap is not None and part.form.soft_logit_scale != 1.0:
        raise Reject("a softcap with the logits at two temperatures")
    reduction, after = call.reduction, call.divisor
    if (reduction, after) != (part.reduction, part.divisor):
        reduction, after = "sum", divisor  # each 'mean' divides by other rows: one division after the sums
    form = dataclasses.replace(call.form, reduction=reduction)
    return dataclasses.replace(call, reduction=reduction, divisor=after, form=form,
                               words=dataclasses.replace(call.words, reduction=reduction),
                               soft=dataclasses.replace(part, reduction=reduction, divisor=after))


def _soft_reduction(divisor, per_row, rows: frozenset) -> tuple[str, Optional[Divisor]]:
    """The op's reduction of a target term counted on ``rows``, and the divisor left after it:
    its 'mean' divides by the number of rows it counts (probability-target cross-entropy's rule)."""
    if per_row:
        return "none", None
    if divisor is None:
        return "sum", None
    if divisor.key == ("count", rows) or divisor.key == ("rows",) and not rows:
        return "mean", None
    return "sum", divisor


def _own_means(pairs: list, V: int) -> Optional[Call]:
    """One call for a label term under PyTorch's mean and a uniform term averaged over its own
    rows: the op's 'mean' with uniform_rows divides each by its own rows. None when the two calls
    are not that."""
    if len(pairs) != 2:
        return None
    (_, label), (divisor, uniform) = pairs
    if label.a == 0 or label.b != 0 or label.c != 0 or label.reduction != "mean" or label.divisor is not None:
        return None
    if uniform.a != 0 or uniform.b == 0 or uniform.c != 0 or uniform.z != 0 or uniform.columns:
        return None
    if uniform.weight is not label.weight or divisor is None:
        return None
    rows = uniform.target.fold  # the uniform term's own mask (no label reads it)
    kind = divisor.key[0]
    if not (kind == "rows" and not rows or kind == "count" and divisor.key[1] == rows):
        return None
    f = label.form
    try:
        form = LossForm.from_coefficients(label.a, uniform.b, 0.0, V, ignore_index=f.ignore_index, reduction="mean",
                                          z_loss=f.z_loss, softcap=f.softcap, logit_scale=f.logit_scale)
    except ValueError:  # LossForm's "no form has these coefficients"
        return None
    return dataclasses.replace(label, b=uniform.b, uniform_rows=rows, form=form, words=form)


def _in_words(form: LossForm, a, b, c, classes: int, fields: dict) -> LossForm:
    """The form over the classes the target spreads eps over: eps / (V - 2) with a padding column
    left out is eps over the V - 2 classes other than the label."""
    try:
        return LossForm.from_coefficients(a, b, float(c), classes, **fields)
    except ValueError:  # LossForm's "no form has these coefficients"
        return form


def _target(label: Optional[LabelV], mask: frozenset, V: int) -> Target:
    """Which labels the op reads and how the label term's mask folds into them."""
    if label is None:
        return Target(None, None if not mask else -100, mask)
    node = label.base if label.altered <= mask else label.node
    ks = sorted(atom.key[2] for atom in mask
                if atom.key[0] == "ne" and atom.holds and atom.key[1] is node)
    if ks and not label.wrap:
        ignore = -100 if -100 in ks else ks[0]
        rest = frozenset(a for a in mask if not (a.key[0] == "ne" and a.holds and a.key[1] is node
                                                 and a.key[2] == ignore))
        return Target(node, ignore, rest, label.wrap)
    if not mask:
        return Target(node, None, frozenset(), label.wrap)
    return Target(node, -100, mask, label.wrap)


def _drops_label(target: Target, label: LabelV, mask: frozenset, p: int) -> bool:
    return target.node is label.base and (target.ignore == p or CondAtom(("ne", label.base, p)) in mask)


def _reduction(divisor, per_row, weight, label, rows, uniform, z, c) -> tuple[str, Optional[Divisor]]:
    """The op's reduction, and the divisor left to apply after it."""
    if per_row:
        return "none", None
    if divisor is None:
        return "sum", None
    kind = divisor.key[0]
    same_rows = uniform is None
    if kind == "count" and weight is None and divisor.key[1] == rows and same_rows:
        return "mean", None  # PyTorch's mean: divided by the number of kept rows
    if kind == "rows" and weight is None and not rows and same_rows:
        return "mean", None  # no row is dropped: the mean over all rows
    if kind == "wsum" and divisor.key[1:] == (weight, label, rows) and same_rows and z == 0 and c == 0:
        return "mean", None  # divided by the sum of w[y] over kept rows
    return "sum", divisor
