"""The meaning of the softmax family: log_softmax, softmax, log, exp, logsumexp.

``log_softmax(x)``, ``log(softmax(x))`` and ``x - logsumexp(x, keepdim=True)`` (arithmetic.py) are
one value, the log-probs of the logits behind x (logits.py); ``exp`` of a value built from them is a
focal, poly or entropy term, not a cross-entropy, and is left as written.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from smoothce.patterns.algebra import NotCrossEntropy, Q, Reject, RowV, SoftmaxV, carries_logits, kind, log_probs, \
    seeds_of
from smoothce.patterns.interpret.arguments import from_end, norm_dim
from smoothce.patterns.interpret.logits import upcast
from smoothce.patterns.nodes import describe, dtype, location, shape

if TYPE_CHECKING:
    from smoothce.patterns.interpret.interpretation import Interpretation


def class_dim(x, dim) -> int:
    """The class dim (from the end) of a softmax over ``dim`` of x; None is PyTorch's implicit dim."""
    ndim = len(shape(x))
    d = _implicit_softmax_dim(ndim) if dim is None else dim
    return from_end(norm_dim(d, ndim), ndim)


def _implicit_softmax_dim(ndim: int) -> int:
    # torch.nn.functional._get_softmax_dim
    return 0 if ndim in (0, 1, 3) else 1


def op_log_softmax(interp: Interpretation, node, x, kw, make=log_probs):
    lg = interp.logits(x)
    if lg is None:
        v = interp.val(x)
        if carries_logits(v):
            raise Reject(f"log_softmax of {kind(v)} ({describe(node)})")
        return None
    key = upcast(lg.key, dtype(x), kw.get("dtype"))
    if key is None:
        raise Reject(f"log_softmax(dtype={kw.get('dtype')}) rounds the logits ({describe(node)})")
    cd = class_dim(x, kw["dim"])
    return make(dataclasses.replace(key, cd=cd), seeds_of(lg) | {node})


def op_softmax(interp: Interpretation, node, x, kw):
    return op_log_softmax(interp, node, x, kw, make=lambda key, seeds: SoftmaxV(key, seeds))


def op_log(interp: Interpretation, node, x, kw):
    v = interp.val(x)
    if isinstance(v, SoftmaxV):  # log(softmax(x)): log-probabilities spelled in two steps
        return log_probs(v.logits, v.seeds | {node})
    if carries_logits(v):
        raise Reject(f"log of {kind(v)} ({describe(node)})")
    return None


def op_exp(interp: Interpretation, node, x, kw):
    v = interp.val(x)
    if carries_logits(v):
        raise NotCrossEntropy(f"exp of {kind(v)} at {location(node)}: a focal, poly or entropy term, "
                              "not a cross-entropy; left as written")
    return None


def op_logsumexp(interp: Interpretation, node, x, kw):
    lg = interp.logits(x)
    if lg is None or "dim" not in kw:
        return None
    cd = class_dim(x, kw["dim"])
    return RowV.make(dataclasses.replace(lg.key, cd=cd), {("LSE",): Q(1)}, seeds=seeds_of(lg))
