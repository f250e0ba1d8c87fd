"""LossForm's loss written out densely in float64 from its words: the reference of the op's tests."""

import torch
import torch.nn.functional as F


def reference(x, y, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, smoothing="all",
              scale=1.0, kl=False, z_loss=0.0, softcap=None, logit_scale=1.0, uniform_rows=None):
    """LossForm's loss written out densely in float64 from its words.

    The target distribution puts 1 - eps on the label and spreads eps over all V classes
    ("all") or the V - 1 others ("others"); its label part counts on rows whose label is not
    ignore_index, its uniform part on uniform_rows (default: the same rows). 'mean' divides the
    label part by the sum of w[y] over its rows and, given uniform_rows, the uniform part by their
    number (one term averaged over every row next to nll_loss's mean over the rows it keeps).
    """
    x = x.double() * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    x = x.movedim(1, -1)  # (..., V)
    V = x.shape[-1]
    w = torch.ones(V, dtype=torch.float64) if weight is None else weight.double()
    label_rows = y != ignore_index if ignore_index is not None else torch.ones_like(y, dtype=torch.bool)
    own_rows = uniform_rows is not None
    uniform_rows = label_rows if uniform_rows is None else uniform_rows
    y_safe = torch.where(label_rows, y, 0)
    onehot = F.one_hot(y_safe, V).double()
    eps = label_smoothing
    per_class = eps / V if smoothing == "all" else eps / (V - 1)
    on_label = 1 - eps if smoothing == "all" else 1 - eps - per_class  # plus per_class from the uniform part
    lse = torch.logsumexp(x, -1)
    logp = x - lse.unsqueeze(-1)
    ce = -on_label * w[y_safe] * (onehot * logp).sum(-1) * label_rows
    smooth = -per_class * (w * logp).sum(-1) * uniform_rows
    if kl:
        q = on_label * onehot + per_class
        ce = ce + torch.special.xlogy(q, q).sum(-1) * label_rows
    ce, smooth = scale * ce, scale * smooth
    zl = z_loss * lse * lse * label_rows
    if reduction == "none":
        return ce + smooth + zl
    if reduction == "sum":
        return ce.sum() + smooth.sum() + zl.sum()
    label_mean = ce.sum() / (w[y_safe] * label_rows).sum() + (zl.sum() / label_rows.sum() if z_loss else 0.0)
    if own_rows:
        return label_mean + smooth.sum() / uniform_rows.sum()
    return label_mean + smooth.sum() / (w[y_safe] * label_rows).sum()
