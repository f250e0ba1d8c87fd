"""Every drawn spelling of a hand-written (label-smoothed) cross-entropy is rewritten, and equals eager.

The generator (tests/spellings.py) composes sixteen axes. Each draw is compiled with the detector
(then aot_eager), in training and under no_grad; the loss and the logits' gradient must equal
eager PyTorch in float64, the graphs must hold the op calls the draw needs (``Spelling.calls``),
and nothing of the loss may be left in them: no log-prob op, and none of the one-hots
(F.one_hot, scatter, arange == y) the user's code built its target with.

A bfloat16 draw upcasts its logits itself (``x.float()``, ``log_softmax(..., dtype=torch.float32)``):
its reference is the same program upcasting to float64 instead, on the same bfloat16 values, so the
bfloat16 run is held to float64 (its loss as closely as float32 math allows, its bfloat16 gradient
within bfloat16 rounding), not to a float32 reference.

A draw with a target kept in a module buffer or across a graph break, or with its labels read two
ways (``Spelling.later``), has no modelled call count: it must equal eager all the same, take
at most two calls more than its inline spelling, and say in a near miss (``NEAR_MISSES``) what
it leaves beside the op.

CI runs a fixed number of draws. ``SMOOTHCE_SPELLINGS=N`` draws N (e.g. 2000), and
``SMOOTHCE_SPELLINGS_SEED=S`` starts at draw S; a failure names its draw, the command that reruns
it alone, and prints its program.
"""

import dataclasses
import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.debugging import aot_eager

import spellings
from rewrite_check import N, V, check, fused_calls, logits, parametrize_draws
from smoothce.patterns.cross_entropy import rewrite_cross_entropy
from smoothce.patterns.ops import op_name

CI_DRAWS = 24
LOGPROB_OPS = {"log_softmax", "logsumexp", "softmax", "nll_loss", "gather", "kl_div"}
# bfloat16 keeps 8 significant bits: a value rounded once is off by at most 2 ** -8 of itself
BF16_ROUNDING = torch.finfo(torch.bfloat16).eps / 2


def pytest_generate_tests(metafunc):
    parametrize_draws(metafunc, "SMOOTHCE_SPELLINGS", CI_DRAWS)


def builds_target(n) -> bool:
    """A node of the user's code that builds the target distribution from the labels."""
    name = op_name(n)
    return name in ("one_hot", "scatter", "arange") or (
        name == "eq" and any(op_name(a) == "arange" for a in n.all_input_nodes))


class Recorder:
    def __init__(self):
        self.graphs, self.results, self.targets = [], [], []

    def __call__(self, gm, example_inputs):
        self.targets += [n for n in gm.graph.nodes if builds_target(n)]  # before the rewrite
        self.results.append(rewrite_cross_entropy(gm))
        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def left(self) -> tuple[set, list]:
        """The log-prob ops in the rewritten graphs, and the user's target-building nodes still there."""
        nodes = [n for gm in self.graphs for n in gm.graph.nodes]
        kept = set(nodes)
        return {op_name(n) for n in nodes} & LOGPROB_OPS, [n.format_node() for n in self.targets if n in kept]


def _run(fn, ref_fn, x, y, w, grad: bool, dynamic=((), ())):
    rec = Recorder()
    compiled = torch.compile(fn, backend=rec)
    xc = x.detach().requires_grad_(grad)
    y = y.clone()
    for t, dims in ((xc, dynamic[0]), (y, dynamic[1])):  # B and T symbolic where the code lets them be
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(t, d)
    xr = x.detach().double().requires_grad_(grad)  # the same (rounded) values
    with torch.set_grad_enabled(grad):
        out = compiled(xc, y, w)
        ref = ref_fn(xr, y, w.double())
    if grad:
        out.backward()
        ref.backward()
    return rec, out, ref, xc.grad, xr.grad


def describe(draw: int, s: spellings.Spelling) -> str:
    """What a failure prints: the draw, how to rerun it alone, its program (and its reference's)."""
    rerun = (f"SMOOTHCE_SPELLINGS=1 SMOOTHCE_SPELLINGS_SEED={draw} "
             "python -m pytest tests/test_patterns_spellings.py -k test_spelling")
    text = f"draw {draw} (rerun: {rerun}): {s}\n# inputs: spellings.inputs(s, {draw})\n{s.source()}"
    if s.source("float64") != s.source():
        text += f"# the float64 reference:\n{s.source('float64')}"
    return text


# The near misses a draw may give, each in the user's words: a failure of the rewrite itself, or a
# reason no draw should meet, fails the draw
NEAR_MISSES = [
    r"^rewritten in part, the rest left as written: the target leaves out class 0 but keeps rows whose label is 0$",
    # the labels read two ways (gather or nll_loss next to take_along_dim or advanced indexing)
    r"^rewritten in part, the rest left as written: the loss reads the labels .* in 2 ways \(",
    r"^rewritten in part, the rest left as written: the label terms are masked in 2 different ways$",
    # a target kept in a buffer or passed across a graph break is a target given as data
    r"^rewritten in part, the rest left as written: a term against a target given as a tensor next to label terms "
    r"masked apart",
    r"^rewritten in part, the rest left as written: a z-loss term next to a target given as a tensor",
]


class LeftInTheGraph(AssertionError):
    """Part of the loss (a log-prob op, or what built the target) is still computed beside the op,
    and a near miss says so."""


def check_spelling(s: spellings.Spelling, seed: int, context: str):
    """Spelling ``s`` on inputs(s, seed), in training and under no_grad: eager's value in float64,
    the op calls it needs, nothing of the loss left in the graph (LeftInTheGraph)."""
    fn, ref_fn = spellings.function(s), spellings.function(s, upcast="float64")
    x, y, w = spellings.inputs(s, seed)
    bf16 = s.dtype.startswith("bfloat16")
    x = x.to(torch.bfloat16 if bf16 else torch.float32)
    for grad in (True, False):
        torch._dynamo.reset()
        dynamic = spellings.dynamic_dims(s) if s.shapes == "dynamic" else ((), ())
        # lp[keep] has a data-dependent row count: Dynamo keeps it in the graph only when told to
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=s.selected_before):
            rec, out, ref, gx, gref = _run(fn, ref_fn, x, y, w, grad, dynamic)
        matches = [m for r in rec.results for m in r.matches]
        misses = [n for r in rec.results for n in r.near_misses]
        assert matches, f"not rewritten: {misses}\n{context}"
        calls = sum(fused_calls(gm) for gm in rec.graphs)
        if s.later:  # a call per way the labels are read, the target's apart from the label terms
            assert 1 <= calls <= s.calls + 2, f"{calls} op calls, expected 1 to {s.calls + 2}\n{context}"
        else:
            assert calls == s.calls, f"{calls} op calls, expected {s.calls}\n{context}"
        # the loss as the user's code returned it: same dtype, eager's value
        with torch.no_grad():
            eager = fn(x, y, w)
        assert out.dtype == eager.dtype, context
        assert ref.dtype == torch.float64, context
        # float32 math on the same values (a bfloat16 softcap or z term before the upcast
        # rounds each row, and the mean of the rows stays well within this)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{m}\n{context}")
        if grad:
            # a bfloat16 gradient: bfloat16 rounding of each entry, and of the gradient's scale
            # where partial gradients add up (one per op call)
            tol = dict(rtol=BF16_ROUNDING, atol=2 * BF16_ROUNDING * gref.abs().max().item()) if bf16 \
                else dict(rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gx.double(), gref, **tol, msg=lambda m: f"{m}\n{context}")
        ops, targets = rec.left()
        if s.kept == "graph_break":
            targets = []  # built before the break: the graph of the loss gets it as data
        # what the detector leaves beside the op, and only that, it says it left (or, where the
        # labels are read two ways, that the calls are one per way)
        partial = [n for n in misses if n.reason.startswith("rewritten in part")]
        unexpected = [n.reason for n in misses if not any(re.search(w, n.reason) for w in NEAR_MISSES)]
        assert not unexpected, f"near misses: {unexpected}\n{context}"
        assert bool(partial) == bool(ops or targets) or s.later and partial, \
            f"left: {ops or ''} {targets or ''}, near misses: {misses}\n{context}"
        if s.later and s.extra == "z_loss" and partial and ops <= {"logsumexp"} and not targets:
            return  # the z term left beside the op, and a near miss that says why
        if ops or targets:
            raise LeftInTheGraph(f"left in the graph: {ops or ''} {targets or ''} (near misses: {misses})\n{context}")


def test_spelling(draw):
    s = spellings.draw(random.Random(draw))
    check_spelling(s, draw, describe(draw, s))


# masked_fill over a flat batch, with a z-loss: what each case below changes
BASE = spellings.Spelling(logprobs="F", nll="gather", uniform="sum", convention="all", eps=0.1, mask="masked_fill",
                          labels="clamp", reduction="mean", order="rows", dtype="float32", layout="flat",
                          extra="z_loss", target="product", transpose="none", shapes="static", select="after")


@pytest.mark.parametrize("axes", [
    dict(convention="pad", mask="none"),
    dict(convention="pad", mask="boolean", reduction="token"),
], ids=lambda axes: "-".join(f"{k}={v}" for k, v in axes.items()))
def test_padding_column_with_its_rows_kept_and_a_z_term(axes):
    """Rows labelled with the padding class count (no mask, or one after the graph break): the
    label term (with the z term of the row) and the smooth term with its padding column are two
    calls, and nothing of the row stays beside them."""
    s = dataclasses.replace(BASE, **axes)
    assert s.calls == 2
    check_spelling(s, 0, f"{s}\n{s.source()}")


@pytest.mark.parametrize("axes", [
    dict(nll="arange"),
    dict(nll="arange", mask="none"),
    dict(nll="nll_none", mask="none"),
    dict(nll="nll_sum", mask="none", order="terms", reduction="sum"),
    dict(nll="nll_none", mask="boolean", reduction="token"),
], ids=lambda axes: "-".join(f"{k}={v}" for k, v in axes.items()))
def test_z_term_on_rows_the_label_term_drops(axes):
    """The z term counts on rows the label term drops (labels matching no class, or rows nll_loss
    ignores before any mask): it gets an op call of its own, and nothing stays in the graph."""
    s = dataclasses.replace(BASE, **axes)
    assert s.z_apart
    check_spelling(s, 0, f"{s}\n{s.source()}")


@pytest.mark.parametrize("axis", sorted(spellings.AXES))
def test_every_value_of_every_axis_is_drawn(axis):
    """The CI draws alone may miss a value; a few hundred draws (no compiling) cover them all."""
    seen = {getattr(spellings.draw(random.Random(i)), axis) for i in range(400)}
    assert seen == set(spellings.AXES[axis])


def _draws_with(axis: str, value, count: int) -> list[int]:
    """The first ``count`` draws with ``value`` on ``axis`` (the CI's few draws may have none)."""
    found = (i for i in range(10_000) if getattr(spellings.draw(random.Random(i)), axis) == value)
    return [next(found) for _ in range(count)]


@pytest.mark.parametrize("seed", _draws_with("kept", "buffer", 3) + _draws_with("kept", "graph_break", 3))
def test_target_kept_in_a_buffer_or_across_a_graph_break(seed):
    """A one-hot table in a module buffer, or a target built before a graph break, reaches the loss as
    data: a target given as a tensor, rewritten as one, equal to eager."""
    s = spellings.draw(random.Random(seed))
    check_spelling(s, seed, describe(seed, s))


@pytest.mark.xfail(raises=AssertionError, strict=True,
                   reason="a target given as data against (B, V, T) logits: the rewrite raises (target shape (2, 3, 11) "
                          "must equal the logits' shape (2, 11, 3)) and the loss is left as written")
@pytest.mark.parametrize("kept", ["buffer", "graph_break"])
def test_target_given_as_data_against_classes_at_dim_1(kept):
    # (B, V, T) logits, their log-probs transposed to (B, T, V) and a (B, T, V) target
    s = dataclasses.replace(BASE, nll="one_hot", layout="cd1", extra="none", transpose="classes_last",
                            kept=kept)
    check_spelling(s, 0, f"{s}\n{s.source()}")


def test_z_term_next_to_a_target_given_as_data():
    """The op counts a z term on the rows of its labels: next to a target given as a tensor alone it
    is left beside the op, and a near miss says so (the op once dropped it)."""
    def fn(x, t):
        lp = F.log_softmax(x, -1)
        return (-(t * lp).sum(-1) + 1e-4 * torch.logsumexp(x, dim=-1) ** 2).mean()

    t = torch.softmax(logits(N, V, seed=3), -1)
    rec = check(fn, logits(N, V), t, kept={"logsumexp"})
    assert [m.reason for m in rec.result.near_misses] == [
        "rewritten in part, the rest left as written: a z-loss term next to a target given as a tensor, with no label "
        "term to count its rows"]
