"""A cross-entropy over classes split across processes, written by hand with collectives.

Megatron-LM's and torchtitan's vocab-parallel loss, in a graph: each rank's shard of the logits
reduced to a row max and a row sum of exponentials that ``_c10d_functional.all_reduce`` combines
(max, then sum), and the label's logit summed over the ranks likewise. The detector does not
rewrite it: proving that the shards, the class offset and the masks make the loss of all the
classes would take the ranks' layout, which the graph does not hold; and its gradient is not the
loss's own: the backward of a functional all_reduce sums every rank's gradient, and every rank
computes the same loss, so eager PyTorch hands each shard tp times its gradient. A rewrite that
returned the true gradient would change what the user's code computes, so the detector says what
to write instead, with a near miss on the sum of exponentials' all_reduce.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx

from smoothce.patterns.nodes import fake, location
from smoothce.patterns.ops import op_name
from smoothce.patterns.report import NearMiss

Node = torch.fx.Node

__all__ = ["hand_written_vocab_parallel"]


def _all_reduce_op(node: Node) -> Optional[str]:
    """The reduction ("sum", "max", ...) of a functional all_reduce, else None."""
    functional = getattr(torch.ops, "_c10d_functional", None)
    if functional is None or node.op != "call_function" or len(node.args) < 2:
        return None
    packets = (functional.all_reduce, functional.all_reduce.default)
    return node.args[1] if node.target in packets and isinstance(node.args[1], str) else None


def _past_copies(node):
    """The tensor under detach / clone / contiguous."""
    while isinstance(node, Node) and op_name(node) in ("detach", "clone", "contiguous") and node.args:
        node = node.args[0]
    return node


def _sum_of_exp(node) -> bool:
    node = _past_copies(node)
    if not isinstance(node, Node) or op_name(node) != "sum" or not node.args:
        return False
    inner = _past_copies(node.args[0])
    return isinstance(inner, Node) and op_name(inner) == "exp"


def _waited(node: Node) -> Node:
    """The all_reduce's wait_tensor, which is what the rest of the graph reads."""
    return next((u for u in node.users if "wait_tensor" in str(u.target)), node)


def hand_written_vocab_parallel(graph: torch.fx.Graph) -> list[NearMiss]:
    """A near miss for each functional all_reduce (sum) of a row sum of exponentials: a log-sum-exp
    over classes split across processes."""
    misses = []
    maxima = [n for n in graph.nodes if _all_reduce_op(n) == "max"]
    for n in graph.nodes:
        if _all_reduce_op(n) != "sum" or not _sum_of_exp(n.args[0]):
            continue
        # (the line that wrote the all_reduce is its input's: its own stack ends inside PyTorch)
        shift = f", the row max all-reduced at {location(maxima[0].args[0])}" if maxima else ""
        value = fake(_waited(n))
        gradient = ("; in eager PyTorch its gradient is tp times the loss's own (the functional all_reduce's "
                    "backward sums every rank's gradient of the same loss)"
                    if value is not None and value.requires_grad else "")
        where = location(n.args[0])
        misses.append(NearMiss(n.name, where, (
            f"a cross-entropy over classes split across processes, written with collectives (the sum of "
            f"exponentials all-reduced at {where}{shift}): smoothce does not rewrite a loss across "
            f"collectives{gradient}. Write smoothce.cross_entropy(local_logits, labels, process_group=group), "
            "each rank passing its equal slice of the classes, or F.cross_entropy on logits that are a DTensor "
            "sharded on the classes: the loss of all the classes and its true gradient, from one all-gather "
            "of 2-4 floats per row")))
    return misses
