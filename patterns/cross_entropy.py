"""Find cross-entropy losses in a Dynamo torch-IR graph and replace each with one fused op call.

``rewrite_cross_entropy(gm)`` runs the abstract interpretation of :mod:`interpret` over the graph,
then looks at every *sink*: a node whose value reads the logits (log-probs, a per-row loss or a
reduced loss) and that is read by something the algebra does not describe (another op, the graph
output). A sink is rewritten when

  1. its value is an instance of the fused op's form (``_finalize``): one label tensor, one class
     weight, masks that are conditions on rows, coefficients that fit
     loss_i = sum_j q_ij (lse_i - x_ij) + c + z lse_i^2;
  2. every node that computes it (its *cone*: the nodes with logit-reading values it depends on)
     is read only inside the cone, so after the rewrite no log-prob tensor stays alive.

The cone is replaced by ``smoothce.kernels.cross_entropy.fused_cross_entropy(...)`` at the sink;
arithmetic after the sink (e.g. a division by a token count) stays as it was. Everything else is
left alone, and candidates that were close get a NearMiss with the reason.
"""

from __future__ import annotations

import dataclasses
import operator
from fractions import Fraction
from typing import Any, Optional

import torch
import torch.fx

from smoothce.patterns.algebra import ColV, ElemV, LabelV, Q, Reject, RowV, ScalarV, carries_logits
from smoothce.patterns.interpret import (
    SEED_OPS, Interpretation, _mutates, describe, exact, fake, location, op_name, shape,
)
from smoothce.patterns.report import Match, NearMiss, RewriteResult

Node = torch.fx.Node

__all__ = ["rewrite_cross_entropy", "analyze_cross_entropy", "Plan"]


@dataclasses.dataclass
class Plan:
    """Everything needed to emit the fused op for one sink."""

    sink: Node
    x: Node  # logits as the graph computes them (before the op's own softcap)
    cd: int  # class dim of x
    dtype: Any  # log_softmax(dtype=...) upcast, or None
    label: Optional[LabelV]
    weight: Optional[Node]
    a: Fraction
    b: Fraction
    c: Fraction
    z: Fraction
    conds: frozenset
    reduction: str  # 'none' | 'sum' | 'mean'
    mean_after: bool  # op 'none' then .mean(): a plain mean over rows some of which are masked
    seeds: frozenset
    cone: list = dataclasses.field(default_factory=list)
    softcap: Optional[float] = None
    logits: Optional[Node] = None  # what the op reads (x, or x's input when the softcap is absorbed)
    softcap_nodes: tuple = ()
    softcap_view: Optional[Node] = None  # a view between the softcap and the loss, replayed on x0
    divisor: Optional[Node] = None  # the op's sum is divided by this count tensor
    head: Optional[tuple] = None  # (hidden, weight, bias, transforms, scale, nodes) for the linear op
    retarget: list = dataclasses.field(default_factory=list)  # (full_like(lp) node, lp): read x instead

    @property
    def classes(self) -> int:
        return shape(self.x)[self.cd]


# ------------------------------------------------------------------------------------------------
# Is a value an instance of the form?
# ------------------------------------------------------------------------------------------------


def _finalize(value, sink: Node) -> Plan:
    if isinstance(value, ScalarV):
        row, kind = value.row, value.kind
    elif isinstance(value, RowV):
        row, kind = value, None
    elif isinstance(value, ElemV):
        raise Reject("log-probs")  # a per-class tensor is never a loss output by itself
    elif isinstance(value, ColV):
        raise Reject("a per-class vector (reduced over rows only)")
    else:
        raise Reject("not a loss")
    x, cd, dtype = row.key
    xs = shape(x)
    nd = len(xs)
    V = xs[cd]
    if not isinstance(V, int):
        raise Reject(f"the class count {V} is symbolic")
    if nd < 2:
        raise Reject("the logits are 1-D (one unbatched row)")
    if cd != 1 and cd != nd - 1:
        raise Reject(f"log_softmax over dim {cd} of a {nd}-D tensor (classes must be dim 1 or the last dim)")
    d = row.adict
    weighted = [k for k in d if k[0] in ("WG", "WS")]
    labels = {k[1] for k in d if k[0] in ("XG", "WG")}
    if len(labels) > 1:
        raise Reject("the loss reads the log-probs at two different label tensors")
    label = next(iter(labels), None)
    weight = None
    if weighted:
        weights = {k[-1] for k in weighted}
        if len(weights) > 1:
            raise Reject("two different class-weight tensors")
        (weight,) = weights
        if any(k[0] in ("XG", "XS", "LSE") for k in d):
            raise Reject("weighted and unweighted log-prob terms are mixed")
        a = -sum((v for k, v in d.items() if k[0] == "WG"), Q(0))
        b = -d.get(("WS", weight), Q(0))
    else:
        a = -sum((v for k, v in d.items() if k[0] == "XG"), Q(0))
        b = -d.get(("XS",), Q(0))
        # lse must enter with the total target mass a + b V: then the row is sum_j q_j (lse - x_j)
        if d.get(("LSE",), Q(0)) != a + b * V:
            if a == 0 and b == 0:
                raise Reject("no log-prob term (logsumexp alone)")
            raise Reject(f"lse enters with coefficient {float(d.get(('LSE',), 0))!r}, but the "
                         f"target mass is {float(a + b * V)!r}: not log-probs")
    if a == 0 and b == 0:
        raise Reject("no log-prob term")
    if label is None:
        raise Reject("no term reads the log-prob of the label")
    z = d.get(("Z",), Q(0))
    c = d.get(("K",), Q(0))
    if z < 0:
        raise Reject(f"z-loss coefficient {float(z)!r} is negative")
    # the label may differ from its base only on rows the mask drops
    keys = {atom.key for atom in row.conds}
    for alt in label.altered:
        if alt == ("neg",):
            ok = any(k[0] == "ne" and k[1] is label.base and k[2] < 0 for k in keys)
        else:
            ok = alt in keys
        if not ok:
            raise Reject("the labels are changed (clamp/masked_fill) on rows the mask keeps")
    mean_after = False
    if kind is None:
        reduction = "none"
    elif kind == "sum":
        reduction = "sum"
    elif isinstance(kind, tuple) and kind[0] == "div":
        reduction = "sum"
    elif kind == "mean":
        # a plain mean over all rows is the op's mean only when no row is dropped and unweighted
        reduction, mean_after = ("mean", False) if not row.conds and weight is None else ("none", True)
    else:
        _, mean_weight = kind
        if mean_weight is not weight:
            raise Reject("the mean divides by a different class weight than the loss uses")
        reduction = "mean"
        if weight is not None and z != 0:
            raise Reject("a weighted mean with a z-loss term")
    if fake(x) is None or not fake(x).dtype.is_floating_point:
        raise Reject("the logits are not a floating-point tensor")
    if weight is not None and (fake(weight) is None or fake(weight).requires_grad):
        raise Reject(f"the class weight {weight.name} requires grad (the op does not differentiate it)")
    if fake(label.base) is None or fake(label.base).dtype not in (torch.int64, torch.int32):
        raise Reject(f"the labels {label.base.name} are not int64 or int32")
    plan = Plan(sink, x, cd, dtype, label, weight, a, b, c, z, row.conds, reduction, mean_after,
                value.seeds if isinstance(value, ScalarV) else row.seeds)
    if isinstance(kind, tuple) and kind[0] == "div":
        plan.divisor = kind[1]
    return plan


# ------------------------------------------------------------------------------------------------
# Sinks, cones and near misses
# ------------------------------------------------------------------------------------------------


def _what(value) -> str:
    if isinstance(value, ElemV):
        return "log-probs"
    if isinstance(value, RowV):
        return "the per-row loss"
    return "the loss"


def _cone(interp: Interpretation, sink: Node) -> list[Node]:
    """Nodes with logit-reading values that the sink's value is computed from (sink included),
    and the in-place ops that changed them."""
    seen, stack, order = {sink}, [sink], []
    while stack:
        n = stack.pop()
        order.append(n)
        for a in [*n.all_input_nodes, *interp.inplace.get(n, ())]:
            if a not in seen and carries_logits(interp.values.get(a)):
                seen.add(a)
                stack.append(a)
    return order


def analyze_cross_entropy(gm: torch.fx.GraphModule) -> tuple[list[Plan], list[NearMiss]]:
    """Plans for the losses that can be rewritten, near misses for the rest. Changes nothing."""
    plans, misses, _ = _analyze(gm)
    return plans, misses


_GRAD_MODE = {torch._C._set_grad_enabled}


_LIKE_OPS = {"full_like", "ones_like", "zeros_like"}


def _reads_only_layout(user: Node, n: Node, x: Node) -> bool:
    """full_like(lp, c) and friends read only the shape, dtype and device of lp: the logits x
    serve as well when those match, so they do not keep the log-probs alive."""
    if op_name(user) not in _LIKE_OPS or not user.args or user.args[0] is not n:
        return False
    if any(a is n for a in (*user.args[1:], *user.kwargs.values())):
        return False
    fn, fx = fake(n), fake(x)
    return fn is not None and fx is not None and (fn.shape, fn.dtype, fn.device) == (fx.shape, fx.dtype, fx.device)


def _grad_modes(gm) -> dict:
    """node -> grad mode it runs under. Dynamo brackets no_grad/enable_grad regions with
    _set_grad_enabled calls and restores the outer mode last, so the last call names the outer
    mode (True when there is none: any single mode is consistent)."""
    switches = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _GRAD_MODE]
    mode = bool(switches[-1].args[0]) if switches and switches[-1].args else True
    out = {}
    for n in gm.graph.nodes:
        if n in switches and n.args:
            mode = bool(n.args[0])
        out[n] = mode
    return out


def _mutations(gm) -> dict:
    """node -> in-place ops (Tensor methods ending in '_') that change it."""
    out: dict = {}
    for n in gm.graph.nodes:
        if _mutates(n):
            out.setdefault(n.args[0], []).append(n)
    return out


def _analyze(gm: torch.fx.GraphModule):
    interp = Interpretation(gm.graph)
    mutated = _mutations(gm)
    modes = _grad_modes(gm)
    understood = {m for ms in interp.inplace.values() for m in ms}
    values = interp.values
    plans: list[Plan] = []
    misses: dict[tuple, tuple[int, NearMiss]] = {}

    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def miss(seed: Node, at: Node, reason: str, at_sink: bool = True) -> None:
        # rank: what stopped a loss output beats an opaque reader on the way; among loss outputs
        # the latest (the largest expression) wins, among readers the earliest
        rank = (1, order[at]) if at_sink else (0, -order[at])
        misses.setdefault((seed, reason), (rank, NearMiss(seed.name, location(seed), reason)))

    def read_by(n: Node, u: Node) -> str:
        if u.op == "output" and isinstance(values[n], ElemV):
            return "log-probs returned from the graph: log-probs"  # wording pinned by inspect's goldens
        if u.op == "output":
            return f"{_what(values[n])} ({n.name}, {location(n)}) is also returned from the graph"
        return f"{_what(values[n])} also read at {location(u)} ({describe(u).split(' at ')[0]})"

    def first_seed(value, node):
        seeds = getattr(value, "seeds", frozenset()) or (value.row.seeds if isinstance(value, ScalarV) else frozenset())
        return min(seeds, key=order.__getitem__) if seeds else node

    # Sinks: logit-reading values read by something the algebra does not describe. A sink that is
    # not an instance of the form hands the question down to its own logit-reading inputs, so
    # "ce + unrelated_term" still rewrites ce.
    work = [n for n in gm.graph.nodes if carries_logits(values.get(n))
            and any(not carries_logits(values.get(u)) for u in n.users)]
    queued = set(work)
    handed_down: set = set()
    while work:
        node = work.pop(0)
        value = values[node]
        has_seed = bool(getattr(value, "seeds", None) or (isinstance(value, ScalarV) and value.row.seeds))
        try:
            plan = _finalize(value, node)
        except (Reject, TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
            if has_seed and node not in handed_down:
                u = next(u for u in node.users if not carries_logits(values.get(u)))
                reason = interp.why.get(u) or (
                    read_by(node, u) if u.op != "output" else f"{_what(value)} returned from the graph: {err}")
                miss(first_seed(value, node), node, reason)
            for a in node.all_input_nodes:
                if carries_logits(values.get(a)) and a not in queued:
                    queued.add(a)
                    handed_down.add(a)
                    work.append(a)
            continue
        plan.cone = _cone(interp, node)
        inside = set(plan.cone)
        bad = None
        # the op runs at the sink, under the sink's grad mode: log-probs computed under another
        # grad mode (no_grad around them only) would get gradients they did not have
        other = next((n for n in plan.cone if modes[n] != modes[node]), None)
        if other is not None:
            s = first_seed(value, node)
            on = {True: "enabled", False: "disabled"}
            reason = (f"the grad mode changes inside the loss ({describe(other)} runs with grad "
                      f"{on[modes[other]]}, the loss with grad {on[modes[node]]})")
            miss(s, node, reason)
            continue
        # the op runs at the sink: an in-place change of what it reads would be seen differently
        reads = [plan.x, plan.label.base, plan.weight, plan.divisor, *(c.node for c in plan.conds),
                 *plan.x.all_input_nodes]
        changed = [(r, m) for r in reads if r is not None for m in mutated.get(r, ()) if m not in understood]
        if changed:
            r, m = changed[0]
            s = first_seed(value, node)
            miss(s, node, f"{r.name} is changed in place by {describe(m)}")
            continue
        for n in plan.cone:
            if n is node:
                continue
            for u in n.users:
                if u in inside:
                    continue
                if _reads_only_layout(u, n, plan.x):
                    plan.retarget.append((u, n))
                    continue
                bad = (n, u)
                break
            if bad:
                break
        if bad:
            n, u = bad
            miss(first_seed(value, node), node, interp.why.get(u) or read_by(n, u))
            continue
        plans.append(plan)
    # a node whose value reads log-probs feeds an op the algebra rejected, with no sink downstream
    for node, reason in interp.why.items():
        if op_name(node) in SEED_OPS and not any(carries_logits(values.get(a)) for a in node.all_input_nodes):
            miss(node, node, reason, at_sink=False)
        srcs = [a for a in node.all_input_nodes if carries_logits(values.get(a))]
        for a in srcs:
            s = first_seed(values[a], a)
            if getattr(values[a], "seeds", None):
                miss(s, node, reason, at_sink=False)
    # One reason per candidate (see miss() for which). Candidates a plan rewrote have none.
    done = {s for p in plans for s in p.seeds}
    best: dict = {}
    for (s, _), (at, m) in misses.items():
        if s not in done and (s not in best or at > best[s][0]):
            best[s] = (at, m)
    return plans, [m for _, m in sorted(best.values(), key=lambda t: t[0])], understood


# ------------------------------------------------------------------------------------------------
# Emission
# ------------------------------------------------------------------------------------------------


def _softcap_source(plan: Plan) -> None:
    """Absorb logits = cap * tanh(x0 / cap) into the op's softcap when nothing else reads them
    (also through one view/reshape between the softcap and the loss)."""
    cone = set(plan.cone)
    x = plan.x
    if plan.dtype is not None or any(u not in cone for u in x.users):
        return
    view = None
    if op_name(x) in ("reshape", "flatten") and isinstance(x.args[0], torch.fx.Node) \
            and len(x.args[0].users) == 1:
        view, x = x, x.args[0]
    if op_name(x) != "mul" or len(x.args) != 2:
        return
    a, b = x.args
    t, cap = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
    capq = exact(cap)
    if not isinstance(t, torch.fx.Node) or capq is None or capq <= 0 or op_name(t) != "tanh":
        return
    if len(t.users) != 1 or len(t.args) != 1 or not isinstance(t.args[0], torch.fx.Node):
        return
    div = t.args[0]
    if op_name(div) != "div" or len(div.users) != 1 or len(div.args) != 2 or div.kwargs:
        return
    x0, cap2 = div.args
    if not isinstance(x0, torch.fx.Node) or exact(cap2) != capq or shape(x0) != shape(x):
        return
    plan.softcap = float(cap)
    plan.logits = x0
    plan.softcap_view = view
    plan.softcap_nodes = tuple(n for n in (view, x, t, div) if n is not None)


# ------------------------------------------------------------------------------------------------
# Stage 2: logits straight from an LM head -> the fused linear cross-entropy
# ------------------------------------------------------------------------------------------------


def _head_call(node: Node):
    """(hidden, weight (V, D), bias, extra nodes) when node is F.linear or hidden @ W.t()."""
    if node.op != "call_function":
        return None
    if node.target in (torch._C._nn.linear, torch.nn.functional.linear):
        args = list(node.args) + [None] * 3
        h, w = args[0], node.kwargs.get("weight", args[1])
        b = node.kwargs.get("bias", args[2])
        if isinstance(h, Node) and isinstance(w, Node) and (b is None or isinstance(b, Node)):
            return h, w, b, ()
        return None
    if node.target in (torch.matmul, operator.matmul) and len(node.args) == 2 and not node.kwargs:
        h, wt = node.args
        if not isinstance(h, Node) or not isinstance(wt, Node) or len(wt.users) != 1:
            return None
        transposed = (wt.op == "call_method" and wt.target == "t" and len(wt.args) == 1) or (
            wt.op == "call_function" and wt.target is getattr and wt.args[1:] == ("T",))
        if transposed and isinstance(wt.args[0], Node) and shape(wt.args[0]) is not None \
                and len(shape(wt.args[0])) == 2:
            return h, wt.args[0], None, (wt,)
    return None


def _reader(u: Node) -> str:
    return "returned to the caller" if u.op == "output" else f"also read at {location(u)} ({describe(u).split(' at ')[0]})"


def _linear_source(plan: Plan) -> Optional[str]:
    """Find an LM head behind the logits; set plan.head, or return why not (None: no head)."""
    if plan.dtype is not None or plan.cd != len(shape(plan.x)) - 1:
        return None
    cone = set(plan.cone) | set(plan.softcap_nodes)
    start = plan.logits if plan.logits is not None else plan.x
    transforms = [plan.softcap_view] if plan.softcap_view is not None else []
    outside = [u for u in start.users if u not in cone]
    V = plan.classes
    scale = Q(1)
    n, chain = start, []
    while True:
        head = _head_call(n)
        if head is not None:
            break
        op = op_name(n)
        if not n.args or not isinstance(n.args[0], Node):
            return None
        if op == "reshape" and n.args[-1] == V and all(isinstance(a, int) for a in n.args[1:]):
            transforms.append(n)
        elif op == "getitem" and isinstance(n.args[1], tuple) and n.args[1] and n.args[1][-1] == slice(None):
            transforms.append(n)
        elif op == "cast" and (n.target in ("contiguous", "float") or (
                n.target == "to" and len(n.args) == 2 and n.args[1] in (torch.float32, torch.float64))):
            pass
        elif op in ("mul", "div") and len(n.args) == 2 and exact(n.args[1]) and not n.kwargs:
            scale = scale * exact(n.args[1]) if op == "mul" else scale / exact(n.args[1])
        elif op == "mul" and len(n.args) == 2 and exact(n.args[0]) and isinstance(n.args[1], Node):
            scale *= exact(n.args[0])
            chain.append(n)
            n = n.args[1]
            if len(n.users) != 1:
                return f"logits {_reader(next(u for u in n.users if u is not chain[-1]))}"
            continue
        else:
            return None
        chain.append(n)
        n = n.args[0]
        if len(n.users) != 1:
            return f"logits {_reader(next(u for u in n.users if u is not chain[-1]))}"
    if outside:
        return f"logits {_reader(outside[0])}"
    hidden, weight, bias, extra = head
    if shape(weight) is None or len(shape(weight)) != 2 or shape(weight)[0] != V:
        return None
    plan.head = (hidden, weight, bias, list(reversed(transforms)), float(scale), [n, *chain, *extra])
    return ""


def _emit_linear_input(plan: Plan, call) -> Node:
    """hidden with the logits' row transforms replayed (reshape(..., V) -> reshape(..., D))."""
    hidden, weight, _, transforms, _, _ = plan.head
    D = shape(weight)[1]
    h = hidden
    for t in transforms:
        if op_name(t) == "reshape":  # reshape, not view: a slice before it may be non-contiguous
            h = call("call_method", "reshape", (h, *t.args[1:-1], D))
        else:
            h = call(t.op, t.target, (h, *t.args[1:]), dict(t.kwargs))
    return h


def _eps(b: Fraction, n: int) -> float:
    """eps with eps / n == b in float: the shortest decimal that reproduces the graph's constant."""
    raw = float(b * n)
    for digits in range(1, 18):
        short = float(f"{raw:.{digits}g}")
        if short / n == float(b):
            return short
    return raw


def _family(plan: Plan) -> tuple[str, dict]:
    kinds = {op_name(s) for s in plan.seeds}
    V = plan.classes
    b = plan.b
    convention, eps = None, 0.0
    if b != 0:
        # a + b V = 1 for both "1 - eps on the label, eps spread over V" (eps = b V) and "1 - eps
        # on the label, eps over the V - 1 others" (eps = b (V - 1)): the same distribution. It is
        # named after the constant the user wrote: the shorter decimal.
        e_v, e_v1 = _eps(b, V), _eps(b, V - 1)
        if len(repr(e_v1)) < len(repr(e_v)):
            convention, eps = "eps/(V-1)", e_v1
        else:
            convention, eps = "eps/V", e_v
    if "kl_div" in kinds:
        family = "kl_div"
    elif "cross_entropy" in kinds:
        family = "cross_entropy"
    elif "nll_loss" in kinds:
        family = "log_softmax+nll"
    elif _builds_target(plan):
        family = "smoothed-target"
    elif b == 0:
        family = "hand-written nll"
    else:
        family = f"hand-written {convention}"
    return family, {"eps": eps, "convention": convention}


_TARGET_OPS = {"one_hot", "scatter", "full_like", "new_full", "ones_like", "zeros_like"}


def _builds_target(plan: Plan) -> bool:
    """Whether the loss multiplies log-probs by a target distribution built in the graph."""
    seen, stack = set(plan.cone), list(plan.cone)
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                if op_name(a) in _TARGET_OPS:
                    return True
                stack.append(a)
    return False


def _fake_mode(gm):
    for n in gm.graph.nodes:
        t = fake(n)
        if t is not None and hasattr(t, "fake_mode"):
            return t.fake_mode
    return None


def _meta(node: Node, fake_mode, like: Node) -> None:
    node.meta["stack_trace"] = like.meta.get("stack_trace")
    if fake_mode is None:
        return

    def to_fake(a):
        return fake(a) if isinstance(a, Node) else a

    try:
        args = torch.fx.node.map_arg(node.args, to_fake)
        kwargs = torch.fx.node.map_arg(node.kwargs, to_fake)
        with fake_mode:
            if node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
        node.meta["example_value"] = out
    except Exception:  # metadata is a courtesy for later passes; the graph is right without it
        pass


def _emit(gm: torch.fx.GraphModule, plan: Plan, fake_mode) -> int:
    """Insert the op for a plan at its sink; returns the ignore_index used. On any failure the
    inserted nodes are removed again and the graph is as it was."""
    added: list[Node] = []
    try:
        return _emit_nodes(gm, plan, fake_mode, added)
    except Exception as err:
        for n in reversed(added):
            gm.graph.erase_node(n)
        if isinstance(err, Reject):
            raise
        raise Reject(f"the rewrite failed ({type(err).__name__}: {err})") from err


def _emit_nodes(gm: torch.fx.GraphModule, plan: Plan, fake_mode, added: list) -> int:
    from smoothce.kernels.cross_entropy import fused_cross_entropy
    from smoothce.kernels.form import LossForm

    g = gm.graph
    sink = plan.sink
    V, cd = plan.classes, plan.cd
    xs = shape(plan.x)
    nd = len(xs)
    rows = tuple(d for i, d in enumerate(xs) if i != cd)

    def call(kind, target, args, kwargs=None):
        n = g.create_node(kind, target, tuple(args), kwargs or {})
        _meta(n, fake_mode, sink)
        added.append(n)
        return n

    with g.inserting_before(sink):
        logits = plan.logits if plan.logits is not None else plan.x
        if plan.head is not None:
            logits = _emit_linear_input(plan, call)
        elif plan.softcap_view is not None:
            v = plan.softcap_view
            logits = call(v.op, v.target, (logits, *v.args[1:]), dict(v.kwargs))
        if plan.dtype is not None:
            logits = call("call_method", "to", (logits, plan.dtype))
        flatten = cd == nd - 1 and nd > 2
        want = fake(sink).dtype if fake(sink) is not None else None
        have = fake(logits).dtype if fake(logits) is not None else None
        if plan.head is None and want is not None and have is not None and want.is_floating_point \
                and torch.finfo(want).bits > torch.finfo(have).bits:
            # the user's loss came out wider than the logits (autocast, a float32 target): the op
            # returns the logits' dtype, so it reads them upcast rather than rounding the loss
            logits = call("call_method", "to", (logits, want))
        if flatten and plan.head is not None:
            logits = call("call_method", "reshape", (logits, -1, shape(plan.head[1])[1]))
        elif flatten:  # (..., V) with classes last -> (rows, V); the op wants classes at dim 1
            logits = call("call_method", "reshape", (logits, -1, V))
        if not all(isinstance(d, int) for d in rows[1:]):
            raise Reject(f"the rows {rows} have symbolic sizes past the first")
        # -1 for the leading size keeps the graph valid under dynamic shapes
        op_rows = (-1,) if flatten else (-1, *rows[1:])
        target = plan.label.base
        if flatten or shape(target) != tuple(rows):
            target = call("call_method", "reshape", (target, *op_rows))
        keys = [atom for atom in plan.conds if atom.key[0] == "ne" and atom.key[1] is plan.label.base]
        ks = sorted({atom.key[2] for atom in keys})
        ignore = -100 if not ks or -100 in ks else ks[0]
        for k in ks:
            if k != ignore:  # a second ignored label value: relabel it as the ignore_index
                eq = call("call_method", "eq", (target, k))
                target = call("call_method", "masked_fill", (target, eq, ignore))
        for atom in plan.conds:
            if atom in keys:
                continue
            if atom.node is None:
                raise Reject("an internal ignore condition on another label tensor")
            m = atom.node
            if shape(m) != shape(target):
                m = call("call_method", "reshape", (m, *op_rows))
            drop = call("call_method", "logical_not", (m,)) if atom.positive else m
            target = call("call_method", "masked_fill", (target, drop, ignore))
        head_scale = {"logit_scale": plan.head[4]} if plan.head is not None else {}
        form = LossForm.from_coefficients(plan.a, plan.b, plan.c, V, ignore_index=ignore, reduction=plan.reduction,
                                          z_loss=float(plan.z), softcap=plan.softcap, **head_scale)
        kwargs = form.describe()
        if plan.head is not None:
            from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy

            _, head_weight, bias, _, _, _ = plan.head
            loss = call("call_function", fused_linear_cross_entropy,
                        (logits, head_weight, bias, target, plan.weight), kwargs)
        else:
            loss = call("call_function", fused_cross_entropy, (logits, target, plan.weight), kwargs)
        if plan.reduction == "none" and not plan.mean_after and shape(sink) != shape(loss):
            out = shape(sink)
            if not all(isinstance(d, int) for d in out[1:]):
                raise Reject(f"the per-row loss of shape {out} has symbolic sizes past the first")
            loss = call("call_method", "reshape", (loss, -1, *out[1:]) if out else (loss, ()))
        if plan.mean_after:
            loss = call("call_method", "mean", (loss,))
        if plan.divisor is not None:
            loss = call("call_function", operator.truediv, (loss, plan.divisor))
        if want is not None and fake(loss) is not None and fake(loss).dtype != want:
            loss = call("call_method", "to", (loss, want))
    sink.replace_all_uses_with(loss)
    for user, n in plan.retarget:
        user.replace_input_with(n, plan.x)
    return ignore


def _erase_dead(gm: torch.fx.GraphModule, candidates: list[Node], inplace=frozenset()) -> list[str]:
    """Erase candidates (and their inputs) that nothing reads any more: pure ops, and the in-place
    ops the interpretation understood (they only changed the nodes being erased)."""
    erased = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pending = set(candidates)
    while pending:
        n = max(pending, key=order.__getitem__)
        pending.discard(n)
        if n.users or n.op not in ("call_function", "call_method") or n.graph is not gm.graph:
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if n not in inplace and (name.endswith("_") and not name.endswith("__") or n.is_impure()):
            continue  # in-place ops and side effects stay
        inputs = n.all_input_nodes
        erased.append(n.name)
        gm.graph.erase_node(n)
        pending.update(inputs)
    return erased


def _has_linear_op() -> bool:
    try:
        from smoothce.kernels.linear_cross_entropy import fused_linear_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def rewrite_cross_entropy(gm: torch.fx.GraphModule, *, fuse_linear: bool = True) -> RewriteResult:
    """Rewrite every provable cross-entropy loss in ``gm`` into one fused op call (in place).

    With ``fuse_linear``, a loss whose logits come only from an LM head (F.linear or
    hidden @ W.t(), through .float(), slicing, views and constant scaling) becomes one
    ``fused_linear_cross_entropy`` call that never materialises the logits; a head whose logits
    are also read elsewhere keeps the plain op and gets a near miss saying where.
    """
    plans, near_misses, inplace = _analyze(gm)
    result = RewriteResult(near_misses=list(near_misses))
    if not plans:
        return result
    fake_mode = _fake_mode(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for plan in plans:
        _softcap_source(plan)
        why_not = _linear_source(plan) if fuse_linear and _has_linear_op() else None
        seed = min(plan.seeds, key=order.__getitem__) if plan.seeds else plan.sink
        loc = location(seed)
        try:
            family, extra = _family(plan)
            ignore = _emit(gm, plan, fake_mode)
        except Reject as err:
            result.near_misses.append(NearMiss(seed.name, loc, str(err)))
            continue
        head_nodes = plan.head[5] if plan.head is not None else []
        erased = _erase_dead(gm, [plan.sink, *plan.cone, *plan.softcap_nodes, *head_nodes], inplace)
        if plan.head is not None:
            family = "linear+" + family
        elif why_not:
            result.near_misses.append(NearMiss(seed.name, loc, f"not fused with its LM head: {why_not}"))
        params = {
            **extra,
            "target_coef": float(plan.a), "uniform_coef": float(plan.b), "constant": float(plan.c),
            "z_loss": float(plan.z), "softcap": plan.softcap,
            **({"logit_scale": plan.head[4]} if plan.head is not None else {}),
            "ignore_index": ignore, "reduction": plan.reduction + (" then mean" if plan.mean_after else ""),
            "weight": plan.weight.name if plan.weight is not None else None,
            "classes": plan.classes, "dtype": str(fake(plan.x).dtype).replace("torch.", ""),
        }
        result.matches.append(Match(family, loc, params, tuple(erased)))
    gm.graph.lint()
    gm.recompile()
    return result
