"""The abstract interpretation of a Dynamo torch-IR graph into the values of :mod:`algebra`.

Every node is visited once, in graph order (``interpretation.py``: the walk, and ``MEANING``, the
table from an op's name to the function that gives it meaning). Each file below gives meaning to
one family of ops:

    softmax           log_softmax, softmax, log, exp, logsumexp
    logits            the logits behind them: upcasts, a temperature, a softcap, views
    losses            F.cross_entropy, F.nll_loss, F.kl_div
    indexing          gather, take_along_dim, index_select, select, [] (lp[arange(n), y], w[y])
    targets           one_hot, full / zeros / ones (and _like, new_), fill_, torch.tensor, arange,
                      expand, scatter, item assignment, index_fill, clone
    arithmetic        neg, add, sub, mul, div, pow, square, matmul
    reductions        sum, mean, count_nonzero
    masks             comparisons, ~ and &, where, masked_fill, clamp of labels
    views_and_casts   reshape / view, squeeze, unsqueeze, flatten, transpose, permute, contiguous,
                      casts, detach
    inplace           who sees the value an in-place op (masked_fill_, scatter_, t[i] = c, ...) writes
    arguments         dims, shapes and constants as every family reads them
"""

from smoothce.patterns.interpret.interpretation import MEANING, Interpretation

__all__ = ["Interpretation", "MEANING"]
