"""Symbolic values for the cross-entropy detector: what a graph node computes, as algebra.

The detector does not match spellings. ``interpret`` gives every node that touches the logits a
value from this module, and a loss is rewritten when the value reaching its output is an instance
of the fused op's form (``normal_form``)

    loss_i = sum_j q_ij (lse_i - x_ij) + c + z lse_i^2,   q_ij = a w[y_i] [j == y_i] + b w_j

term by term restricted to rows a mask keeps, then reduced. Coefficients are exact rationals
(``fractions.Fraction`` of the graph's Python floats), so "0.9 * nll + 0.1 * smooth" recovers
a = 0.9 and b = 0.1 / V exactly as the user's floats say, with no tolerance anywhere.

Logits. ``Logits`` names the tensor a loss reads: a source node seen through slices and views,
with upcasts, a positive constant factor (a temperature) and a softcap cap * tanh(x / cap) as part
of its identity rather than new tensors: ``x.float() / 2`` and ``x`` are the same logits at scale
1/2, so the op reads x itself.

Per-class values (``ElemV``) are sums of  coef * [conds] * T_ij * B_ij  with
    T in  U = 1,  OH(y) = [j == y_i],  COL(p) = [j == p],  W(w) = w_j,  OHW(y, w) = w[y_i] [j == y_i],
          D(q, w) = w_j q_ij  (a target distribution given as data, ``Dense``; w None: no class weights)
    B in  X = x_ij (the logits),  LSE = lse_i,  K = 1,  LOGQ(q) = log q_ij (a teacher's log-probs).
Log-probs are X - LSE; a target distribution built from the labels has B = K only (no logits).

Per-row values (``RowV``) are sums of  coef * [conds] * atom_i  with atoms
    XG(y) = x[i, y_i],  XC(p) = x[i, p],  XS = sum_j x_ij,  LSE = lse_i,  Z = lse_i^2,  K = 1,
    WG(y, w) = w[y_i] (x[i, y_i] - lse_i),  WS(w) = sum_j w_j (x_ij - lse_i),
    DS(q, w, s) = sum_j w_j q_ij (s x_ij - lse(s x)_i),  DE(q) = sum_j q_ij log q_ij  (0 log 0 = 0).
-L[y] = lse - x[y] is {XG: -1, LSE: 1}: "lse - x.gather(y)" and "-log_softmax(x).gather(y)" are
one value. A class-weighted term cannot be written in the unweighted atoms (its lse coefficient
would be a tensor), hence WG and WS; a target given as data weighs the log-probs the same way
(its mass per row is data too, and PyTorch does not renormalise it), hence DS, and DE is the
entropy a KL divergence against it adds. DS carries the scale s at which it reads the logits:
Hinton distillation adds a cross-entropy on the logits to a KL divergence on the logits / T, and
the sum of a value with such terms only and one at another scale of the same logits is one value.

Every term carries its own row mask (``conds``: a conjunction of ``CondAtom``), so a target term
masked by ignore_index next to an unmasked uniform term is one value, and "(ce + z lse^2) * mask"
equals "ce * mask + z lse^2 * mask".

A reduced loss (``ScalarV``) is a sum of parts  sum_i row_i / divisor, one per divisor: terms
divided by equal divisors (the same count, even when computed twice) add up; others stay apart.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Optional

import torch.fx

from smoothce.patterns.nodes import words

Node = torch.fx.Node
Q = Fraction


class Reject(Exception):
    """A node or loss that the algebra cannot describe; the message says why in a user's words."""


class NotCrossEntropy(Reject):
    """A loss built on the cross-entropy but not one (focal, poly: the label's log-prob goes
    through exp or a power): it is left as written, also the cross-entropy inside it."""


TWO_LABELS = ("the loss reads two label tensors (a mixup target, lam * one_hot(y1) + (1 - lam) * one_hot(y2)?); "
              "the fused op takes one label per row")


def two_labels(labels) -> str:
    """Why one op call cannot take these label reads: two label tensors (a mixup), or one label
    tensor read two ways (take_along_dim reads y mod V, gather and nll_loss read y, where and clamp
    change some rows), which only agree on the rows where every label is a class."""
    bases = {lab.base for lab in labels}
    if len(bases) > 1:
        return TWO_LABELS
    ways = sorted({_read_as(lab) for lab in labels})
    return (f"the loss reads the labels {words(next(iter(bases)))} in {len(ways)} ways ({'; '.join(ways)}); the op "
            "takes one label per row: read them one way (gather or nll_loss for every term, or take_along_dim "
            "for every term, each with the same where or clamp)")


def _read_as(lab) -> str:
    if lab.wrap == "mod":
        return "mod the class count, as take_along_dim reads them"
    if lab.wrap == "neg":
        return "with -1 the last class, as advanced indexing reads them"
    if lab.altered:
        return "changed on some rows (where, masked_fill or clamp)"
    return "as they are"


def _field(default=None):
    return dataclasses.field(default=default, compare=False)


# ------------------------------------------------------------------------------------------------
# Identities: logits, labels, row conditions
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Logits:
    """The logits a loss reads: cap * tanh(scale * x / cap) (or scale * x without a cap) of
    x = ``source`` seen through ``layout`` (slices and views, replayed on the source), in
    ``dtype`` (None: the source's own dtype; float64 when the user's code upcasts to it).
    ``cd`` is the class dim counted from the end (-1: last), None until an operation fixes it."""

    source: Node
    layout: tuple = ()
    cd: Optional[int] = None
    scale: Fraction = Q(1)
    cap: Optional[Fraction] = None
    dtype: Any = None


@dataclasses.dataclass(frozen=True)
class CondAtom:
    """One boolean condition on rows, kept where it is ``holds``.

    key ('ne', labels, k): labels != k;  ('lt', labels, k): labels < k;
        ('inrange', labels, V): 0 <= labels < V;  ('node', structure key): a boolean tensor,
        computed by ``node``.
    """

    key: tuple
    holds: bool = True
    node: Optional[Node] = _field()

    def negated(self) -> "CondAtom":
        return CondAtom(self.key, not self.holds, self.node)

    @property
    def label(self) -> Optional[Node]:
        """The label tensor a label comparison reads."""
        return self.key[1] if self.key[0] in ("ne", "lt", "inrange") else None


def lam_atom(node: Node, holds: bool = True) -> CondAtom:
    """A factor that multiplies a term, kept in its ``conds`` like a row mask: mixup's lam (a
    float tensor, one number or one per row), or 1 - lam where it does not hold. Everything linear
    carries it as it carries a mask (a term minus its lam-weighted copy is its (1 - lam)-weighted
    one); ``normal_form`` takes it out again, before any condition is read as a mask."""
    return CondAtom(("lam", node), holds, node)


def is_lam(atom: CondAtom) -> bool:
    return atom.key[0] == "lam"


def lams(conds: frozenset) -> frozenset:
    """The lam factors among a term's conditions."""
    return frozenset(a for a in conds if is_lam(a))


def _one_lam(c1: frozenset, c2: frozenset) -> None:
    """Two factors' conditions meet: lam may come from one of them only (lam * lam and
    lam * (1 - lam) are no terms of the form)."""
    if lams(c1) and lams(c2):
        raise Reject("a product of two terms weighted by a tensor (lam * lam) is not linear in the log-probs")


def with_lam(v, atom: CondAtom):
    """v times a lam factor (``lam_atom``): every term weighted by it."""
    if isinstance(v, ScalarV):
        return dataclasses.replace(v, parts=tuple((d, with_lam(r, atom)) for d, r in v.parts))
    if isinstance(v, (RowV, ElemV)):
        if any(lams(k[-1]) for k, _ in v.terms):
            raise Reject("a loss is weighted by a tensor twice (lam * lam)")
        return dataclasses.replace(v, terms=_clean({(*k[:-1], k[-1] | {atom}): c for k, c in v.terms}))
    raise Reject(f"cannot weigh {_kind(v)} by a tensor")


def _atom_verdict(atom: CondAtom, base: Node, k: int) -> Optional[bool]:
    """The atom's truth on rows where ``base == k`` (None: it does not read base)."""
    if atom.label is not base:
        return None
    kind = atom.key[0]
    value = k != atom.key[2] if kind == "ne" else k < atom.key[2] if kind == "lt" else 0 <= k < atom.key[2]
    return value == atom.holds


def simplify(conds: frozenset) -> Optional[frozenset]:
    """An equivalent conjunction, or None when no row can satisfy it."""
    for atom in conds:
        if atom.negated() in conds:
            return None
    out = set(conds)
    # labels == k decides every other comparison on the same labels
    equal = [a for a in conds if a.key[0] == "ne" and not a.holds]
    for eq in equal:
        base, k = eq.key[1], eq.key[2]
        for other in list(out):
            if other is eq or other not in out:
                continue
            verdict = _atom_verdict(other, base, k)
            if verdict is False:
                return None
            if verdict is True:
                out.discard(other)
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class CondV:
    """A boolean row mask: the rows where every atom holds."""

    atoms: frozenset

    def invert(self) -> "CondV":
        if len(self.atoms) != 1:
            raise Reject("the negation of a combined mask is not a mask of kept rows")
        (atom,) = self.atoms
        return CondV(frozenset({atom.negated()}))


@dataclasses.dataclass(frozen=True)
class LabelV:
    """Class indices: equal to ``base`` (up to views) on the rows where every atom of ``altered``
    holds (where / masked_fill changed the others). ``wrap``: how the reading op maps them to a
    class, None for as they are, "neg" as advanced indexing reads them (-1 is the last class),
    "mod" as take_along_dim does (y mod V, so none is out of range). ``node`` is the tensor the
    user's code reads."""

    base: Node
    altered: frozenset = frozenset()
    wrap: Optional[str] = None
    node: Optional[Node] = _field()

    @property
    def plain(self) -> bool:
        return not self.altered and not self.wrap


@dataclasses.dataclass(frozen=True)
class WeightAtV:
    """w[y]: a class-weight vector read at the labels."""

    weight: Node
    label: LabelV


@dataclasses.dataclass(frozen=True)
class ArangeV:
    """torch.arange(n) along dim ``axis`` (from the end) of its tensor, the same along the others
    (arange(n)[None, :], .view(1, -1), .expand(m, n)): row positions for advanced indexing, or
    class positions for a one-hot."""

    n: Any
    axis: int = -1


@dataclasses.dataclass(frozen=True)
class Dense:
    """A target distribution given as data, one per row: q is the tensor itself (``kind``
    "probs": F.cross_entropy's float target, timm's mixup target), its exp ("log_probs":
    kl_div's log_target), or the softmax of a teacher's logits ("logits": q = softmax(scale * t),
    taken by the op and never stored). ``logits`` names the tensor as :class:`Logits` does (a
    scale only for "logits")."""

    kind: str
    logits: "Logits"


@dataclasses.dataclass(frozen=True)
class Divisor:
    """What a reduced loss is divided by.

    ('count', conds): the number of rows where conds hold;  ('wsum', w, label, conds): the sum
    of w[label] over them (PyTorch's weighted mean);  ('rows',): the number of rows;  ('expr',
    structure key): any other tensor or size, held by ``node``.
    """

    key: tuple
    node: Optional[Node] = _field()


@dataclasses.dataclass(frozen=True)
class DivisorV:
    """factor * divisor: the value of a node that counts rows (mask.sum(), a token count)."""

    divisor: Divisor
    factor: Fraction = Q(1)


# ------------------------------------------------------------------------------------------------
# Values that carry the logits
# ------------------------------------------------------------------------------------------------


def _clean(d: dict) -> tuple:
    return tuple(sorted(((k, v) for k, v in d.items() if v != 0), key=repr))


U = ("U",)


@dataclasses.dataclass(frozen=True)
class ElemV:
    """A per-class tensor. ``key``: the logits it is linear in (None: a target built from labels
    and constants). ``cd``: class dim from the end (None: a target that has not met its logits)."""

    key: Optional[Logits]
    cd: Optional[int]
    terms: tuple  # ((part, base, conds), coef)
    seeds: frozenset = _field(frozenset())

    @property
    def tdict(self) -> dict:
        return dict(self.terms)

    def is_pure_logits(self) -> bool:
        return self.key is not None and self.tdict == {(U, "X", frozenset()): 1}

    def is_logprob(self) -> bool:
        return self.key is not None and self.tdict == {(U, "X", frozenset()): 1, (U, "LSE", frozenset()): -1}


def pure_logits(key: Logits, seeds=frozenset()) -> ElemV:
    return ElemV(key, key.cd, (((U, "X", frozenset()), Q(1)),), seeds)


def log_probs(key: Logits, seeds=frozenset()) -> ElemV:
    return ElemV(key, key.cd, tuple({(U, "X", frozenset()): Q(1), (U, "LSE", frozenset()): Q(-1)}.items()), seeds)


def constant(c: Fraction, cd: Optional[int] = None) -> ElemV:
    """A per-class constant (torch.full, ones_like, ...) that is not tied to logits."""
    return ElemV(None, cd, (((U, "K", frozenset()), c),) if c else ())


def dense_target(q: Dense, cd: Optional[int] = None) -> ElemV:
    """q_ij, a target distribution given as data (no logits of the loss in it)."""
    return ElemV(None, cd, (((("D", q, None), "K", frozenset()), Q(1)),))


def target_log_probs(lp: ElemV) -> ElemV:
    """A teacher's log-probs log q_ij as a term of a loss on other logits: no logits of the loss
    in it, only the target's log (base ("LOGQ", q)), which a product with q makes its entropy."""
    q = Dense("logits", lp.key)
    return ElemV(None, lp.cd, (((U, ("LOGQ", q), frozenset()), Q(1)),))


@dataclasses.dataclass(frozen=True)
class SoftmaxV:
    """softmax of logits: only its log is understood. It does not count as a loss value: the
    probabilities are often read for metrics, and that leaves a loss on log(softmax) intact."""

    logits: Logits
    seeds: frozenset = _field(frozenset())


@dataclasses.dataclass(frozen=True)
class RowV:
    """A per-row value: sum_k coef_k [conds_k] atom_k (see the module docstring)."""

    key: Logits
    terms: tuple  # ((atom, conds), coef)
    seeds: frozenset = _field(frozenset())

    @staticmethod
    def make(key: Logits, atoms: dict, conds: frozenset = frozenset(), seeds=frozenset()) -> "RowV":
        return RowV(key, _clean({(a, conds): c for a, c in atoms.items()}), seeds)

    @property
    def tdict(self) -> dict:
        return dict(self.terms)

    def lse_only(self) -> Optional[Fraction]:
        """c when the value is c * lse on every row, else None."""
        d = self.tdict
        if len(d) == 1:
            ((atom, conds), c), = d.items()
            if atom == ("LSE",) and not conds:
                return c
        return None


@dataclasses.dataclass(frozen=True)
class ScalarV:
    """A reduced loss: sum over parts of (sum_i row_i) / divisor (None: no divisor)."""

    key: Logits
    parts: tuple  # ((Optional[Divisor], RowV), ...)
    seeds: frozenset = _field(frozenset())

    @staticmethod
    def of(row: RowV, divisor: Optional[Divisor] = None) -> "ScalarV":
        return ScalarV(row.key, ((divisor, row),), row.seeds)


@dataclasses.dataclass(frozen=True)
class ColV:
    """A per-class vector already reduced over its rows, e.g. ``(t * lp).mean(0)``; summing it
    over the classes gives ``scalar``."""

    scalar: ScalarV
    classes: int

    @property
    def seeds(self):
        return self.scalar.seeds

    @property
    def key(self):
        return self.scalar.key


CARRYING = (RowV, ScalarV, ColV)


def carries_logits(v) -> bool:
    """Whether a value is computed from the logits (its node belongs to some loss's cone)."""
    return isinstance(v, CARRYING) or (isinstance(v, ElemV) and v.key is not None)


def seeds_of(v) -> frozenset:
    return getattr(v, "seeds", frozenset()) or frozenset()


# ------------------------------------------------------------------------------------------------
# Linear algebra on values
# ------------------------------------------------------------------------------------------------


def _scaled_terms(terms: tuple, c: Fraction) -> tuple:
    return _clean({k: v * c for k, v in terms})


def scale(v, c: Fraction):
    """c * v."""
    if isinstance(v, (RowV, ElemV)):
        return dataclasses.replace(v, terms=_scaled_terms(v.terms, c))
    if isinstance(v, ScalarV):
        return dataclasses.replace(v, parts=tuple((d, scale(r, c)) for d, r in v.parts))
    if isinstance(v, ColV):
        return dataclasses.replace(v, scalar=scale(v.scalar, c))
    raise Reject("only losses scale")


def _merge(d1: dict, d2: dict, s: Fraction) -> dict:
    out = dict(d1)
    for k, v in d2.items():
        out[k] = out.get(k, 0) + s * v
    return out


def _same_key(k1, k2):
    if k1 is not None and k2 is not None and k1 != k2:
        raise Reject("the terms read different logits")
    return k1 if k1 is not None else k2


SOFT_ATOMS = ("DS", "DE", "PE", "PQ")


def _only_soft(v) -> bool:
    """Whether every term of a per-row or reduced loss reads the logits through a target given as
    data (its atoms carry their own scale of the logits)."""
    rows = [v] if isinstance(v, RowV) else [r for _, r in v.parts]
    return all(atom[0] in SOFT_ATOMS for r in rows for (atom, _), _ in r.terms)


def _sum_key(v1, v2):
    """The logits of v1 + v2: the same ones, or the same at another scale when one side reads
    them only through terms that carry their scale (no softcap: it does not commute with a scale)."""
    k1, k2 = v1.key, v2.key
    if k1 is not None and k2 is not None and k1 != k2 and k1.cap is None and k2.cap is None \
            and dataclasses.replace(k1, scale=Q(1)) == dataclasses.replace(k2, scale=Q(1)):
        if _only_soft(v2):
            return k1
        if _only_soft(v1):
            return k2
    return _same_key(k1, k2)


def add(v1, v2, s: Fraction = Q(1)):
    """v1 + s * v2 for two values of the same kind."""
    if type(v1) is not type(v2):
        raise Reject(f"cannot add {_kind(v1)} and {_kind(v2)}")
    seeds = v1.seeds | v2.seeds
    if isinstance(v1, RowV):
        return RowV(_sum_key(v1, v2), _clean(_merge(v1.tdict, v2.tdict, s)), seeds)
    if isinstance(v1, ElemV):
        key = _same_key(v1.key, v2.key)
        if v1.cd is not None and v2.cd is not None and v1.cd != v2.cd:
            raise Reject(f"the terms have classes along different dims ({v1.cd} and {v2.cd} from the end)")
        cd = v1.cd if v1.cd is not None else v2.cd
        return ElemV(key, cd, _clean(_merge(v1.tdict, v2.tdict, s)), seeds)
    if isinstance(v1, ScalarV):
        key = _sum_key(v1, v2)
        parts = dict(v1.parts)
        for d, r in v2.parts:
            r = scale(r, s)
            parts[d] = add(parts[d], r) if d in parts else r
        return ScalarV(key, tuple(parts.items()), seeds)
    if isinstance(v1, ColV):
        if v1.classes != v2.classes:
            raise Reject("per-class vectors of different lengths")
        return ColV(add(v1.scalar, v2.scalar, s), v1.classes)
    raise Reject(f"cannot add {_kind(v1)}s")


def with_conds(v, conds: frozenset):
    """v restricted to the rows where conds hold (zero elsewhere)."""
    if isinstance(v, (RowV, ElemV)):
        out: dict = {}
        for k, coef in v.terms:
            c = simplify(k[-1] | conds)
            if c is None:
                continue
            nk = (*k[:-1], c)
            out[nk] = out.get(nk, 0) + coef
        return dataclasses.replace(v, terms=_clean(out))
    raise Reject(f"cannot mask {_kind(v)}")


def label_equals(label: LabelV, p: int) -> CondAtom:
    """The row condition labels == p (for a one-hot meeting a fixed column)."""
    if not label.plain:
        raise Reject("a fixed class column meets changed labels")
    return CondAtom(("ne", label.base, p), holds=False)


def _part_mul(p1: tuple, p2: tuple):
    """(part, extra conds) of the product of two class parts, or None when it is zero."""
    if p1 == U:
        return p2, frozenset()
    if p2 == U:
        return p1, frozenset()
    if p1[0] > p2[0]:  # order: COL, D, OH, OHW, P, W
        p1, p2 = p2, p1
    kinds = (p1[0], p2[0])
    if "P" in kinds:
        raise Reject("the student's probabilities meet a one-hot, class weights or a target given as a tensor "
                     "(a reverse KL takes none)")
    if "D" in kinds:
        return _dense_mul(p1, p2)
    if kinds == ("COL", "COL"):
        return (p1, frozenset()) if p1 == p2 else None
    if kinds == ("COL", "OH"):
        return p1, frozenset({label_equals(p2[1], p1[1])})
    if kinds == ("OH", "OH"):
        if p1 != p2:
            raise Reject(two_labels((p1[1], p2[1])))
        return p1, frozenset()
    if kinds == ("OH", "W"):
        return ("OHW", p1[1], p2[1]), frozenset()
    if kinds == ("OH", "OHW"):
        if p1[1] != p2[1]:
            raise Reject(two_labels((p1[1], p2[1])))
        return p2, frozenset()
    if "COL" in kinds:
        raise Reject("a class-weighted target meets a fixed class column")
    raise Reject("class weights applied twice")


def _dense_mul(p1: tuple, p2: tuple):
    """A target given as data times a class-weight vector: the weighted target; nothing else."""
    if p1[0] == "D" and p2[0] == "W":
        if p1[2] is not None:
            raise Reject("class weights applied twice")
        return ("D", p1[1], p2[1]), frozenset()
    if p1[0] == p2[0] == "D":
        raise Reject("two target distributions given as tensors are multiplied")
    raise Reject("a target distribution given as a tensor meets a one-hot of the labels or a fixed class "
                 "column; the op takes one or the other per term")


def elem_mul(e1: ElemV, e2: ElemV) -> ElemV:
    """The elementwise product; at most one factor may read the logits (linearity)."""
    if e1.cd is not None and e2.cd is not None and e1.cd != e2.cd:
        raise Reject(f"the factors have classes along different dims ({e1.cd} and {e2.cd} from the end)")
    if e1.key is not None and e2.key is not None:
        raise Reject("a product of two log-prob tensors is not linear in the log-probs")
    out: dict = {}
    for (tp1, b1, c1), k1 in e1.terms:
        for (tp2, b2, c2), k2 in e2.terms:
            _one_lam(c1, c2)
            if b1 != "K" and b2 != "K":
                raise Reject("a product of two logit terms is not linear in the logits")
            prod = _part_mul(tp1, tp2)
            if prod is None:
                continue
            part, extra = prod
            conds = simplify(c1 | c2 | extra)
            if conds is None:
                continue
            t = (part, b1 if b2 == "K" else b2, conds)
            out[t] = out.get(t, 0) + k1 * k2
    cd = e1.cd if e1.cd is not None else e2.cd
    return ElemV(_same_key(e1.key, e2.key), cd, _clean(out), e1.seeds | e2.seeds)


def elem_times_weight(e: ElemV, w: Node) -> ElemV:
    """e * w with a per-class weight vector w broadcast over the rows."""
    out: dict = {}
    for (tp, base, conds), c in e.terms:
        prod = _part_mul(tp, ("W", w))
        if prod is None:
            continue
        part, extra = prod
        k = (part, base, conds | extra)
        out[k] = out.get(k, 0) + c
    return dataclasses.replace(e, terms=_clean(out))


def static_classes(V) -> int:
    """The class count as a number; Reject when it is symbolic (the coefficients depend on it)."""
    if isinstance(V, bool) or not isinstance(V, int):
        raise Reject(f"the class count is dynamic ({V}): the coefficients depend on it; mark it static "
                     "(torch._dynamo.mark_static(logits, -1), or compile without dynamic=True)")
    return V


def elem_class_sum(e: ElemV, V: int) -> RowV:
    """sum_j E_ij over the class dim, as a per-row value."""
    assert e.key is not None
    V = static_classes(V)
    row: dict = {}
    weighted: dict = {}  # (part, conds) -> {base: coef}: X and LSE must pair into log-probs

    def put(atom, conds, c):
        row[(atom, conds)] = row.get((atom, conds), 0) + c

    for (tp, base, conds), c in e.terms:
        kind = tp[0]
        if kind in ("W", "OHW", "D", "P"):
            weighted.setdefault((tp, conds), {})[base] = c
            continue
        if isinstance(base, tuple):  # a target's log-probs summed without the target
            raise Reject("a target's log-probs are summed unweighted (not a KL divergence)")
        if base == "X":
            atom = {"U": ("XS",), "OH": ("XG", tp[-1]), "COL": ("XC", tp[-1])}[kind]
            put(atom, conds, c)
        else:
            put(("LSE",) if base == "LSE" else ("K",), conds, c * V if kind == "U" else c)
    for (tp, conds), bases in weighted.items():
        if tp[0] == "P":
            for atom, c in _student_probs_sum(bases, e.key.scale).items():
                put(atom, conds, c)
            continue
        entropy = bases.pop(("LOGQ", tp[1]), 0) if tp[0] == "D" and tp[2] is None else 0
        if entropy:
            put(("DE", tp[1]), conds, entropy)
        if any(isinstance(base, tuple) for base in bases):
            raise Reject("a target's log-probs are weighted by another distribution than their own")
        if not bases:
            continue
        cx = bases.get("X", 0)
        if bases.get("LSE", 0) != -cx or bases.get("K", 0) != 0:
            if tp[0] == "D":
                raise Reject("a target distribution given as a tensor multiplies something other than the "
                             "log-probs")
            raise Reject("class weights multiply something other than the log-probs")
        if tp[0] == "D":  # the student's scale goes with the term: a loss may read the logits at two
            atom = ("DS", tp[1], tp[2], e.key.scale)
        else:
            atom = ("WS", tp[1]) if tp[0] == "W" else ("WG", tp[1], tp[2])
        put(atom, conds, cx)
    return RowV(e.key, _clean(row), e.seeds)


def _student_probs_sum(bases: dict, scale: Fraction) -> dict:
    """sum_j p_j B_j for the student's probabilities p (part P) at ``scale``: its log-probs give
    PE (sum_j p_j log p_j), a teacher's log-probs PQ (sum_j p_j log q_j); nothing else."""
    out = {}
    for base, c in bases.items():
        if isinstance(base, tuple):
            out[("PQ", base[1], scale)] = c
    cx = bases.get("X", 0)
    if bases.get("LSE", 0) != -cx or bases.get("K", 0):
        raise Reject("the student's probabilities multiply something other than log-probs")
    if cx:
        out[("PE", scale)] = cx
    return out


def student_probs(p: "SoftmaxV", lp: ElemV) -> ElemV:
    """p_j times log-probs, for the student's probabilities p = softmax(scale x) (a reverse KL's
    weights): of the same logits (p log p, base X - LSE, and p log q of a teacher's log-probs
    subtracted from them: base LOGQ), or a teacher's (p log q)."""
    part = ("P",)
    if lp.key == p.logits:  # its log-probs, a teacher's log-probs beside them (log p - log q) or not
        terms = {(part, base, conds): c for (_, base, conds), c in lp.terms}
    else:
        terms = {(part, ("LOGQ", Dense("logits", lp.key)), frozenset()): Q(1)}
    return ElemV(p.logits, p.logits.cd, tuple(terms.items()), p.seeds | lp.seeds)


def elem_gather(e: ElemV, label: LabelV) -> RowV:
    """E_{i, y_i}: the class-dim gather of a per-class value at the labels."""
    row: dict = {}
    for (tp, base, conds), c in e.terms:
        if isinstance(base, tuple):
            raise Reject("a target's log-probs are read at the labels")
        if tp == U or (tp[0] == "OH" and tp[1] == label):
            atom = {"X": ("XG", label), "LSE": ("LSE",), "K": ("K",)}[base]
        elif tp[0] == "COL":
            conds = simplify(conds | {label_equals(label, tp[1])})
            if conds is None:
                continue
            atom = {"X": ("XG", label), "LSE": ("LSE",), "K": ("K",)}[base]
        elif tp[0] == "D":
            raise Reject("a target distribution given as a tensor is read at the labels")
        else:
            raise Reject("a gather of a weighted or differently labelled value")
        row[(atom, conds)] = row.get((atom, conds), 0) + c
    return RowV(e.key, _clean(row), e.seeds)


def elem_column(e: ElemV, p: int) -> RowV:
    """E_{i, p}: one fixed class column of a per-class value."""
    row: dict = {}
    for (tp, base, conds), c in e.terms:
        if isinstance(base, tuple):
            raise Reject("a class column of a target's log-probs")
        if tp[0] == "OH":
            conds = simplify(conds | {label_equals(tp[1], p)})
            if conds is None:
                continue
        elif tp[0] == "COL":
            if tp[1] != p:
                continue
        elif tp != U:
            raise Reject("a class column of a weighted value or of a target given as a tensor")
        atom = {"X": ("XC", p), "LSE": ("LSE",), "K": ("K",)}[base]
        row[(atom, conds)] = row.get((atom, conds), 0) + c
    return RowV(e.key, _clean(row), e.seeds)


def _groups(r: RowV) -> dict:
    """conds -> {atom: coef}."""
    out: dict = {}
    for (atom, conds), c in r.terms:
        out.setdefault(conds, {})[atom] = c
    return out


def row_times_weight_at(r: RowV, wy: WeightAtV) -> RowV:
    """w[y] * (c * L[y]) -> c * (w[y] L[y]); nothing else can carry a per-row class weight."""
    row: dict = {}
    for conds, d in _groups(r).items():
        xg = [a for a in d if a[0] == "XG"]
        if len(xg) != 1 or set(d) != {xg[0], ("LSE",)} or d[("LSE",)] != -d[xg[0]]:
            raise Reject("w[y] multiplies something other than the log-prob of the label")
        if xg[0][1] != wy.label:
            raise Reject("w[y] is read at different labels than the log-probs")
        row[(("WG", wy.label, wy.weight), conds)] = d[xg[0]]
    return RowV(r.key, _clean(row), r.seeds)


def row_times_row(r1: RowV, r2: RowV) -> RowV:
    """lse * lse (z-loss); any other product of per-row losses is not linear in the log-probs."""
    if r1.key == r2.key:
        g1, g2 = _groups(r1), _groups(r2)
        if all(set(d) == {("LSE",)} for d in (*g1.values(), *g2.values())):
            row: dict = {}
            for c1, d1 in g1.items():
                for c2, d2 in g2.items():
                    _one_lam(c1, c2)
                    conds = simplify(c1 | c2)
                    if conds is not None:
                        k = (("Z",), conds)
                        row[k] = row.get(k, 0) + d1[("LSE",)] * d2[("LSE",)]
            return RowV(r1.key, _clean(row), r1.seeds | r2.seeds)
    raise Reject("a product of two per-row losses is not linear in the log-probs")


def divide(v: ScalarV, d: DivisorV) -> ScalarV:
    """A reduced loss divided by a count (times a constant)."""
    if d.factor == 0:
        raise Reject("a loss divided by zero")
    parts = []
    for div, row in v.parts:
        if div is not None:
            raise Reject(f"a loss already divided by a count is divided by another ({_divisor_words(d.divisor)})")
        parts.append((d.divisor, scale(row, 1 / d.factor)))
    return dataclasses.replace(v, parts=tuple(parts))


def _divisor_words(d: Divisor) -> str:
    if d.node is not None:
        return words(d.node)
    return {"count": "a count of rows", "wsum": "a sum of class weights"}.get(d.key[0], "the number of rows")


_KIND = {RowV: "a per-row loss", ScalarV: "a reduced loss", ColV: "a per-class vector", LabelV: "labels",
         CondV: "a mask", WeightAtV: "w[y]", DivisorV: "a count", SoftmaxV: "softmax probabilities", ArangeV: "torch.arange"}


def _kind(v) -> str:
    if isinstance(v, ElemV):
        if v.key is None:
            return "a target distribution"
        return "logits" if v.is_pure_logits() else "log-probs"
    if isinstance(v, Fraction):
        return repr(float(v))
    return _KIND.get(type(v), type(v).__name__)


def kind(v) -> str:
    """Words for a value in a near-miss reason ('log-probs', 'a per-row loss', ...)."""
    return _kind(v)
