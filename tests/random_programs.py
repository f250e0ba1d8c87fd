"""Random programs over logits, labels, a row mask and class weights, most of them not a loss.

Where ``spellings`` writes cross-entropies, this writes anything: log-probs, per-row values and
reductions combined by a random choice of operations (products of log-probs, exp, sigmoid, max,
masks, in-place changes, casts, nested losses). The detector must neither fail on them nor
change what they compute.
"""

from __future__ import annotations

import random

N, V = 6, 11

LOG_PROBS = ["F.log_softmax(x, -1)", "x - torch.logsumexp(x, -1, keepdim=True)", "torch.log(torch.softmax(x, -1))",
             "x.float().log_softmax(-1)", "F.log_softmax(x / 2.0, dim=-1)", "F.log_softmax(x, 0)"]
# e: a per-class tensor, r: a per-row tensor, s: a scalar
PER_ROW = ["-{e}.gather(1, y.clamp(min=0)[:, None]).squeeze(1)", "{e}.sum(-1)", "-{e}.mean(-1)", "{e}[:, {k}]",
           "F.nll_loss({e}, y, reduction='none')", "{e}.amax(-1)", "(F.one_hot(y.clamp(min=0), V) * {e}).sum(-1)",
           "torch.logsumexp({e}, -1)", "F.cross_entropy({e}, y, reduction='none', label_smoothing=0.1)",
           "({e} * w).sum(-1)", "-{e}[torch.arange(N), y.clamp(min=0)]"]
PER_CLASS = ["{e} * 0.5", "{e} + 1.0", "-{e}", "{e}.exp()", "{e}.clamp(min=-5)", "{e} * {e2}",
             "{e}.masked_fill(~m[:, None], 0.0)", "torch.where(m[:, None], {e}, 0.0)", "{e} * w",
             "torch.full_like({e}, 0.01).scatter(1, y.clamp(min=0)[:, None], 0.9) * {e}", "{e}.detach()",
             "{e}.transpose(0, 1).transpose(0, 1)", "{e}.view(N, V)", "{e}.clone()", "{e}.double()",
             "{e}.contiguous()", "{e}[:, :V]", "F.kl_div({e}, torch.full_like({e}, 1.0 / V), reduction='none')"]
# a loss per row from log-probs of its own (what the detector rewrites); y holds -100 on row 1, so
# the ones reading every label raise in eager (gather and indexing reject it, nll_loss ignores it)
LOSSES = ["F.cross_entropy(x, y, reduction='none', label_smoothing=0.1)", "F.cross_entropy(x, y.clamp(min=0), reduction='none')",
          "-F.log_softmax(x, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)",
          "F.nll_loss(F.log_softmax(x, -1), y, reduction='none')",
          "-(torch.full_like(x, 0.01).scatter(1, y.clamp(min=0)[:, None], 0.9) * F.log_softmax(x, -1)).sum(-1)",
          "-x.log_softmax(-1).sum(-1)", "-F.log_softmax(x, -1).gather(1, y[:, None]).squeeze(1)",
          "-F.log_softmax(x, -1)[torch.arange(N), y]"]
ROWS = ["{r} + {r2}", "{r} * 0.3 - {r2}", "{r} * {r2}", "{r} * m", "{r}.masked_fill(~m, 0.0)",
        "torch.where(m, {r}, torch.zeros_like({r}))", "{r}.exp()", "{r}.abs()", "{r} ** 2", "torch.sigmoid({r})",
        "{r} * w[y.clamp(min=0)]", "{r}.float()", "{r} / 3.0", "{r} + 1.0", "{r}.clamp(max=10.0)",
        "{r}.view(2, 3).view(-1)", "{r}.detach()", "{r}.unsqueeze(1).squeeze(1)", "torch.stack([{r}, {r2}]).sum(0)",
        "{r}.neg()"]
SCALARS = ["{r}.sum()", "{r}.mean()", "{r}.sum() / m.sum()", "({r} * m).sum() / m.sum().clamp(min=1)", "{r}.sum() / N",
           "{r}.max()", "{r}.sum() / {r}.numel()", "F.nll_loss({e}, y)", "{r}.logsumexp(0)",
           "F.kl_div({e}, torch.full_like({e}, 1.0 / V), reduction='batchmean')", "{r}.sum() / m.float().sum()"]


def program(seed: int) -> str:
    """The source of ``f(x, y, m, w)`` for one seed."""
    rng = random.Random(seed)
    lines, kinds = ["def f(x, y, m, w):"], {"e": [], "r": [], "s": []}

    def add(kind, template):
        name = f"{kind}{sum(map(len, kinds.values())) + 1}"
        e, r = rng.choice(kinds["e"] or ["x"]), rng.choice(kinds["r"] or ["x[:, 0]"])
        expr = template.format(e=e, e2=rng.choice(kinds["e"] or ["x"]), r=r, r2=rng.choice(kinds["r"] or [r]),
                               k=rng.randrange(V))
        lines.append(f"    {name} = {expr}")
        kinds[kind].append(name)
        return name

    add("e", rng.choice(LOG_PROBS))
    for _ in range(rng.randint(2, 8)):
        roll = rng.random()
        if roll < 0.25 or not kinds["r"]:
            add("r", rng.choice(PER_ROW if rng.random() < 0.5 else LOSSES))
        elif roll < 0.4:
            add("e", rng.choice(PER_CLASS))
        elif roll < 0.7:
            add("r", rng.choice(ROWS))
        else:
            s = add("s", rng.choice(SCALARS))
            if len(kinds["s"]) > 1 and rng.random() < 0.5:
                add("s", f"{s} + 0.5 * {rng.choice(kinds['s'])}")
    outs = kinds["s"][-1:] or kinds["r"][-1:]
    if rng.random() < 0.2:  # something else returned too
        outs.append(rng.choice(kinds["e"] + kinds["r"]))
    lines.append(f"    return {', '.join(outs)},")
    return "\n".join(lines) + "\n"


def inputs(seed: int):
    """(x, y, m, w): logits, labels with one -100, the mask of real labels, class weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = -100
    return x, y, y != -100, torch.rand(V, generator=g) + 0.5


def function(seed: int):
    import torch
    import torch.nn.functional as F

    namespace = {"torch": torch, "F": F, "N": N, "V": V}
    exec(compile(program(seed), f"<random program {seed}>", "exec"), namespace)
    return namespace["f"]
