"""A seeded generator of losses against a distribution: soft targets, distillation, mixup.

Where ``spellings`` writes cross-entropies against labels, this writes what a person writes to
train against a target distribution. Each draw picks a value on every axis and writes the loss
as Python source; ``draw`` moves an axis where PyTorch rules a pair out.

    target       probabilities given as data | a teacher's softmax (logits at a temperature) |
                 a teacher's log_softmax passed to kl_div(log_target=True) | timm's mixup target
                 (two smoothed one-hots mixed by lam)
    divergence   F.cross_entropy(x, p) | -(p * log_softmax(x)).sum(-1) | F.kl_div(log_softmax(x), p)
                 | a KL written by hand, p * (log p - log_softmax(x))
    temperature  1 | 2, on the student and the teacher, the divergence times T ** 2
    labels       none | a cross-entropy on the labels beside it (alpha and 1 - alpha) | mixup of two
                 label cross-entropies with a tensor lam (no target distribution then)
    reduction    mean over rows | sum | per row, then the mean | kl_div's batchmean
    layout       (N, V) | (B, T, V) flattened to rows | (B, T, V) kept
    dtype        float32 | bfloat16 logits upcast with .float()

``Spelling.source("float64")`` is the same program upcasting to float64 (the reference).
"""

from __future__ import annotations

import dataclasses
import random
import textwrap

AXES = {
    "target": ["probs", "teacher", "log_target", "mixup_target"],
    "divergence": ["cross_entropy", "by_hand", "kl_div", "kl_by_hand"],
    "temperature": [1.0, 2.0],
    "labels": ["none", "beside", "mixup"],
    "reduction": ["mean", "sum", "rows_mean", "batchmean"],
    "layout": ["flat", "flattened", "bt"],
    "dtype": ["float32", "bfloat16"],
}

N, B, T, V = 6, 2, 3, 11
ALPHA, LAM, EPS = 0.3, 0.7, 0.1


@dataclasses.dataclass(frozen=True)
class Spelling:
    target: str
    divergence: str
    temperature: float
    labels: str
    reduction: str
    layout: str
    dtype: str

    @property
    def kl(self) -> bool:
        return self.divergence in ("kl_div", "kl_by_hand")

    @property
    def near_miss(self):
        """The reason the detector gives for leaving the loss (or part of it) as written, the start
        of it; None where it is rewritten whole."""
        if self.labels == "mixup":
            return None
        if self.divergence == "kl_by_hand" and self.target != "teacher":
            # p.log() of a target given as data: "log at ... and log-probs are added"
            return "log at "
        if self.target == "mixup_target" and (self.divergence == "kl_div"
                                              or self.labels == "beside" and self.layout != "bt"):
            # timm's target is two one-hots: the op reads one label tensor (or a mixup of label
            # cross-entropies), and a KL against it has their entropy too. (A (B, T, V) target
            # next to the labels' cross-entropy of x.view(-1, V) is read as data: two calls.)
            return ("rewritten in part, the rest left as written: " if self.labels == "beside" and not self.kl
                    else "") + "the loss reads two label tensors"
        if self.divergence == "kl_div" and self.reduction == "rows_mean":
            return "kl_div(reduction='none') against a target given as a tensor"
        return None

    def source(self, upcast: str = "float32") -> str:
        """``loss_fn(x, t, y, y2)``: student logits x, teacher logits t (or probabilities), labels y
        and y2 (mixup's second labels)."""
        lines = ["def loss_fn(x, t, y, y2):"]
        add = lines.append
        if self.layout == "flattened":
            add(f"    x, t, y, y2 = x.view(-1, {V}), t.view(-1, {V}), y.view(-1), y2.view(-1)")
        if self.dtype == "bfloat16":
            add("    x = " + {"float32": "x.float()", "float64": "x.double()"}[upcast])
        xr, yr, y2r = ("x", "y", "y2") if self.layout != "bt" else (f"x.view(-1, {V})", "y.view(-1)", "y2.view(-1)")
        if self.labels == "mixup":
            # two label cross-entropies mixed by a tensor lam: no target distribution at all
            red = {"sum": "sum"}.get(self.reduction, "mean")
            add(f"    lam = torch.tensor({LAM}, dtype=x.dtype)")
            add(f"    return (lam * F.cross_entropy({xr}, {yr}, reduction='{red}', label_smoothing={EPS})"
                f" + (1 - lam) * F.cross_entropy({xr}, {y2r}, reduction='{red}', label_smoothing={EPS}))")
            return "\n".join(lines) + "\n"
        temp = self.temperature
        xs = "x" if temp == 1 else f"x / {temp}"
        ts = "t" if temp == 1 else f"t / {temp}"
        if self.target == "probs":
            add("    p = t  # probabilities given as data")
        elif self.target == "teacher":
            add(f"    p = F.softmax({ts}, dim=-1)")
        elif self.target == "log_target":
            add(f"    log_p = F.log_softmax({ts}, dim=-1)")
        else:  # timm's mixup target: smoothed one-hots of y and of y2, mixed by lam
            off, on = f"{EPS} / {V}", f"1 - {EPS} + {EPS} / {V}"
            add(f"    y1 = torch.full_like(x, {off}).scatter_(-1, y.unsqueeze(-1), {on})")
            add(f"    y2_ = torch.full_like(x, {off}).scatter_(-1, y2.unsqueeze(-1), {on})")
            add(f"    p = {LAM} * y1 + (1 - {LAM}) * y2_")
        rows = "x.shape[0]" if self.layout != "bt" else f"{B}"
        div = self._divergence(xs, rows)
        add(f"    soft = {div}")
        if temp != 1:
            add(f"    soft = soft * {temp} ** 2")
        if self.labels == "beside":
            add(f"    ce = F.cross_entropy({xr}, {yr})")
            add(f"    return {ALPHA} * ce + (1 - {ALPHA}) * soft")
        else:
            add("    return soft")
        return "\n".join(lines) + "\n"

    def _divergence(self, xs: str, rows: str) -> str:
        lp = f"F.log_softmax({xs}, dim=-1)"
        r = self.reduction
        target = "log_p" if self.target == "log_target" else "p"
        if self.divergence == "kl_div":
            log_target = ", log_target=True" if self.target == "log_target" else ""
            if r == "rows_mean":
                return f"F.kl_div({lp}, {target}, reduction='none'{log_target}).sum(-1).mean()"
            return f"F.kl_div({lp}, {target}, reduction='{r}'{log_target})"
        if self.divergence == "cross_entropy":
            x = xs if self.layout != "bt" else f"({xs}).transpose(1, 2)"
            p = target if self.layout != "bt" else f"{target}.transpose(1, 2)"
            if r == "rows_mean":
                return f"F.cross_entropy({x}, {p}, reduction='none').mean()"
            return f"F.cross_entropy({x}, {p}, reduction='{r}')"
        if self.divergence == "by_hand":
            row = f"-({target} * {lp}).sum(-1)"
        else:  # KL by hand, as the distillation tutorial writes it: p (log p - log q)
            row = f"({target} * ({target}.log() - {lp})).sum(-1)"
        return {"mean": f"{row}.mean()", "rows_mean": f"{row}.mean()", "sum": f"{row}.sum()",
                "batchmean": f"{row}.sum() / {rows}"}[r]


def draw(rng: random.Random) -> Spelling:
    c = {axis: rng.choice(values) for axis, values in AXES.items()}
    # -- what PyTorch rules out ------------------------------------------------------------------
    if c["divergence"] == "cross_entropy" and c["reduction"] == "batchmean":
        c["reduction"] = "mean"  # cross_entropy has no batchmean (its mean divides by the rows)
    if c["divergence"] == "kl_div" and c["reduction"] == "mean":
        # kl_div's 'mean' divides by every element, not by the rows: a warning in PyTorch, and a
        # loss V times too small; people write batchmean
        c["reduction"] = "batchmean"
    if c["target"] == "log_target" and c["divergence"] != "kl_div":
        c["target"] = "teacher"  # log_target is kl_div's keyword
    if c["target"] == "mixup_target":
        c["temperature"] = 1.0  # a data target at a temperature is the teacher's
    if c["layout"] == "bt" and c["divergence"] == "kl_div" and c["reduction"] == "batchmean":
        c["reduction"] = "sum"  # batchmean of (B, T, V) divides by B: drawn flattened instead
    # -- what the detector leaves alone without saying so -----------------------------------------
    if c["layout"] == "bt" and c["divergence"] == "cross_entropy" and c["target"] == "teacher":
        # F.cross_entropy(x.transpose(1, 2), softmax(t).transpose(1, 2)): the teacher's softmax
        # stays in the graph and reaches the op as data, and no near miss says so
        c["layout"] = "flattened"
    return Spelling(**c)


def inputs(s: Spelling, seed: int):
    """(x, t, y, y2): student logits, teacher logits (a distribution per row for 'probs'), labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (N, V) if s.layout == "flat" else (B, T, V)
    x = torch.randn(*shape, generator=g) * 2
    t = torch.randn(*shape, generator=g) * 2
    if s.target == "probs":
        t = torch.softmax(t, -1)
        if s.divergence != "kl_by_hand":  # p.log() of a zero is -inf, and 0 * -inf nan in eager
            t[..., 1] = 0.0  # exact zeros: kl_div's 0 log 0 = 0
            t = t / t.sum(-1, keepdim=True)
    y = torch.randint(0, V, shape[:-1], generator=g)
    y2 = torch.randint(0, V, shape[:-1], generator=g)
    return x, t, y, y2


def function(s: Spelling, upcast: str = "float32"):
    import torch
    import torch.nn.functional as F

    namespace = {"torch": torch, "F": F}
    exec(compile(s.source(upcast), f"<soft spelling {textwrap.shorten(repr(s), 60)}>", "exec"), namespace)
    return namespace["loss_fn"]
