"""The detector's algebra and normal form on values built by hand: no graph is traced or compiled.

Nodes of a small FX graph stand for the tensors (logits, labels, a class weight); their
``meta['val']`` gives the shapes the normal form reads.
"""

from fractions import Fraction as Q

import pytest
import torch
import torch.fx

from smoothce.patterns.algebra import (
    CondAtom, Divisor, DivisorV, ElemV, LabelV, Logits, Reject, RowV, ScalarV, WeightAtV, add, constant,
    divide, elem_class_sum, elem_column, elem_gather, elem_mul, log_probs, row_times_row, row_times_weight_at,
    scale, simplify, with_conds,
)
from smoothce.patterns.normal_form import normal_form

N, V = 6, 11


@pytest.fixture
def g():
    graph = torch.fx.Graph()
    nodes = {}
    for name, val in (("x", torch.empty(N, V)), ("y", torch.empty(N, dtype=torch.long)),
                      ("w", torch.empty(V)), ("m", torch.empty(N, dtype=torch.bool)), ("t", torch.empty(()))):
        nodes[name] = graph.placeholder(name)
        nodes[name].meta["val"] = val
    return nodes


def key(g):
    return Logits(g["x"], cd=-1)


def lab(g):
    return LabelV(g["y"], node=g["y"])


def ne(g, k):
    return CondAtom(("ne", g["y"], k))


def one_hot(g, coef=1, conds=frozenset()):
    return ElemV(None, -1, (((("OH", lab(g)), "K", conds), Q(coef)),))


def smoothed_ce_row(g, eps, conds=frozenset()):
    """-sum_j q_j lp_j with q = (1 - eps) one_hot + eps / V, built as the interpreter builds it."""
    q = add(scale(one_hot(g), 1 - eps), constant(eps / V, -1))
    row = scale(elem_class_sum(elem_mul(q, log_probs(key(g))), V), Q(-1))
    return with_conds(row, conds)


# ------------------------------------------------------------------------------------------------
# Row conditions
# ------------------------------------------------------------------------------------------------


def test_a_condition_and_its_negation_keep_no_row(g):
    assert simplify(frozenset({ne(g, 3), ne(g, 3).negated()})) is None


def test_labels_equal_to_k_decide_other_label_comparisons(g):
    eq3 = ne(g, 3).negated()
    assert simplify(frozenset({eq3, ne(g, -100)})) == frozenset({eq3})  # 3 != -100: implied
    assert simplify(frozenset({eq3, ne(g, 5).negated()})) is None  # y == 3 and y == 5
    assert simplify(frozenset({eq3, CondAtom(("lt", g["y"], 0))})) is None  # y == 3 and y < 0


def test_masking_twice_is_one_mask_and_contradictions_vanish(g):
    row = RowV.make(key(g), {("LSE",): Q(1)})
    twice = with_conds(with_conds(row, frozenset({ne(g, 1)})), frozenset({ne(g, 1)}))
    assert twice == with_conds(row, frozenset({ne(g, 1)}))
    assert with_conds(twice, frozenset({ne(g, 1).negated()})).terms == ()


# ------------------------------------------------------------------------------------------------
# Linear algebra
# ------------------------------------------------------------------------------------------------


def test_log_probs_at_the_label_are_lse_minus_the_logit(g):
    row = elem_gather(log_probs(key(g)), lab(g))
    assert row.tdict == {(("XG", lab(g)), frozenset()): 1, (("LSE",), frozenset()): -1}


def test_class_sum_of_log_probs(g):
    row = elem_class_sum(log_probs(key(g)), V)
    assert row.tdict == {(("XS",), frozenset()): 1, (("LSE",), frozenset()): -V}


def test_smoothed_target_coefficients_are_exact(g):
    row = smoothed_ce_row(g, Q(0.1))
    d = row.tdict
    assert d[(("XG", lab(g)), frozenset())] == -(1 - Q(0.1))
    assert d[(("XS",), frozenset())] == -Q(0.1) / V
    assert d[(("LSE",), frozenset())] == 1  # the target's mass


def test_a_one_hot_meets_a_fixed_column_only_where_the_label_is_that_class(g):
    col = ElemV(None, -1, (((("COL", 0), "K", frozenset()), Q(1)),))
    prod = elem_mul(one_hot(g), col)
    assert prod.tdict == {(("COL", 0), "K", frozenset({ne(g, 0).negated()})): 1}
    other = ElemV(None, -1, (((("COL", 1), "K", frozenset()), Q(1)),))
    assert elem_mul(col, other).terms == ()


def test_a_product_of_two_log_prob_tensors_is_rejected(g):
    with pytest.raises(Reject, match="not linear"):
        elem_mul(log_probs(key(g)), log_probs(key(g)))


def test_two_label_tensors_in_one_target_name_mixup(g):
    y2 = LabelV(g["m"], node=g["m"])
    with pytest.raises(Reject, match="mixup"):
        elem_mul(one_hot(g), ElemV(None, -1, (((("OH", y2), "K", frozenset()), Q(1)),)))


def test_a_column_of_log_probs(g):
    row = elem_column(log_probs(key(g)), 4)
    assert row.tdict == {(("XC", 4), frozenset()): 1, (("LSE",), frozenset()): -1}


def test_class_weights_pair_logits_and_lse_into_weighted_atoms(g):
    wy = WeightAtV(g["w"], lab(g))
    row = row_times_weight_at(scale(elem_gather(log_probs(key(g)), lab(g)), Q(-1)), wy)
    assert row.tdict == {(("WG", lab(g), g["w"]), frozenset()): -1}
    with pytest.raises(Reject, match="w\\[y\\] multiplies something other"):
        row_times_weight_at(RowV.make(key(g), {("LSE",): Q(1)}), wy)


def test_lse_squared_is_the_z_term(g):
    lse = RowV.make(key(g), {("LSE",): Q(1)}, frozenset({ne(g, -100)}))
    assert row_times_row(lse, lse).tdict == {(("Z",), frozenset({ne(g, -100)})): 1}


def test_reduced_terms_add_by_divisor(g):
    count = Divisor(("count", frozenset({ne(g, -100)})))
    a = divide(ScalarV.of(RowV.make(key(g), {("LSE",): Q(1)})), DivisorV(count, Q(2)))
    b = divide(ScalarV.of(RowV.make(key(g), {("LSE",): Q(3)})), DivisorV(count))
    summed = add(a, b)
    assert [(d, r.tdict) for d, r in summed.parts] == [(count, {(("LSE",), frozenset()): Q(7, 2)})]
    c = ScalarV.of(RowV.make(key(g), {("LSE",): Q(1)}), Divisor(("rows",)))
    assert len(add(summed, c).parts) == 2  # another divisor: a part of its own


# ------------------------------------------------------------------------------------------------
# The normal form
# ------------------------------------------------------------------------------------------------


def test_cross_entropy_with_label_smoothing(g):
    row = smoothed_ce_row(g, Q(0.1), frozenset({ne(g, -100)}))
    _, (call,) = normal_form(ScalarV.of(row, Divisor(("count", frozenset({ne(g, -100)})))))
    assert call.form.describe() == {"ignore_index": -100, "reduction": "mean", "label_smoothing": 0.1}
    assert (call.target.node, call.target.fold, call.uniform_rows) == (g["y"], frozenset(), None)


def test_eps_over_v_minus_one_is_named_by_its_constant(g):
    eps = Q(0.1)
    nll = scale(elem_gather(log_probs(key(g)), lab(g)), Q(-1))
    smooth = scale(elem_class_sum(log_probs(key(g)), V), Q(-1))
    row = add(scale(nll, 1 - eps - eps / (V - 1)), scale(smooth, eps / (V - 1)))
    _, (call,) = normal_form(row)
    assert (call.form.label_smoothing, call.form.smoothing, call.reduction) == (0.1, "others", "none")


def test_a_label_term_masked_by_ignore_index_next_to_an_unmasked_uniform_term(g):
    nll = with_conds(scale(elem_gather(log_probs(key(g)), lab(g)), Q(-1)), frozenset({ne(g, -100)}))
    smooth = scale(elem_class_sum(log_probs(key(g)), V), Q(-1, V))
    _, (call,) = normal_form(ScalarV.of(add(scale(nll, Q(0.9)), scale(smooth, Q(0.1)))))
    assert call.uniform_rows == frozenset() and call.target.ignore == -100 and call.reduction == "sum"


def test_labels_read_mod_the_classes_fold_their_mask_after_the_wrap(g):
    # take_along_dim reads y mod V: "y != -100" cannot be the op's ignore_index on the wrapped labels,
    # it folds in as where(y != -100, y mod V, -100)
    y = LabelV(g["y"], wrap="mod", node=g["y"])
    nll = scale(elem_gather(log_probs(key(g)), y), Q(-1))
    _, (call,) = normal_form(ScalarV.of(nll))
    assert (call.target.wrap, call.target.ignore, call.target.fold) == ("mod", None, frozenset())
    _, (call,) = normal_form(ScalarV.of(with_conds(nll, frozenset({ne(g, -100)}))))
    assert (call.target.wrap, call.target.ignore, call.target.fold) == ("mod", -100, frozenset({ne(g, -100)}))


def test_a_term_minus_its_masked_copy_is_the_term_on_the_other_rows(g):
    nll = scale(elem_gather(log_probs(key(g)), lab(g)), Q(-1))
    row = add(nll, with_conds(nll, frozenset({ne(g, 7).negated()})), Q(-1))  # nll - nll * (y == 7)
    _, (call,) = normal_form(row)
    assert call.target.ignore == 7


def test_a_padding_column_is_a_class_weight_of_zero(g):
    # eps / (V - 2) on every class but the label and class 0, rows labelled 0 dropped
    eps = Q(0.1)
    lp = log_probs(key(g))
    nll = scale(elem_gather(lp, lab(g)), Q(-1))
    others = add(scale(elem_class_sum(lp, V), Q(-1)), elem_column(lp, 0))
    row = with_conds(add(scale(nll, 1 - eps - eps / (V - 2)), scale(others, eps / (V - 2))),
                     frozenset({ne(g, 0)}))
    _, (call,) = normal_form(row)
    assert call.columns == ((0, 0),) and call.target.ignore == 0


def test_a_padding_column_with_its_rows_kept_is_two_calls(g):
    # rows labelled 0 count: the op would weigh their label term by column 0's weight 0, so the
    # label term (with the z term) is one call and the smooth term with its padding column another
    lp = log_probs(key(g))
    others = add(scale(elem_class_sum(lp, V), Q(-1)), elem_column(lp, 0))
    row = add(add(scale(elem_gather(lp, lab(g)), Q(-1)), scale(others, Q(1, 100))),
              RowV.make(key(g), {("Z",): Q(1, 10000)}))
    _, (label, smooth) = normal_form(row)
    assert (label.a, label.b, label.z, label.columns, label.target.ignore) == (1, 0, Q(1, 10000), (), None)
    assert (smooth.a, smooth.b, smooth.z, smooth.columns) == (0, Q(1, 100), 0, ((0, 0),))


def test_lse_that_is_not_the_target_mass_is_not_log_probs(g):
    row = RowV.make(key(g), {("XG", lab(g)): Q(-1), ("LSE",): Q(2)})
    with pytest.raises(Reject, match="not log-probs"):
        normal_form(row)


def test_a_z_term_on_other_rows_than_the_label_term_gets_its_own_call(g):
    row = add(smoothed_ce_row(g, Q(0), frozenset({ne(g, -100)})), RowV.make(key(g), {("Z",): Q(1, 10000)}))
    _, (ce, z) = normal_form(row)
    assert (ce.a, ce.z, ce.target.ignore) == (1, 0, -100)
    assert (z.a, z.b, z.z, z.target.node, z.target.fold) == (0, 0, Q(1, 10000), None, frozenset())


def test_a_z_loss_alone_is_left_as_written(g):
    with pytest.raises(Reject, match="z-loss alone"):
        normal_form(RowV.make(key(g), {("Z",): Q(1)}))


def test_a_mean_per_term_is_one_call(g):
    # nll_loss's mean over the rows it keeps next to a smoothing term averaged over every row:
    # the op's 'mean' with uniform_rows (all rows) divides each term by its own rows
    nll = with_conds(scale(elem_gather(log_probs(key(g)), lab(g)), Q(-1)), frozenset({ne(g, -100)}))
    smooth = scale(elem_class_sum(log_probs(key(g)), V), Q(-1, V))
    value = add(ScalarV.of(scale(nll, Q(0.9)), Divisor(("count", frozenset({ne(g, -100)})))),
                ScalarV.of(scale(smooth, Q(0.1)), Divisor(("rows",))))
    _, (call,) = normal_form(value)
    assert (call.reduction, call.uniform_rows, call.divisor) == ("mean", frozenset(), None)
    assert (call.form.label_smoothing, call.form.smoothing, call.form.ignore_index) == (0.1, "all", -100)


def test_terms_with_different_divisors_are_one_call_each(g):
    # the label term over a count the caller passes, the smoothing term over the rows
    nll = with_conds(scale(elem_gather(log_probs(key(g)), lab(g)), Q(-1)), frozenset({ne(g, -100)}))
    smooth = scale(elem_class_sum(log_probs(key(g)), V), Q(-1, V))
    value = add(ScalarV.of(nll, Divisor(("expr", g["t"]), g["t"])),
                ScalarV.of(scale(smooth, Q(0.1)), Divisor(("rows",))))
    _, calls = normal_form(value)
    assert [(c.reduction, c.a != 0, c.b != 0) for c in calls] == [("sum", True, False), ("mean", False, True)]


def test_a_target_with_uniform_term_only_as_a_loss_of_no_label(g):
    # (U * lp) summed: no label term, the smoothing term alone
    row = scale(elem_class_sum(elem_mul(constant(Q(1, V), -1), log_probs(key(g))), V), Q(-1))
    _, (call,) = normal_form(row)
    assert call.label is None and call.form.label_smoothing == 1.0
