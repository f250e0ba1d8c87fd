"""Which losses in a graph can be rewritten, and why the others cannot (read-only).

After the abstract interpretation (:mod:`interpret`), every *sink* is a candidate: a node whose
value is computed from the logits (log-probs, a per-row or a reduced loss) and that is read by
something the algebra does not describe (another op, the graph output). A sink becomes a
``Plan`` when

  1. its value is an instance of the op's form (:func:`normal_form.normal_form`);
  2. every node of its *cone* (the logit-derived values it is computed from) is read only by
     nodes that die with the sink, so after the rewrite no log-prob tensor stays alive;
  3. nothing it reads is changed in place, and its cone runs under one grad mode;
  4. the eager code would accept its labels' dtype (int32 labels make F.nll_loss raise: the
     rewrite must not make them work).

A sink that is not an instance hands the question down to its own logit-derived inputs, so
"ce + unrelated_term" still rewrites ce. Candidates that were close get one near miss each.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

from smoothce.kernels.inputs import class_split, dtensor_reason, is_dtensor
from smoothce.patterns.algebra import (
    ArangeV, ElemV, LabelV, Logits, NotCrossEntropy, Reject, RowV, ScalarV, carries_logits, kind, seeds_of,
)
from smoothce.patterns.collectives import hand_written_vocab_parallel
from smoothce.patterns.interpret import Interpretation
from smoothce.patterns.nodes import (
    describe, dtype, fake, location, mutations, reads_metadata_only, reads_shape_only, shape, subclass,
    target_name, words,
)
from smoothce.patterns.normal_form import Call, Unmixed, normal_form, classes_of
from smoothce.patterns.ops import SEED_OPS, bind, op_name
from smoothce.patterns.report import NearMiss

Node = torch.fx.Node

__all__ = ["Plan", "LabelCheck", "analyze"]


@dataclasses.dataclass(frozen=True)
class LabelCheck:
    """An eager op the rewrite removes raises unless ``low <= label < classes`` or label == ``ignore``
    on every row: the labels it read (``label``), as eager read them."""

    label: LabelV
    low: int  # 0, or -classes for advanced indexing (-1 is the last class)
    ignore: Optional[int]


@dataclasses.dataclass
class Plan:
    """One loss to rewrite: where (``sink``), what it reads and the op calls that compute it."""

    sink: Node
    logits: Logits
    classes: int
    calls: list[Call]
    seeds: frozenset  # the log_softmax / loss calls the loss was built from
    cone: list[Node]  # the logit-derived nodes the loss is computed from (sink first)
    dead: set  # the nodes nothing needs once the sink is replaced
    checks: tuple  # LabelChecks of the removed eager ops
    loss_dtype: Any = None
    builds_target: bool = False  # the loss multiplies log-probs by a target distribution it builds
    group: int = 1  # how many losses share these log-probs (each gets its own op calls)


_GRAD_MODE = {torch._C._set_grad_enabled}


def _grad_modes(graph) -> dict:
    """node -> grad mode it runs under. Dynamo brackets no_grad/enable_grad regions with
    _set_grad_enabled calls and restores the outer mode last, so the last call names the outer
    mode (True when there is none: any single mode is consistent)."""
    switches = [n for n in graph.nodes if n.op == "call_function" and n.target in _GRAD_MODE]
    mode = bool(switches[-1].args[0]) if switches and switches[-1].args else True
    out = {}
    for n in graph.nodes:
        if n in switches and n.args:
            mode = bool(n.args[0])
        out[n] = mode
    return out


def cone(interp: Interpretation, sink: Node) -> list[Node]:
    """Nodes with logit-derived values that the sink's value is computed from (sink first), and
    the in-place ops that changed them."""
    seen, stack, order = {sink}, [sink], []
    while stack:
        n = stack.pop()
        order.append(n)
        for a in [*n.all_input_nodes, *interp.inplace.get(n, ())]:
            if a not in seen and carries_logits(interp.values.get(a)):
                seen.add(a)
                stack.append(a)
    return order


def dead_after(interp: Interpretation, sinks: list) -> set:
    """The nodes that only the sinks need: they can go once the sinks' uses read the op instead.

    In-place ops the interpretation followed die with the tensor they change; side effects and
    in-place ops it did not follow stay, and so do their inputs.
    """
    followed = {m: t for t, ms in interp.inplace.items() for m in ms}
    nodes = list(interp.graph.nodes)
    dead = set(sinks)
    for n in reversed(nodes[:max(nodes.index(s) for s in sinks)]):
        if n in dead or n.op not in ("call_function", "call_method") or n in followed:
            continue
        if n.op == "call_function" and n.is_impure() or n in interp.changed_by.values():
            continue
        # what reads n, or reads the in-place ops on n (they return n itself)
        ops = interp.inplace.get(n, [])
        users = [u for u in n.users if u not in ops] + [v for op in ops for v in op.users if v not in ops]
        # a read of n's size or mesh alone can read it off another tensor (emit moves it)
        values = [u for u in users if not reads_metadata_only(u)]
        if users and all(u in dead for u in values):
            dead.add(n)
            dead.update(ops)
    return dead


# ------------------------------------------------------------------------------------------------
# Exceptions the eager code raises for its labels
# ------------------------------------------------------------------------------------------------


def eager_accepts(op: str, label_dtype: torch.dtype) -> bool:
    """Whether eager PyTorch accepts labels of this dtype in ``op`` (it differs across versions:
    gather takes int32 indices on recent torch only). Asked of eager itself, once per pair; under
    a tracing mode there is no eager answer, and "no" keeps the loss as written."""
    if type(torch.zeros(())) is not torch.Tensor:
        return False
    return _ask_eager(op, label_dtype)


@functools.lru_cache(maxsize=None)
def _ask_eager(op: str, label_dtype: torch.dtype) -> bool:
    """Run op on two numbers: a RuntimeError is eager's answer "no", not an error of the detector."""
    x = torch.zeros(1, 2)
    y = torch.zeros(1, dtype=label_dtype)
    calls = {
        "nll_loss": lambda: F.nll_loss(x, y),
        "gather": lambda: x.gather(1, y[:, None]),
        "take_along_dim": lambda: torch.take_along_dim(x, y[:, None], 1),
        "scatter": lambda: x.scatter(1, y[:, None], 1.0),
        "one_hot": lambda: F.one_hot(y, 2),
        "index": lambda: x[torch.arange(1), y],
        "index_select": lambda: x[0].index_select(0, y),
    }
    try:
        calls[op]()
    except RuntimeError:
        return False
    return True


def _label_reads(interp: Interpretation, node: Node, classes: int):
    """(op kind, the labels it reads, low, ignore) for an eager op that reads labels, else None;
    low None: no label value makes the op raise."""
    op = op_name(node)
    if op is None:
        return None
    first, kw = bind(node, op) if op not in ("setitem",) else (node.args[0], {})
    if op in ("nll_loss", "cross_entropy"):
        lab = interp.label(kw.get("target"))
        if lab is None or isinstance(kw.get("ignore_index"), bool) or not isinstance(kw.get("ignore_index"), int):
            return None
        return "nll_loss", lab, 0, kw["ignore_index"]
    if op in ("gather", "scatter"):
        lab = interp.label(kw.get("index"))
        return (op, lab, 0, None) if lab is not None and _indexes_classes(first, kw.get("dim"), classes) else None
    if op == "take_along_dim":  # it reads labels mod V: only their dtype can make it raise
        lab = interp.label(kw.get("indices"))
        return (op, lab, None, None) if lab is not None else None
    if op == "one_hot":
        lab = interp.label(first)
        return ("one_hot", lab, 0, None) if lab is not None else None
    if op == "index_select":
        lab = interp.label(kw.get("index"))
        return ("index_select", lab, 0, None) if lab is not None and _indexes_classes(first, kw.get("dim"), classes) \
            else None
    if op in ("getitem", "setitem") and len(node.args) >= 2:
        index = node.args[1]
        parts = index if isinstance(index, tuple) else (index,)
        labels = [i for i, p in enumerate(parts) if isinstance(p, Node) and not isinstance(interp.values.get(p), ArangeV)]
        if len(labels) == 1 and all(isinstance(p, Node) for p in parts) and _indexes_classes(first, labels[0], classes):
            lab = interp.label(parts[labels[0]])
            return ("index", lab, -classes, None) if lab is not None else None
    return None


def _indexes_classes(src, dim, classes: int) -> bool:
    """Whether an op's index runs along a dim of ``classes`` entries (unknown: assume it does). An
    index into another dim (the positions a causal mask is built from) is checked by eager against
    that dim's size, not by the op's label check."""
    shp = shape(src) if isinstance(src, Node) else None
    if shp is None or not isinstance(dim, int) or not -len(shp) <= dim < len(shp):
        return True
    return shp[dim] == classes


def label_checks(interp: Interpretation, dead: set, classes: int) -> tuple:
    """The label checks of the eager ops the rewrite removes; Reject when eager would raise for
    the labels' dtype whatever their values."""
    checks = []
    for n in sorted(dead, key=interp.order.__getitem__):  # graph order: the same graph every run
        read = _label_reads(interp, n, classes)
        if read is None:
            continue
        op, lab, low, ignore = read
        label_dtype = dtype(lab.node) if lab.node is not None else dtype(lab.base)
        if label_dtype is not None and not eager_accepts(op, label_dtype):
            raise Reject(f"the labels {words(lab.node if lab.node is not None else lab.base)} are "
                         f"{str(label_dtype).removeprefix('torch.')}, which {target_name(n)} at "
                         f"{location(n)} rejects: eager raises, so the loss is left to it")
        if low is not None:
            checks.append(LabelCheck(lab, low, ignore))
    return tuple(dict.fromkeys(checks))


# ------------------------------------------------------------------------------------------------
# The analysis
# ------------------------------------------------------------------------------------------------


def _reads(plan: Plan) -> list:
    """The tensors the op calls read at the sink."""
    key = plan.logits
    out = [key.source, *key.layout]
    for call in plan.calls:
        atoms = [*(a for t in call.targets for a in t.fold), *(call.uniform_rows or ())]
        out += [*(t.node for t in call.targets), call.weight,
                *(a.label if a.label is not None else a.node for a in atoms)]
        if call.mix is not None:
            out.append(call.mix.lam)
        if call.divisor is not None:
            out.append(call.divisor.node)
    out += [c.label.node for c in plan.checks]
    return [r for r in out if isinstance(r, Node)]


def _role(plan: Plan, node: Node) -> str:
    """What a tensor the op reads is to the loss, in a reason's words."""
    if node is plan.logits.source or node in plan.logits.layout:
        return "the logits"
    if any(node is t.node for c in plan.calls for t in c.targets):
        return "the labels"
    if any(c.mix is not None and node is c.mix.lam for c in plan.calls):
        return "mixup's lam"
    if any(node is c.weight for c in plan.calls):
        return "the class weights"
    return words(node)


def subclass_reason(plan: Plan) -> Optional[str]:
    """Why the op cannot read the plan's tensors: one is a tensor subclass it has no rule for (its
    fake value runs the subclass's own code, which knows nothing of smoothce's ops). DTensor logits
    sharded on the classes are the op's own, with replicated labels and masks and replicated or
    likewise sharded class weights (kernels/vocab_parallel.py)."""
    logits = fake(plan.logits.source)
    mesh_dim = None
    if is_dtensor(logits):
        mesh_dim, why = class_split(logits, logits.dim() + plan.logits.cd)
        if mesh_dim is None:
            return why + ": the loss is left to PyTorch"
    for node in _reads(plan):
        name = subclass(node)
        if name is None or mesh_dim is not None and (node is plan.logits.source or node in plan.logits.layout):
            continue
        if mesh_dim is not None and is_dtensor(fake(node)):
            why = dtensor_reason(fake(node), _role(plan, node), logits, mesh_dim)
            if why is None:
                continue
            return why + ": the loss is left to PyTorch"
        return (f"{_role(plan, node)} ({words(node)}) are a {name}, a tensor subclass smoothce's op has no "
                "rule for: the loss is left to PyTorch")
    return None


def _seeds(value) -> frozenset:
    """The log_softmax / loss calls a value was built from."""
    seeds = seeds_of(value)
    if isinstance(value, ScalarV):
        seeds = seeds | frozenset().union(*(r.seeds for _, r in value.parts))
    return seeds


def _first_seed(value, node, order):
    seeds = _seeds(value)
    return min(seeds, key=order.__getitem__) if seeds else node


def _computed_from_another(interp: Interpretation, sink: Node, cones: dict) -> bool:
    """Whether the sink's loss is arithmetic on another sink's loss alone (r.sum() / n of a per-row
    loss r that is also read elsewhere): rewriting that one leaves this one as written."""
    for inner in cones:
        if inner is sink or inner not in cones[sink]:
            continue
        rest = set(cones[sink]) - set(cones[inner])
        if all(a in rest or a is inner for n in rest for a in n.all_input_nodes
               if carries_logits(interp.values.get(a))):
            return True
    return False


def _groups(candidates: list, cones: dict) -> list:
    """Candidates whose cones share nodes (two terms of one loss split by a graph break, a loss and
    its nll returned for logging): they are rewritten together or not at all."""
    cones = [set(cones[c[0]]) for c in candidates]
    parent = list(range(len(candidates)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(candidates)):
        for j in range(i):
            if cones[i] & cones[j]:
                parent[root(i)] = root(j)
    groups: dict = {}
    for i, c in enumerate(candidates):
        groups.setdefault(root(i), []).append(c)
    return list(groups.values())


def _group_plans(interp, group: list, cones: dict, modes, mutated, miss, read_by) -> list:
    """The plans of a group of candidates, or none (with near misses) when one cannot be rewritten."""
    values = interp.values
    sinks = [c[0] for c in group]
    dead = dead_after(interp, sinks)
    inside = set().union(*(cones[s] for s in sinks))
    followed = {m for ms in interp.inplace.values() for m in ms}
    plans = []
    for node, value, key, calls, seed in group:
        nodes = cones[node]
        # the op runs at the sink, under the sink's grad mode: log-probs computed under another
        # grad mode (no_grad around them only) would get gradients they did not have
        other = next((n for n in nodes if modes[n] != modes[node]), None)
        if other is not None:
            on = {True: "enabled", False: "disabled"}
            miss(seed, node, f"the grad mode changes inside the loss ({target_name(other)} at {location(other)} "
                             f"runs with grad {on[modes[other]]}, the loss with grad {on[modes[node]]})")
            return []
        outside = next(((n, u) for n in nodes if n not in sinks for u in n.users
                        if u not in dead and u not in inside and not reads_shape_only(u)), None)
        if outside is not None:
            n, u = outside
            own = None if isinstance(interp.rejected.get(u), NotCrossEntropy) else interp.why.get(u)
            miss(seed, node, own or read_by(n, u), where=u)
            return []
        try:
            classes = classes_of(key)
            # the eager label reads that go with this sink: those before it (another sink of the
            # group covers the later ones)
            before = {n for n in dead if interp.order[n] <= interp.order[node] and (n in nodes or n not in inside)}
            checks = label_checks(interp, before, classes)
        except Reject as err:
            miss(seed, node, str(err))
            return []
        builds = any(isinstance(values.get(n), ElemV) and values[n].key is None
                     and any(part[0] == "OH" for (part, _, _), _ in values[n].terms) for n in dead)
        plan = Plan(node, key, classes, calls, _seeds(value), nodes, dead, checks, dtype(node), builds, len(group))
        why = subclass_reason(plan)
        if why is not None:
            miss(seed, node, why)
            return []
        # the op runs at the sink: an in-place change of what it reads would be seen differently
        changed = [(r, m) for r in _reads(plan) for m in mutated.get(r, ()) if m not in followed]
        if changed:
            r, m = changed[0]
            miss(seed, node, f"{words(r)} is changed in place by {describe(m)}", where=m)
            return []
        plans.append(plan)
    return plans


def analyze(gm: torch.fx.GraphModule) -> tuple[list[Plan], list[NearMiss], Interpretation]:
    """Plans for the losses that can be rewritten, near misses for the rest. Changes nothing."""
    interp = Interpretation(gm.graph)
    values = interp.values
    mutated = mutations(gm.graph)
    modes = _grad_modes(gm.graph)
    order = interp.order
    candidates: list = []  # (sink, value, logits, calls, seed) of the sinks that are losses
    misses: dict[tuple, tuple] = {}

    def miss(seed: Node, at: Node, reason: str, where: Optional[Node] = None, at_sink: bool = True) -> None:
        # rank: what stopped a loss output beats an opaque reader on the way; among loss outputs
        # the latest (the largest expression) wins, among readers the earliest. ``where`` is the
        # line the reason is about (the reader that stopped it), ``at`` the sink or reader.
        rank = (1, order[at]) if at_sink else (0, -order[at])
        where = where if where is not None and where.op != "output" else at
        if (seed, reason) not in misses or rank > misses[(seed, reason)][0]:
            misses[(seed, reason)] = (rank, NearMiss(seed.name, location(where), reason))

    def read_by(n: Node, u: Node) -> str:
        if u.op == "output":
            return f"{kind(values[n])} ({describe(n)}) also returned from the graph"
        return f"{kind(values[n])} also read at {location(u)} ({target_name(u)})"

    # Sinks: logit-derived values read by something the algebra does not describe (zeros_like(t)
    # reads only t's shape: it has a value). A sink that is not an instance of the form hands the
    # question down to its own logit-derived inputs.
    # A size read (sym_size of x[keep]) is no reader: the rewrite moves it onto the logits' source.
    work = [n for n in gm.graph.nodes if carries_logits(values.get(n))
            and any(values.get(u) is None and not reads_shape_only(u) for u in n.users)]
    queued = set(work)
    handed_down: set = set()
    while work:
        node = work.pop(0)
        value = values[node]
        seed = _first_seed(value, node, order)
        has_seed = bool(_seeds(value))
        reader = next((u for u in node.users if values.get(u) is None and not reads_shape_only(u)), None)
        focal = next((u for u in node.users if isinstance(interp.rejected.get(u), NotCrossEntropy)), None)
        reader = focal or reader
        try:
            if focal is not None:
                raise interp.rejected[focal]
            key, calls = normal_form(value)
        except Reject as err:
            if has_seed and node not in handed_down and reader is not None and not isinstance(err, Unmixed):
                # a loss says why it is not one; log-probs say who else reads them
                loss_like = isinstance(value, (RowV, ScalarV)) and focal is None
                reason = str(err) if loss_like else interp.why.get(reader) or read_by(node, reader)
                miss(seed, node, reason, where=reader)
            if focal is None:
                for a in node.all_input_nodes:
                    if carries_logits(values.get(a)) and a not in queued:
                        queued.add(a)
                        handed_down.add(a)
                        work.append(a)
            continue
        candidates.append((node, value, key, calls, seed))
    cones = {c[0]: cone(interp, c[0]) for c in candidates}
    candidates = [c for c in candidates if not _computed_from_another(interp, c[0], cones)]
    plans = []
    for group in _groups(candidates, cones):
        plans += _group_plans(interp, group, cones, modes, mutated, miss, read_by)
    # a node that reads log-probs feeds an op the algebra rejected, with no sink downstream
    for node, reason in interp.why.items():
        if op_name(node) in SEED_OPS and not any(carries_logits(values.get(a)) for a in node.all_input_nodes):
            miss(node, node, reason, at_sink=False)
        for a in node.all_input_nodes:
            v = values.get(a)
            if carries_logits(v) and (seeds_of(v) or isinstance(v, ScalarV)):
                miss(_first_seed(v, a, order), node, reason, at_sink=False)
    # One reason per candidate (see miss() for which). Candidates a plan rewrote have none, but a
    # loss built from them that is not one itself: nothing outside a plan reads its log-probs, so
    # that loss holds the plan's result, and the rest of it stays as written beside the op.
    done = {s for p in plans for s in p.seeds}
    best: dict = {}
    for (s, _), (rank, m) in misses.items():
        if s in done:
            if not rank[0]:
                continue
            m = NearMiss(m.node, m.location, f"rewritten in part, the rest left as written: {m.reason}")
        if s not in best or rank > best[s][0]:
            best[s] = (rank, m)
    ranked = [m for _, m in sorted(best.values(), key=lambda t: t[0])]
    return plans, ranked + hand_written_vocab_parallel(gm.graph), interp
