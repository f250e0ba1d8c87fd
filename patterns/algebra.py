"""Symbolic values for the cross-entropy detector: what each graph node computes, as algebra.

The detector does not match spellings. It runs an abstract interpretation over the Dynamo graph in
which every node that touches log-probabilities gets a *symbolic value*, and a loss is rewritten
only when the value reaching a loss output is an instance of the fused op's form

    loss_i = sum_j q_ij (lse_i - x_ij) + c + z lse_i^2,   q_ij = a w[y_i] [j == y_i] + b w_j

restricted to the rows a mask keeps, then reduced. Coefficients are exact rationals
(``fractions.Fraction`` of the graph's Python floats), so "0.9 * nll + 0.1 * smooth" recovers
a = 0.9 and b = 0.1 / V exactly as the user's floats say, with no tolerance anywhere.

Log-probabilities are expanded in the logits, L_ij = x_ij - lse_i, so unweighted rows live in
the basis {x[y] (XG), sum_j x (XS), lse (LSE), lse^2 (Z), 1 (K)}. For instance
-L[y] = lse - x[y] is {XG: -1, LSE: 1}: the hand-written "lse - x.gather(y)" and
"-log_softmax(x).gather(y)" are the same value. A class-weighted term cannot be written in that
basis (its lse coefficient would be a tensor), so w[y] L[y] and sum_j w_j L_j are atoms of their
own (WG, WS).

Values:
    LabelV   integer class indices (a label tensor, possibly relaid out or changed on masked rows)
    CondV    a boolean row mask: a conjunction of atoms such as "y != -100"
    WeightAtV  w[y]: a class-weight vector read at the labels
    ElemV    a per-class tensor (shape of the logits): sum of coef * T * B, T in {1, [j == y],
             w_j, w[y][j == y]}, B in {1, x_ij, lse_i}; target distributions (one_hot, full_like,
             scatter) are ElemVs without logits
    RowV     a per-row tensor: linear combination of row atoms, zero on rows the conds drop
    ScalarV  a full reduction of a RowV: 'sum', 'mean' (over all rows) or 'mean_valid' (PyTorch's
             cross-entropy mean: divided by the sum of w[y] over the rows it keeps)
Anything else is opaque (None).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Optional

import torch.fx

Node = torch.fx.Node
Q = Fraction


class Reject(Exception):
    """The node cannot be described; the message says why in words a user can act on."""


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelV:
    """Class indices equal to ``base`` (up to relayout) except on rows where a cond in ``altered``
    fails: ``altered`` holds cond keys ("the label may differ where this atom is false") or
    ("neg",) for clamp(min=0)."""

    base: Node
    altered: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class CondAtom:
    """One boolean row condition; ``key`` is its meaning, ``node``/``positive`` how to compute it.

    key ("ne", base, k) means "base != k" (foldable into ignore_index); ("node", node, positive)
    is any other boolean tensor (node itself, or its negation when positive is False).
    """

    key: tuple
    node: Optional[Node] = dataclasses.field(compare=False, default=None)
    positive: bool = dataclasses.field(compare=False, default=True)
    # ("ne"|"eq", base, k) when node compares a label with a constant
    info: Optional[tuple] = dataclasses.field(compare=False, default=None)

    @staticmethod
    def make(node: Optional[Node], positive: bool, info: Optional[tuple]) -> "CondAtom":
        if info is not None and (info[0] == "ne") == positive:
            key = ("ne", info[1], info[2])
        else:
            key = ("node", node, positive)
        return CondAtom(key, node, positive, info)

    def flipped(self) -> "CondAtom":
        if self.node is None:
            raise Reject("cannot negate an internal ignore_index condition")
        return CondAtom.make(self.node, not self.positive, self.info)


@dataclasses.dataclass(frozen=True)
class CondV:
    atoms: frozenset  # of CondAtom: the row is kept when all hold

    def invert(self) -> "CondV":
        if len(self.atoms) != 1:
            raise Reject("the negation of a combined mask is not a mask of kept rows")
        (atom,) = self.atoms
        return CondV(frozenset({atom.flipped()}))


@dataclasses.dataclass(frozen=True)
class WeightAtV:
    weight: Node
    label: LabelV


def _clean(d: dict) -> tuple:
    return tuple(sorted(((k, v) for k, v in d.items() if v != 0), key=repr))


@dataclasses.dataclass(frozen=True)
class ElemV:
    """Per-class tensor. key = (x, cd, dtype) when it reads the logits x, None for a target."""

    key: Optional[tuple]
    cd: int  # class dim (non-negative)
    terms: tuple  # ((tpart, base), coef) pairs; tpart: ("U",), ("OH", LabelV), ("UW", w), ("OHW", LabelV, w)
    conds: frozenset = frozenset()
    seeds: frozenset = dataclasses.field(default=frozenset(), compare=False)

    @property
    def tdict(self) -> dict:
        return dict(self.terms)

    def is_logprob(self) -> bool:
        return self.key is not None and not self.conds and self.tdict == {(("U",), "X"): 1, (("U",), "LSE"): -1}


@dataclasses.dataclass(frozen=True)
class RowV:
    """Per-row value sum_k coef_k * [conds_k hold] * atom_k; every term carries its own row mask,
    so "(ce + z lse^2) * mask" and "ce * mask + z lse^2 * mask" are the same value."""

    key: tuple  # (x, cd, dtype)
    terms: tuple  # ((atom, conds), coef) pairs; atoms: ("XG", LabelV), ("XS",), ("LSE",), ("WG", LabelV, w), ("WS", w), ("Z",), ("K",)
    seeds: frozenset = dataclasses.field(default=frozenset(), compare=False)

    @staticmethod
    def make(key, atoms: dict, conds: frozenset = frozenset(), seeds: frozenset = frozenset()) -> "RowV":
        return RowV(key, _clean({(a, conds): c for a, c in dict(atoms).items()}), seeds)

    @property
    def conds(self) -> frozenset:
        """The row mask shared by all terms (Reject when terms are masked differently)."""
        masks = {conds for (_, conds), _ in self.terms}
        if len(masks) > 1:
            raise Reject("the terms are masked differently")
        return next(iter(masks), frozenset())

    @property
    def adict(self) -> dict:
        self.conds  # noqa: B018 - uniform masks, or Reject
        out: dict = {}
        for (atom, _), c in self.terms:
            out[atom] = out.get(atom, 0) + c
        return out

    def with_atoms(self, atoms: dict) -> "RowV":
        return RowV.make(self.key, atoms, self.conds, self.seeds)

    def is_pure_lse(self) -> bool:
        return {t for (t, _), _ in self.terms} == {("LSE",)} and not self.conds


@dataclasses.dataclass(frozen=True)
class ScalarV:
    row: RowV
    kind: Any  # "sum" | "mean" | ("mean_valid", weight node or None) | ("div", count node): sum / count
    rows: Optional[int]  # number of rows reduced (static), for mixing 'mean' and 'sum'
    seeds: frozenset = dataclasses.field(default=frozenset(), compare=False)


@dataclasses.dataclass(frozen=True)
class DivisorV:
    """factor * node for a one-element tensor node (a token count): what sums get divided by."""

    node: Node
    factor: Fraction


@dataclasses.dataclass(frozen=True)
class ColV:
    """A per-class vector: a per-class value already reduced over its rows, e.g.
    ``(t * lp).mean(0)``. Summing it over the classes gives ``scalar``."""

    scalar: ScalarV
    classes: int

    @property
    def seeds(self):
        return self.scalar.seeds


CARRYING = (RowV, ScalarV, ColV)


def carries_logits(v) -> bool:
    return isinstance(v, CARRYING) or (isinstance(v, ElemV) and v.key is not None)


# ------------------------------------------------------------------------------------------------
# Linear algebra on values
# ------------------------------------------------------------------------------------------------


def scale(v, c: Fraction):
    if isinstance(v, RowV):
        return dataclasses.replace(v, terms=_clean({a: k * c for a, k in v.terms}))
    if isinstance(v, ElemV):
        return dataclasses.replace(v, terms=_clean({t: k * c for t, k in v.terms}))
    if isinstance(v, ScalarV):
        return dataclasses.replace(v, row=scale(v.row, c))
    if isinstance(v, ColV):
        return dataclasses.replace(v, scalar=scale(v.scalar, c))
    raise Reject("only losses scale")


def _merge(d1: dict, d2: dict, s: Fraction) -> dict:
    out = dict(d1)
    for k, v in d2.items():
        out[k] = out.get(k, 0) + s * v
    return out


def add(v1, v2, s: Fraction = Q(1)):
    """v1 + s * v2 for two values of the same kind."""
    if type(v1) is not type(v2):
        raise Reject(f"cannot add a {type(v1).__name__} and a {type(v2).__name__}")
    if isinstance(v1, RowV):
        if v1.key != v2.key:
            raise Reject("the terms read different logits")
        return RowV(v1.key, _clean(_merge(dict(v1.terms), dict(v2.terms), s)), v1.seeds | v2.seeds)
    if isinstance(v1, ElemV):
        if v1.cd != v2.cd:
            raise Reject("the terms have different class dims")
        if v1.conds != v2.conds:
            raise Reject("the terms are masked differently")
        if v1.key is not None and v2.key is not None and v1.key != v2.key:
            raise Reject("the terms read different logits")
        key = v1.key if v1.key is not None else v2.key
        return ElemV(key, v1.cd, _clean(_merge(v1.tdict, v2.tdict, s)), v1.conds, v1.seeds | v2.seeds)
    if isinstance(v1, ScalarV):
        k1, k2, r1, r2 = v1.kind, v2.kind, v1.row, v2.row
        if k1 != k2:
            # mean = sum / rows when the row count is a static number
            if not {k1, k2} <= {"sum", "mean"} or v1.rows is None or v2.rows is None:
                raise Reject(f"cannot add a {k1} and a {k2} reduction")
            if k1 == "mean":
                r1 = scale(r1, Q(1, v1.rows))
            if k2 == "mean":
                r2 = scale(r2, Q(1, v2.rows))
            k1 = "sum"
        rows = v1.rows if v1.rows == v2.rows else None
        return ScalarV(add(r1, r2, s), k1, rows, v1.seeds | v2.seeds)
    if isinstance(v1, ColV):
        return ColV(add(v1.scalar, v2.scalar, s), v1.classes)
    raise Reject(f"cannot add {type(v1).__name__}s")


def with_conds(v, conds: frozenset):
    if isinstance(v, RowV):
        out: dict = {}
        for (atom, c0), coef in v.terms:
            k = (atom, c0 | conds)
            out[k] = out.get(k, 0) + coef
        return dataclasses.replace(v, terms=_clean(out))
    return dataclasses.replace(v, conds=v.conds | conds)


def _tpart_mul(t1: tuple, t2: tuple) -> tuple:
    """Product of two class-indicator parts (one of them unweighted)."""
    if t1 == ("U",):
        return t2
    if t2 == ("U",):
        return t1
    if t1[0] in ("UW", "OHW") and t2[0] in ("UW", "OHW"):
        raise Reject("class weights applied twice")
    if t1[0] == "OH" and t2[0] == "OH":
        if t1[1] != t2[1]:
            raise Reject("two different label indicators multiplied")
        return t1
    oh, uw = (t1, t2) if t1[0] in ("OH", "OHW") else (t2, t1)
    if oh[0] == "OHW" and uw[0] == "OH":
        if oh[1] != uw[1]:
            raise Reject("two different label indicators multiplied")
        return oh
    if oh[0] == "OH" and uw[0] == "UW":
        return ("OHW", oh[1], uw[1])
    raise Reject("unsupported product of class indicators")


def elem_mul(e1: ElemV, e2: ElemV) -> ElemV:
    if e1.cd != e2.cd:
        raise Reject(f"the factors have classes along dims {e1.cd} and {e2.cd}")
    if e1.key is not None and e2.key is not None:
        raise Reject("a product of two log-prob tensors is not linear in the log-probs")
    out: dict = {}
    for (tp1, b1), c1 in e1.terms:
        for (tp2, b2), c2 in e2.terms:
            if b1 != "K" and b2 != "K":
                raise Reject("a product of two logit terms is not linear in the logits")
            base = b1 if b2 == "K" else b2
            t = (_tpart_mul(tp1, tp2), base)
            out[t] = out.get(t, 0) + c1 * c2
    return ElemV(e1.key if e1.key is not None else e2.key, e1.cd, _clean(out), e1.conds | e2.conds,
                 e1.seeds | e2.seeds)


def elem_times_weight(e: ElemV, w: Node) -> ElemV:
    out = {}
    for (tp, base), c in e.terms:
        out[(_tpart_mul(tp, ("UW", w)), base)] = c
    return dataclasses.replace(e, terms=_clean(out))


def elem_class_sum(e: ElemV, V: int) -> RowV:
    """sum_j E_ij over the class dim, as a row value."""
    assert e.key is not None
    row: dict = {}
    pending: dict = {}  # weighted parts: tpart -> {base: coef}; need X and LSE paired into L

    def put(atom, c):
        row[atom] = row.get(atom, 0) + c

    for (tp, base), c in e.terms:
        kind = tp[0]
        if kind in ("UW", "OHW"):
            pending.setdefault(tp, {})[base] = c
            continue
        one_hot = kind == "OH"
        if base == "X":
            put(("XG", tp[1]) if one_hot else ("XS",), c)
        elif base == "LSE":
            put(("LSE",), c if one_hot else c * V)
        else:
            put(("K",), c if one_hot else c * V)
    for tp, bases in pending.items():
        cx = bases.get("X", 0)
        if bases.get("LSE", 0) != -cx or bases.get("K", 0) != 0:
            raise Reject("class weights multiply something other than the log-probs")
        put(("WS", tp[1]) if tp[0] == "UW" else ("WG", tp[1], tp[2]), cx)
    return RowV.make(e.key, row, e.conds, e.seeds)


def elem_gather(e: ElemV, label: LabelV) -> RowV:
    """E_{i, y_i}: the class-dim gather of a per-class value at the labels."""
    row: dict = {}
    for (tp, base), c in e.terms:
        if tp != ("U",):
            raise Reject("gather of a value that is not plain log-probs")
        atom = {"X": ("XG", label), "LSE": ("LSE",), "K": ("K",)}[base]
        row[atom] = row.get(atom, 0) + c
    return RowV.make(e.key, row, e.conds, e.seeds)


def row_times_weight_at(r: RowV, wy: WeightAtV) -> RowV:
    """w[y] * (c * L[y]) -> c * (w[y] L[y]); nothing else can carry a per-row class weight."""
    d = r.adict
    xg = [a for a in d if a[0] == "XG"]
    if len(xg) != 1 or set(d) != {xg[0], ("LSE",)} or d[("LSE",)] != -d[xg[0]]:
        raise Reject("w[y] multiplies something other than the log-prob of the label")
    if xg[0][1] != wy.label:
        raise Reject("w[y] is read at different labels than the log-probs")
    return r.with_atoms({("WG", wy.label, wy.weight): d[xg[0]]})


def row_times_row(r1: RowV, r2: RowV) -> RowV:
    if r1.is_pure_lse() and r2.is_pure_lse() and r1.key == r2.key:
        return r1.with_atoms({("Z",): r1.adict[("LSE",)] * r2.adict[("LSE",)]})
    raise Reject("a product of two per-row losses is not linear in the log-probs")
