"""The meaning of in-place ops: ``masked_fill_``, ``mul_``, ``div_``, ``neg_``, ``add_``, ``sub_``,
``scatter_``, ``fill_``, ``index_fill_``, item assignment (``t[i] = c``) and the augmented
assignments ``t *= c``, ``t += c``, ``t -= c``, ``t /= c``.

An in-place op has the meaning of its out-of-place twin (the op name ops.py gives it); what is
particular to it is who sees the new value. It is followed where it changes a fresh tensor that
nothing else aliases (a loss term masked with ``masked_fill_``, a target built with
``zeros_like(...).scatter_``, a float one-hot smoothed with ``mul_(1 - eps).add_(eps / V)``; a cast
to another dtype is such a tensor, a copy): the mutated node, and the in-place calls that returned it
(``empty(...).fill_(c).scatter_(...)``), take the new value for the readers after it. Any other
in-place change makes the tensor opaque from there on, so no value from before the change is ever
used after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx

from smoothce.patterns.algebra import ElemV, Reject, carries_logits
from smoothce.patterns.interpret.arguments import labels_of
from smoothce.patterns.nodes import describe, dtype, mutates, words
from smoothce.patterns.ops import FRESH, INPLACE, op_name

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation

Node = torch.fx.Node


def is_followed(node: Node, op) -> bool:
    """An in-place op whose new value the interpretation can follow (by the meaning of its op)."""
    if op is None or not mutates(node):
        return False
    return op == "setitem" or node.op == "call_method" and node.target in INPLACE or node.op == "call_function"


def _returns_its_tensor(m: Node) -> bool:
    """An in-place method or augmented assignment returns the tensor it changes (item assignment
    returns None)."""
    return m.op == "call_method" or m.op == "call_function" and op_name(m) != "setitem"


def _fresh(n: Node) -> bool:
    """A new tensor that aliases nothing: FRESH ops, and a cast to another dtype (a copy)."""
    op = op_name(n)
    return op in FRESH or op == "cast" and isinstance(n.args[0], Node) and dtype(n) != dtype(n.args[0])


def unfollowed(interp: Interpretation, node: Node):
    """An in-place change the algebra does not follow (y.clamp_, t.index_put_): later readers of
    the tensor must not see its old value."""
    changed = node.args[0]
    old = interp.values.get(changed)
    opaque(interp, aliases(interp, changed)[1], node)
    if carries_logits(old):
        raise Reject(f"a loss value is changed in place by {describe(node)}")
    return None


def aliases(interp: Interpretation, n: Node) -> tuple:
    """(the tensor, every node that returns it): an in-place method returns the tensor it
    changes, so t, t.fill_(c) and t.fill_(c).scatter_(...) are one tensor."""
    root = interp.alias_of.get(n, n)
    return root, [root, *(m for m in interp.inplace.get(root, ()) if _returns_its_tensor(m))]


def opaque(interp: Interpretation, group: list, node: Node):
    """The tensors of ``group`` have no value from ``node`` on (it changed them)."""
    for m in group:
        old = interp.values.get(m)
        if isinstance(old, ElemV) and old.key is None:  # a target lost to the change
            interp.lost[m] = (node, labels_of(old))
        interp.values[m] = None
        interp.changed_by[m] = node


def follow(interp: Interpretation, node: Node, first, value):
    """The tensor ``first`` changed by ``node`` to ``value``: its readers from here on see
    ``value``, when nothing else can see the change; else it turns opaque."""
    if not isinstance(first, Node):
        return None
    root, group = aliases(interp, first)
    old = interp.values.get(first)
    # fill_ writes every element: what the tensor held does not matter (torch.empty)
    known = carries_logits(old) or isinstance(old, ElemV) or op_name(node) == "fill" and old is None
    if not known:
        opaque(interp, group, node)  # a label, mask or unknown tensor changed in place: opaque from here
        return None
    done = interp.inplace.get(root, ())
    others = [u for m in group for u in m.users if interp.order[u] < interp.order[node]
              and not _fresh(u) and u not in done]
    if not _fresh(root) or others:
        opaque(interp, group, node)
        if carries_logits(old):
            raise Reject(f"in-place {node.target} ({describe(node)}) on {words(first)}, which may alias "
                         "other tensors")
        return None
    if value is None:
        opaque(interp, group, node)
        if carries_logits(old):
            raise Reject(f"in-place {node.target} on a loss value ({describe(node)})")
        return None
    for m in group:
        interp.values[m] = value  # readers after this point see the mutated value
    interp.inplace.setdefault(root, []).append(node)
    interp.alias_of[node] = root
    return value
