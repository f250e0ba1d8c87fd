"""Graph rewrites: detect cross-entropy losses in FX graphs and replace them with smoothce ops.

``cross_entropy.rewrite_cross_entropy(gm)`` is the entry point (``analyze_cross_entropy(gm)`` the
read-only variant). It does not match spellings: ``interpret`` gives every node a symbolic value
(``algebra``): log-probs ``x - lse``, gathers at the labels, class sums, target distributions
built from the labels, row masks, reductions, with exact rational coefficients. A loss is
rewritten when its value is an instance of

    loss_i = sum_j q_ij (lse_i - x_ij) + c + z lse_i^2,   q_ij = a w[y_i] [j == y_i] + b w_j

on the rows a mask keeps, and nothing else reads the log-probs. ``report`` holds the records.
"""
