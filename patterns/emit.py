"""Emission: replace a planned loss by smoothce op calls at its sink.

The op reads the logits' source (the views and slices of ``Logits.layout`` replayed on it, so
upcast bf16 logits stay bf16) or, with a fused head, the head's input with the same views. Each
``Call`` gets its labels with the label term's mask folded in (``where(keep, labels, ignore)``),
the uniform term's own mask as ``uniform_rows``, class weights (the user's, or one built for a
target's padding column) and its divisor afterwards. The result is cast to the dtype the user's
loss had.

Exceptions: the rewrite removes eager ops that raise for invalid labels (gather, nll_loss,
one_hot, advanced indexing). The op raises on CPU for a label outside [0, V) that is not its
ignore_index, so the labels it reads are invalid exactly where an eager op's were: rows whose
labels an eager op rejects get a sentinel outside [0, V), unless the op's own check is provably
the same (it reads those very labels with the same ignore_index). take_along_dim rejects no label
value: it reads y mod V, and so does the op.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx

from smoothce.patterns.algebra import CondAtom, Dense, Reject
from smoothce.patterns.analysis import LabelCheck, Plan
from smoothce.patterns.head import Head, find_teacher_head
from smoothce.patterns.nodes import dtype, fake, reads_mesh_only, reads_shape_only, shape
from smoothce.patterns.normal_form import Call, Target, logits_shape
from smoothce.patterns.ops import op_name

Node = torch.fx.Node

__all__ = ["emit"]


def _ops():
    # imported on first use: tracing a graph never needs triton
    from smoothce.kernels.cross_entropy import fused_cross_entropy
    from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy

    return fused_cross_entropy, fused_linear_cross_entropy


def _soft_ops():
    from smoothce.kernels.linear_soft_cross_entropy import fused_linear_soft_cross_entropy
    from smoothce.kernels.soft_cross_entropy import fused_soft_cross_entropy

    return fused_soft_cross_entropy, fused_linear_soft_cross_entropy


class _Builder:
    """Creates nodes before the sink, with fake values for the passes that come after."""

    def __init__(self, graph: torch.fx.Graph, sink: Node, fake_mode):
        self.graph, self.sink, self.fake_mode, self.added = graph, sink, fake_mode, []

    def __call__(self, kind: str, target, *args, **kwargs) -> Node:
        n = self.graph.create_node(kind, target, tuple(args), kwargs)
        self.added.append(n)  # before its fake value, which may raise: a rollback erases it too
        n.meta["stack_trace"] = self.sink.meta.get("stack_trace")
        if self.fake_mode is not None:
            def to_fake(a):
                return a.meta.get("example_value", a.meta.get("val")) if isinstance(a, Node) else a

            fargs = torch.fx.node.map_arg(n.args, to_fake)
            fkwargs = torch.fx.node.map_arg(n.kwargs, to_fake)
            with self.fake_mode:
                n.meta["example_value"] = (getattr(fargs[0], target)(*fargs[1:], **fkwargs)
                                           if kind == "call_method" else target(*fargs, **fkwargs))
        return n

    def method(self, name, *args, **kwargs) -> Node:
        return self("call_method", name, *args, **kwargs)

    def fn(self, target, *args, **kwargs) -> Node:
        return self("call_function", target, *args, **kwargs)


def emit(gm: torch.fx.GraphModule, plan: Plan, head: Optional[Head], fake_mode) -> list[Node]:
    """Insert the op calls for a plan before its sink and send the sink's uses to them.
    Returns the nodes added; when anything raises (a Reject, or an op that fails on the fake
    inputs) the graph is left as it was and the exception goes on."""
    b = _Builder(gm.graph, plan.sink, fake_mode)
    try:
        with gm.graph.inserting_before(plan.sink):
            out = _emit(plan, head, b)
        _move_shape_reads(plan, head, b)
    except Exception:
        for n in reversed(b.added):
            gm.graph.erase_node(n)
        raise
    plan.sink.replace_all_uses_with(out)
    return b.added


def _move_shape_reads(plan: Plan, head: Optional[Head], b: _Builder) -> None:
    """Nodes that read only the size of a node the rewrite removes (the sym_size Dynamo binds the
    row count of lp[keep] with) read it off that node's logits instead: the same views replayed
    on the logits' source (x[keep]), placed before the first of them. Reads of a DTensor's
    device mesh read the mesh of a DTensor that stays: the head's weight, or the logits' source."""
    key = plan.logits
    order = {n: i for i, n in enumerate(b.graph.nodes)}
    added = set(b.added)
    moves = []
    for n in sorted((n for n in plan.dead if n in order), key=order.__getitem__):  # (another plan's may be gone)
        if added.intersection(n.users):  # the op reads it too (x[keep] as it is): it stays
            continue
        for u in [u for u in n.users if reads_mesh_only(u)]:
            u.replace_input_with(n, key.source if head is None else head.weight)
        readers = sorted((u for u in n.users if reads_shape_only(u)), key=order.__getitem__)
        if not readers:
            continue
        if n not in key.layout or head is not None:
            raise Reject(f"the size of {n.name} is read elsewhere, and the rewrite would remove it")
        moves.append((n, readers))
    for n, readers in moves:
        with b.graph.inserting_before(readers[0]):
            same = _replay(key.layout[:key.layout.index(n) + 1], key.source, b)
        for u in readers:
            u.replace_input_with(n, same)


def _replay(layout: tuple, x: Node, b: _Builder, last=None) -> Node:
    """The views and slices of the logits, on x (with ``last`` as the size of the last dim)."""
    for n in layout:
        op = op_name(n)
        if op == "reshape":  # reshape, not view: a slice before it may be non-contiguous
            sizes = list(n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:])
            if last is not None and sizes[-1] != -1:
                sizes[-1] = last
            x = b.method("reshape", x, *sizes)
        elif op == "getitem":
            x = b.fn(operator.getitem, x, n.args[1])
        else:
            x = b(n.op, n.target, x, *n.args[1:], **n.kwargs)
    return x


def _emit(plan: Plan, head: Optional[Head], b: _Builder) -> Node:
    key, V = plan.logits, plan.classes
    shp = logits_shape(key)
    flatten = key.cd == -1 and len(shp) != 2
    row_dims = [i for i in range(len(shp)) if i != len(shp) + key.cd]
    rows = tuple(shp[i] for i in row_dims)
    if head is not None and key.cd != -1 and not all(isinstance(d, int) for d in rows[1:]):
        raise Reject(f"the rows {rows} have symbolic sizes past the first")
    fused_ce, fused_linear_ce = _ops()
    if head is not None:
        D = shape(head.weight)[1]
        # autocast's casts: the head computes in its output's dtype
        h_in, w_in, b_in = (_as(t, head.compute_dtype, b) for t in (head.hidden, head.weight, head.bias))
        x = _replay(key.layout, h_in, b, last=D)
    else:
        x = _replay(key.layout, key.source, b)
        if key.dtype is not None:
            x = b.method("to", x, key.dtype)
    x_rows = x

    def size(k):  # the k-th row dim's size, a symbolic one (dynamic B and T) read off the logits
        return rows[k] if isinstance(rows[k], int) else b.method("size", x_rows, row_dims[k])

    op_rows = (-1,) if key.cd == -1 else (-1, *map(size, range(1, len(rows))))  # -1 first: valid under dynamic shapes
    if flatten:
        x = b.method("reshape", x, -1, V if head is None else D)
    want = plan.loss_dtype
    # the eager label checks no call's own check covers: the first call maps their rows
    checks = [c for c in plan.checks if not any(_implied(c, t, V) for call in plan.calls for t in call.targets)]
    outs = []
    for i, call in enumerate(plan.calls):
        own_checks = checks if i == 0 else ()
        # a term against a target given as data alone reads no labels: none are made up for it
        labelled = call.soft is None or call.target.node is not None or own_checks
        t = _target(call.target, plan, rows, op_rows, x, b, checks=own_checks,
                    placeholder=_unpadded_class(call.columns, V)) if labelled else None
        kwargs = call.form.describe()  # the form in the user's words; defaults left out
        if call.uniform_rows is not None:
            kwargs["uniform_rows"] = _mask(call.uniform_rows, t, op_rows, V, b)
        if want is not None and want != dtype(x):
            kwargs["loss_dtype"] = want  # the dtype the user's loss had: bf16 logits upcast by the user
        weight = call.weight if call.weight is not None else _column_weights(call.columns, V, x, b)
        if call.soft is not None:
            soft = call.soft
            if soft.rows or t is not None:  # with labels the op would count the target's rows by them
                kwargs["target_rows"] = _mask(soft.rows, t, op_rows, V, b)
            kwargs.update(soft.form.describe(), scale=call.form.scale)
            fused_soft, fused_linear_soft = _soft_ops()
            if head is None:
                loss = b.fn(fused_soft, x, _dense(soft.dense, b, V, flatten), t, weight, **kwargs)
            else:
                teacher = find_teacher_head(soft.dense, V, plan.dead)
                q = _dense(soft.dense, b, V, flatten) if teacher is None else None
                if teacher is not None:
                    kwargs.update(_teacher_head(teacher, soft.dense.logits.layout, flatten, b))
                loss = b.fn(fused_linear_soft, x, w_in, b_in, q, t, weight, **kwargs)
        elif call.mix is not None:
            kwargs["labels_b"] = _target(call.mix.target, plan, rows, op_rows, x, b, checks=())
            kwargs.update(lam=_lam(call.mix.lam, op_rows, b), scale=call.form.scale)  # the op's label scale is 0 unless given
            fused_soft, fused_linear_soft = _soft_ops()
            loss = (b.fn(fused_soft, x, None, t, weight, **kwargs) if head is None
                    else b.fn(fused_linear_soft, x, w_in, b_in, None, t, weight, **kwargs))
        elif head is not None:
            loss = b.fn(fused_linear_ce, x, w_in, b_in, t, weight, **kwargs)
        else:
            loss = b.fn(fused_ce, x, t, weight, **kwargs)
        if call.reduction == "none" and shape(plan.sink) != shape(loss):
            loss = b.method("reshape", loss, *_sizes(shape(plan.sink), rows, size, b.graph))
        if call.divisor is not None:
            loss = b.fn(operator.truediv, loss, _divisor(call, t, op_rows, V, b, kwargs.get("target_rows")))
        outs.append(loss)
    total = outs[0]
    for o in outs[1:]:
        total = b.fn(operator.add, total, o)
    if want is not None and dtype(total) != want:
        total = b.method("to", total, want)
    return total


def _sizes(out: tuple, rows: tuple, size, graph: torch.fx.Graph) -> tuple:
    """The sizes to reshape the op's per-row loss to ``out``: each size, a symbolic one (dynamic B
    and T) as a node that holds it (the logits' size of that row dim, ``size(k)``, or the graph
    input Dynamo passes it as), and -1 for the first or the one that no node holds."""
    if not out:
        return ((),)  # a 0-dim loss: reshape(())
    inputs = {}
    for n in graph.find_nodes(op="placeholder"):
        v = n.meta.get("example_value", n.meta.get("val"))
        if isinstance(v, torch.SymInt):
            inputs.setdefault(str(v), n)
    row_of = {str(d): k for k, d in enumerate(rows)}
    sizes = [d if isinstance(d, int) else size(row_of[str(d)]) if str(d) in row_of else inputs.get(str(d))
             for d in out]
    unknown = [i for i, d in enumerate(sizes) if d is None]
    if len(unknown) > 1:
        raise Reject(f"the per-row loss of shape {out} has symbolic sizes that no tensor holds")
    sizes[unknown[0] if unknown else 0] = -1  # the one size reshape infers: valid under dynamic shapes
    return tuple(sizes)


def _dense(q: Dense, b: _Builder, V: int, flatten: bool) -> Node:
    """The target tensor the op reads: the user's, or a teacher's logits (their views replayed,
    their float64 upcast kept; the temperature goes to the op)."""
    t = _replay(q.logits.layout, q.logits.source, b)
    if q.logits.dtype is not None:
        t = b.method("to", t, q.logits.dtype)
    return b.method("reshape", t, -1, V) if flatten else t


def _lam(lam, op_rows, b: _Builder):
    """Mixup's lam as the op takes it: the user's tensor (one per row: in the op's rows) or a number."""
    if not isinstance(lam, Node):
        return float(lam)
    return lam if shape(lam) == () else b.method("reshape", lam, *op_rows)


def _teacher_head(teacher: Head, layout: tuple, flatten: bool, b: _Builder) -> dict:
    """The teacher's head as the fused op takes it: its input with the teacher's logits' views
    replayed, detached like its weight and bias (the teacher's logits had no gradient)."""
    D = shape(teacher.weight)[1]
    h, w, bias = (None if t is None else b.method("detach", t)
                  for t in (_as(t, teacher.compute_dtype, b) for t in (teacher.hidden, teacher.weight, teacher.bias)))
    h = _replay(layout, h, b, last=D)
    if flatten:
        h = b.method("reshape", h, -1, D)
    return dict(teacher_hidden=h, teacher_weight=w, teacher_bias=bias)


def _as(t: Optional[Node], to, b: _Builder) -> Optional[Node]:
    if t is None or dtype(t) == to:
        return t
    return b.method("to", t, to)


def _identity(check: LabelCheck) -> Node:
    lab = check.label
    return lab.base if not lab.altered else lab.node


def _implied(check: LabelCheck, target: Target, classes: int) -> bool:
    """Whether the op's own label check is the eager op's: both read the same labels and reject
    the same values (outside [0, V), apart from an ignore_index that is outside it)."""
    def outside(k):  # the one value outside [0, V) the check lets through, if any
        return None if k is None or 0 <= k < classes else k

    # a wrapped read accepts what its wrap maps into [0, V): y >= -V for "neg", every y for "mod"
    low = {None: 0, "neg": -classes}.get(target.wrap)
    return (_identity(check) is target.node and not target.fold and check.low == low
            and outside(check.ignore) == outside(target.ignore))


def _unpadded_class(columns: tuple, V: int) -> int:
    """A class whose weight is 1 among a target's padding columns ((p, w_p), ...)."""
    padded = {p for p, w in columns if w != 1}
    return next(c for c in range(V) if c not in padded)


def _target(tg: Target, plan: Plan, rows: tuple, op_rows, x: Node, b: _Builder, checks, placeholder: int = 0) -> Node:
    """The labels one call reads (its ignore_index is tg.ignore), in the op's rows ``op_rows``.
    Without a label term they are all ``placeholder``, a class of weight 1: no term reads them,
    but the op's 'mean' divides by their weights' sum, the number of rows."""
    V, cd = plan.classes, plan.logits.cd
    if tg.node is None:
        t = b.fn(torch.zeros_like, b.method("select", x, cd if cd == -1 else len(rows) + 1 + cd, 0),
                 dtype=torch.int64)
        if placeholder:
            t = b.fn(operator.add, t, placeholder)
    else:
        t = tg.node
        if op_rows == (-1,) and len(rows) != 1 or shape(t) != rows:
            t = b.method("reshape", t, *op_rows)
        if dtype(t) not in (torch.int64, torch.int32):
            t = b.method("long", t)  # uint8 labels, which nll_loss takes
    ignore = tg.ignore
    if tg.wrap == "neg":  # advanced indexing: -1 is the last class
        t = b.fn(torch.where, b.fn(operator.lt, t, 0), b.fn(operator.add, t, V), t)
    elif tg.wrap == "mod":  # take_along_dim: y mod V, the sign of V
        t = b.fn(torch.remainder, t, V)
    if tg.fold:
        t = b.fn(torch.where, _mask(tg.fold, t, op_rows, V, b), t, ignore)
    bad = [_invalid(c, op_rows, V, b) for c in checks]
    if bad:
        m = bad[0]
        for other in bad[1:]:
            m = b.fn(operator.or_, m, other)
        sentinel = V if ignore != V else V + 1
        t = b.fn(torch.where, m, sentinel, t)
    return t


def _invalid(check: LabelCheck, op_rows, V: int, b: _Builder) -> Node:
    """Rows whose labels the eager op rejects."""
    L = check.label.node if check.label.node is not None else check.label.base
    L = b.method("reshape", L, *op_rows)
    m = b.fn(operator.or_, b.fn(operator.lt, L, check.low), b.fn(operator.ge, L, V))
    if check.ignore is not None:
        m = b.fn(operator.and_, m, b.fn(operator.ne, L, check.ignore))
    return m


def _atom(atom: CondAtom, op_rows, V: int, b: _Builder) -> Node:
    """A bool tensor of the op's rows where the atom holds."""
    kind = atom.key[0]
    if kind == "node":
        m = atom.node if atom.holds else b.method("logical_not", atom.node)
    else:
        L = atom.key[1]
        if kind == "ne":
            m = b.fn(operator.ne if atom.holds else operator.eq, L, atom.key[2])
        elif kind == "lt":
            m = b.fn(operator.lt if atom.holds else operator.ge, L, atom.key[2])
        else:  # inrange
            m = b.fn(operator.and_, b.fn(operator.ge, L, 0), b.fn(operator.lt, L, atom.key[2]))
            m = m if atom.holds else b.method("logical_not", m)
    if dtype(m) != torch.bool:
        m = b.method("bool", m)
    return b.method("reshape", m, *op_rows)


def _mask(atoms: frozenset, t: Node, op_rows, V: int, b: _Builder) -> Node:
    """The conjunction of atoms as a bool tensor of the op's rows (all rows when empty)."""
    parts = [_atom(a, op_rows, V, b) for a in sorted(atoms, key=repr)]
    if not parts:
        return b.fn(torch.ones_like, t, dtype=torch.bool)
    m = parts[0]
    for p in parts[1:]:
        m = b.fn(operator.and_, m, p)
    return m


def _column_weights(columns: tuple, V: int, x: Node, b: _Builder) -> Optional[Node]:
    """Class weights 1 except at the target's padding columns."""
    if not columns:
        return None
    idx = b.fn(torch.arange, V, device=fake(x).device)
    w = b.method("new_ones", x, (V,), dtype=torch.float32)
    for p, wp in columns:
        w = b.fn(torch.where, b.fn(operator.eq, idx, p), float(wp), w)
    return w


def _divisor(call: Call, t: Optional[Node], op_rows, V: int, b: _Builder, rows_mask: Optional[Node]) -> Node:
    """A node holding what the op's sum is divided by (``t``: the labels the call reads, None for
    a term against a target given as data alone, whose rows are ``rows_mask``)."""
    d = call.divisor
    if d.node is not None:
        return d.node
    kind = d.key[0]
    if kind == "rows":
        return b.method("numel", t if t is not None else rows_mask)
    if kind == "count":
        return b.method("sum", _mask(d.key[1], t, op_rows, V, b))
    if kind == "wsum":  # PyTorch's weighted mean: sum of w[y] over kept rows
        w, lab, conds = d.key[1:]
        keep = _mask(conds, t, op_rows, V, b)
        L = b.method("reshape", lab.node if lab.node is not None else lab.base, *op_rows)
        wy = b.fn(operator.getitem, w, b.fn(torch.where, keep, L, 0))
        return b.method("sum", b.fn(torch.where, keep, wy, 0.0))
    raise Reject(f"no tensor holds the divisor {d.key[0]}")
