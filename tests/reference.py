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


def soft_reference(x, target=None, labels=None, weight=None, *, labels_b=None, lam=None, target_rows=None,
                   ignore_index=-100, reduction="mean", label_smoothing=0.0, smoothing="all", scale=0.0, kl=False,
                   z_loss=0.0, softcap=None, logit_scale=1.0, target_kind="probs", target_logit_scale=1.0,
                   soft_logit_scale=1.0, soft_label_smoothing=0.0, soft_scale=1.0, soft_kl=False, reverse_kl=0.0):
    """SoftTargetForm's and LossForm's loss written out densely in float64 from their words.

    The label part is ``reference`` per row on labels (and, for mixup, lam times it plus 1 - lam
    times it on labels_b), each reduced as PyTorch reduces it; the target part is

        soft_scale [-sum_j w_j ((1 - eps) q_j + eps / V) log p_j + soft_kl sum_j q_j log q_j]
        + reverse_kl sum_j p_j (log p_j - log q_j),   p = softmax(soft_logit_scale x)

    on target_rows (default: the rows whose label is kept; every row without labels), 'mean'
    dividing it by their number.
    """
    x = x.double() * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    V = x.shape[1]
    rows_shape = (x.shape[0],) + tuple(x.shape[2:])
    total = torch.zeros(rows_shape if reduction == "none" else (), dtype=torch.float64)
    words = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, smoothing=smoothing, scale=scale,
                 kl=kl, weight=weight)
    parts = [] if labels is None else [(labels, 1.0 if lam is None else lam.double())]
    if labels_b is not None:
        parts.append((labels_b, 1.0 - lam.double()))
    for y, mix in parts:
        ce = reference(x, y, reduction="none", **words)  # x already transformed
        zl = z_loss * torch.logsumexp(x, 1) ** 2 * (y != ignore_index)
        mix = torch.broadcast_to(torch.as_tensor(mix, dtype=torch.float64), rows_shape)
        if reduction == "none":
            total = total + mix * (ce + zl)
        elif reduction == "sum":
            total = total + (mix * (ce + zl)).sum()
        else:
            w = torch.ones(V, dtype=torch.float64) if weight is None else weight.double()
            keep = y != ignore_index
            wy = torch.where(keep, w[torch.where(keep, y, 0)], 0.0)
            total = total + (mix * ce).sum() / wy.sum() + ((mix * zl).sum() / keep.sum() if z_loss else 0.0)
    if target is None:
        return total
    s = soft_logit_scale * x
    logp = torch.log_softmax(s, 1)
    t = target.double()
    if target_kind == "probs":
        q, log_q, ent = t, t.log(), torch.special.xlogy(t, t)
    elif target_kind == "log_probs":
        q, log_q = t.exp(), t
        ent = q * log_q
    else:
        log_q = torch.log_softmax(target_logit_scale * t, 1)
        q = log_q.exp()
        ent = q * log_q
    w = torch.ones(V, dtype=torch.float64) if weight is None else weight.double()
    w = w.view((1, V) + (1,) * (x.dim() - 2))
    eps = soft_label_smoothing
    soft = -(w * ((1 - eps) * q + eps / V) * logp).sum(1)
    if soft_kl:
        soft = soft + ent.sum(1)
    soft = soft_scale * soft
    if reverse_kl:
        soft = soft + reverse_kl * (logp.exp() * (logp - log_q)).sum(1)
    if target_rows is None:
        target_rows = labels != ignore_index if labels is not None else torch.ones(rows_shape, dtype=torch.bool)
    soft = torch.where(target_rows, soft, 0.0)
    if reduction == "none":
        return total + soft
    if reduction == "sum":
        return total + soft.sum()
    return total + soft.sum() / target_rows.sum()
