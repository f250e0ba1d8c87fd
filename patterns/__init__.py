"""Graph rewrites: find cross-entropy losses in FX graphs and replace them with smoothce ops.

``cross_entropy.rewrite_cross_entropy(gm)`` is the entry point (``analyze_cross_entropy(gm)`` the
read-only variant). It does not match spellings: every node gets a symbolic value, and a loss is
rewritten when its value is an instance of

    loss_i = sum_j q_ij (lse_i - x_ij) + c + z lse_i^2,   q_ij = a w[y_i] [j == y_i] + b w_j

term by term on the rows its masks keep, and nothing else reads the log-probs. By stage:

    nodes        what a node is: fake tensors, source lines, equal subexpressions
    ops          which torch calls mean the same operation, and their arguments by name
    algebra      the values (logits, labels, masks, per-class, per-row and reduced losses)
    interpret/   the abstract interpretation of a graph into those values: the walk and one
                 file per op family (softmax, losses, indexing, targets, arithmetic, ...)
    normal_form  is a value the op's form, and with which LossForm (kernels/form.py)
    analysis     the sinks, their cones, what the eager code would raise, near misses
    head         the linear layer behind the logits, fused into the loss
    emit         the op calls that replace a loss
    report       the records: Match (the LossForm and the exact coefficients), NearMiss
"""

if "." not in __name__:  # imported from a clone's root as a top-level module: _toplevel.py
    from smoothce._toplevel import step_aside

    step_aside(__name__, __file__)
