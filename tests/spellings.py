"""A seeded generator of hand-written (label-smoothed) cross-entropy losses.

Each draw picks one value on every axis below and writes the loss as Python source, the way a
person would write it. The axes are independent except where PyTorch itself rules a pair out
(advanced indexing needs 2-D log-probs, nll_loss takes classes at dim 1, ...): ``draw`` then
moves the later axis to a value that works, so every draw is a valid program.

    logprobs     F.log_softmax | torch.log_softmax | method | x - logsumexp | log(softmax)
    nll          gather | nll_loss none/sum/mean | one_hot | index | scatter | arange ==
    uniform      sum | mean * V | @ ones | * ones_like
    convention   eps/V | eps/(V-1) | eps/(V-2) with a padding column left out
    eps          0, 0.05, 0.1, 0.3
    mask         none | masked_fill | where 0 | where zeros_like | * bool | * float | boolean indexing
    labels       how masked labels are made safe to gather: clamp | where | masked_fill
    reduction    mean | sum | per-token count | per sequence then batch
    order        terms combined per row, then reduced | each term reduced, then combined
    dtype        float32 | bfloat16 + .float() | bfloat16 + log_softmax(dtype=float32)
    layout       (N, V) | (B, T, V) flattened | (B, T, V) kept | (N, V, T) classes at dim 1
    extra        none | z-loss | softcap | temperature | class weights
"""

from __future__ import annotations

import dataclasses
import random
import textwrap

AXES = {
    "logprobs": ["F", "torch", "method", "lse", "log_softmax_of_softmax"],
    "nll": ["gather", "nll_none", "nll_sum", "nll_mean", "one_hot", "index", "scatter", "arange"],
    "uniform": ["sum", "mean", "ones_matmul", "ones_mul"],
    "convention": ["all", "others", "pad"],
    "eps": [0.0, 0.05, 0.1, 0.3],
    "mask": ["none", "masked_fill", "where", "where_zeros_like", "mul_bool", "mul_float", "boolean"],
    "labels": ["clamp", "where", "masked_fill"],
    "reduction": ["mean", "sum", "token", "sequence"],
    "order": ["rows", "terms"],
    "dtype": ["float32", "bfloat16", "bfloat16_dtype"],
    "layout": ["flat", "flattened", "bt", "cd1"],
    "extra": ["none", "z_loss", "softcap", "temperature", "weight"],
}

N, B, T, V = 6, 2, 3, 11  # V odd: eps / V, eps / (V - 1) and eps / (V - 2) differ visibly
PAD = 0  # the padding class of the padding-column convention (a valid class index)


@dataclasses.dataclass(frozen=True)
class Spelling:
    logprobs: str
    nll: str
    uniform: str
    convention: str
    eps: float
    mask: str
    labels: str
    reduction: str
    order: str
    dtype: str
    layout: str
    extra: str

    # -- what the draw needs ------------------------------------------------------------------

    @property
    def ignored(self) -> int:
        """The label value of masked rows."""
        return PAD if self.convention == "pad" else -100

    @property
    def reduced_nll(self) -> bool:
        return self.nll in ("nll_sum", "nll_mean")

    @property
    def class_dim(self) -> int:
        return 1 if self.layout == "cd1" else -1

    # -- source -------------------------------------------------------------------------------

    def source(self) -> str:
        lines = ["def loss_fn(x, y, w):"]
        add = lines.append
        cd = self.class_dim
        if self.layout == "flattened":
            add(f"    x = x.view(-1, {V})")
            add("    y = y.view(-1)")
        if self.dtype == "bfloat16":
            add("    x = x.float()")
        if self.extra == "softcap":
            add("    x = 5.0 * torch.tanh(x / 5.0)")
        elif self.extra == "temperature":
            add("    x = x / 2.0")
        add(f"    lp = {self._logprobs(cd)}")
        masked = self.mask != "none"
        if masked:
            add(f"    keep = y != {self.ignored}")
        add(f"    y_ = {self._safe_labels()}")
        add(f"    nll = {self._nll(cd)}")
        if self.extra == "weight" and not self.nll.startswith("nll_"):  # nll_loss takes weight= itself
            add("    nll = nll * w[y_]")
        add(f"    smooth = {self._uniform(cd)}")
        if self.convention == "pad":
            col = f"lp[:, {PAD}]" if cd == -1 and self.layout != "bt" else f"lp[..., {PAD}]"
            add(f"    smooth = smooth + {col}  # the padding column gets no mass")
        if self.extra == "z_loss":
            add(f"    zl = 1e-4 * torch.logsumexp(x, dim={cd}) ** 2")
            if self.order == "terms" and not self.reduced_nll:  # with the label's term, on its rows
                add("    nll = nll + zl")
        a, b = self._coefficients()
        if self.order == "rows" and not self.reduced_nll:
            add(f"    row = {a} * nll + {b} * smooth" + (" + zl" if self.extra == "z_loss" else ""))
            lines += self._reduce("row", "loss")
        else:
            terms = [("nll", a), ("smooth", b)] + ([("zl", "1.0")] if self.extra == "z_loss" and self.reduced_nll
                                                   else [])
            parts = []
            for name, coef in terms:
                if name == "nll" and self.reduced_nll:
                    parts.append(f"{coef} * nll")
                    continue
                lines += self._reduce(name, name + "_r")
                parts.append(f"{coef} * {name}_r")
            add("    loss = " + " + ".join(parts))
        add("    return loss")
        return "\n".join(lines) + "\n"

    def _coefficients(self) -> tuple[str, str]:
        """(a, b) multiplying the per-row nll and the per-row (smooth) term, as written."""
        eps = self.eps
        if self.convention == "all":
            return f"(1 - {eps})", f"{eps} / {V}"
        spread = V - 1 if self.convention == "others" else V - 2
        # eps / spread on every class but the label (and the padding column): subtract the
        # label's share from the smooth term
        return f"(1 - {eps} - {eps} / {spread})", f"{eps} / {spread}"

    def _logprobs(self, cd) -> str:
        dt = ", dtype=torch.float32" if self.dtype == "bfloat16_dtype" else ""
        return {
            "F": f"F.log_softmax(x, dim={cd}{dt})",
            "torch": f"torch.log_softmax(x, {cd}{dt})",
            "method": f"x.log_softmax({cd}{dt})",
            "lse": f"x - torch.logsumexp(x, dim={cd}, keepdim=True)",
            "log_softmax_of_softmax": f"torch.log(torch.softmax(x, dim={cd}))",
        }[self.logprobs]

    def _safe_labels(self) -> str:
        reads = self.nll not in ("nll_none", "nll_sum", "nll_mean", "arange") or self.extra == "weight"
        if self.mask == "none" or self.ignored >= 0 or not reads:
            return "y"
        return {"clamp": "y.clamp(min=0)", "where": "torch.where(keep, y, 0)",
                "masked_fill": "y.masked_fill(~keep, 0)"}[self.labels]

    def _nll(self, cd) -> str:
        ign = self.ignored
        w = ", weight=w" if self.extra == "weight" else ""
        if self.nll.startswith("nll_"):
            reduction = self.nll[4:]
            lp = "lp" if self.layout != "bt" else f"lp.view(-1, {V})"
            y = "y" if self.layout != "bt" else "y.view(-1)"
            out = f"F.nll_loss({lp}, {y}, ignore_index={ign}, reduction='{reduction}'{w})"
            if reduction == "none" and self.layout == "bt":
                out += f".view({B}, {T})"
            return out
        unsq = "[..., None]" if cd == -1 else "[:, None]"
        return {
            "gather": f"-lp.gather({cd}, y_{unsq}).squeeze({cd})",
            "one_hot": f"-(F.one_hot(y_, {V}).float() * lp).sum({cd})",
            "index": "-lp[torch.arange(lp.shape[0]), y_]",
            "scatter": f"-(torch.zeros_like(lp).scatter_({cd}, y_{unsq}, 1.0) * lp).sum({cd})",
            "arange": f"-((torch.arange({V}) == y_[..., None]).float() * lp).sum({cd})",
        }[self.nll]

    def _uniform(self, cd) -> str:
        if self.extra == "weight":
            return f"-(lp * w).sum({cd})" if cd == -1 else f"-(lp * w[:, None]).sum({cd})"
        return {
            "sum": f"-lp.sum(dim={cd})",
            "mean": f"-lp.mean({cd}) * {V}",
            "ones_matmul": f"-(lp @ lp.new_ones({V}))",
            "ones_mul": f"-(lp * torch.ones_like(lp)).sum({cd})",
        }[self.uniform]

    def _reduce(self, r: str, out: str) -> list[str]:
        """Mask the per-row ``r`` and reduce it into ``out``."""
        lines = []
        m = self.mask
        if m == "boolean":
            red = {"mean": f"{r}[keep].mean()", "sum": f"{r}[keep].sum()",
                   "token": f"{r}[keep].sum() / keep.sum()"}[self.reduction]
            return [f"    {out} = {red}"]
        masked = {
            "none": r, "masked_fill": f"{r}.masked_fill(~keep, 0.0)", "where": f"torch.where(keep, {r}, 0.0)",
            "where_zeros_like": f"torch.where(keep, {r}, torch.zeros_like({r}))", "mul_bool": f"{r} * keep",
            "mul_float": f"{r} * keep.float()",
        }[m]
        count = "keep.sum()" if m != "none" else f"{r}.numel()"
        if self.reduction == "mean":
            lines.append(f"    {out} = ({masked}).mean()")
        elif self.reduction == "sum":
            lines.append(f"    {out} = ({masked}).sum()")
        elif self.reduction == "token":
            lines.append(f"    {out} = ({masked}).sum() / {count}")
        else:  # per sequence, then over the batch
            seq_keep = f"keep.view({B}, -1)" if m != "none" else f"torch.ones({B}, {T})"
            lines.append(f"    {out} = (({masked}).view({B}, -1).sum(-1) / {seq_keep}.sum(-1).clamp(min=1)).mean()")
        return lines


def draw(rng: random.Random) -> Spelling:
    """One spelling with a value on every axis, adjusted where PyTorch rules a pair out."""
    c = {axis: rng.choice(values) for axis, values in AXES.items()}
    if c["layout"] in ("cd1", "bt"):
        if c["nll"] in ("index",):  # advanced indexing of (rows, classes) only
            c["nll"] = "gather"
        if c["layout"] == "cd1" and c["nll"] in ("one_hot", "arange"):  # one-hots put classes last
            c["nll"] = "scatter"
        if c["layout"] == "cd1" and c["uniform"] == "ones_matmul":  # a matmul sums the last dim
            c["uniform"] = "sum"
        if c["convention"] == "pad":  # the padding column as lp[:, pad] needs classes last, 2-D
            c["layout"] = "flattened" if c["layout"] == "bt" else "flat"
    if c["nll"] == "arange" and c["extra"] == "z_loss":
        # arange == y matches no class for a label outside [0, V): eager keeps the z term of such a
        # row without its label term, which one op call (z on the label term's rows) cannot
        c["nll"] = "one_hot"
    if c["nll"] == "index" and c["layout"] == "bt":
        c["layout"] = "flattened"
    if c["reduction"] == "sequence" and c["layout"] not in ("bt", "flattened"):
        c["layout"] = "flattened"
    if c["dtype"] == "bfloat16_dtype" and c["logprobs"] in ("lse", "log_softmax_of_softmax"):
        c["dtype"] = "bfloat16"
    if c["convention"] == "pad" and c["extra"] == "weight":  # a padding column is a class weight itself
        c["extra"] = "none"
    if c["convention"] == "pad" and c["mask"] in ("none", "boolean"):
        c["mask"] = "masked_fill"  # rows labelled with the padding class are masked in the loss's graph
    if c["mask"] == "boolean":
        # r[keep] has a data-dependent size: Dynamo breaks the graph there, and terms indexed one
        # by one would hand the log-probs to two outputs of the graph before the break
        c["order"] = "rows"
        if c["reduction"] == "sequence":
            c["reduction"] = "token"
    if c["nll"] in ("nll_sum", "nll_mean") and c["extra"] == "z_loss" and c["mask"] == "none":
        # nll_loss drops rows labelled -100: a z term over every row is not the op's z-loss
        c["mask"] = "masked_fill"
    if c["nll"] in ("nll_sum", "nll_mean"):
        c["order"] = "terms"
        if c["mask"] == "boolean":  # nll_loss reduces before any row can be selected
            c["mask"] = "masked_fill"
        if c["reduction"] == "sequence":
            c["reduction"] = "token"
        # the smooth term is reduced like the nll: sum with sum, a mean over kept rows with mean
        c["reduction"] = {"nll_sum": "sum", "nll_mean": c["reduction"] if c["reduction"] != "sum" else "token"}[c["nll"]]
        if c["nll"] == "nll_mean" and c["mask"] == "none":
            c["reduction"] = "mean"  # the widely copied formula: nll_loss's mean next to a mean over rows
    if c["nll"] == "nll_none" and c["mask"] == "boolean" and c["extra"] == "z_loss":
        # nll_loss drops ignored rows itself, the z term would count on them before the mask
        # (after the graph break): the op counts z-loss on the label term's rows only
        c["mask"] = "masked_fill"
    if c["nll"] == "nll_none" and c["mask"] == "none":
        c["mask"] = "masked_fill"  # nll_loss masks its term: the smooth term must be masked alike
    return Spelling(**c)


def inputs(s: Spelling, seed: int):
    """(x, y, w) for a spelling: logits, labels (some of them masked when it masks rows), weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = {"flat": (N, V), "flattened": (B, T, V), "bt": (B, T, V), "cd1": (B, V, T)}[s.layout]
    x = torch.randn(*shape, generator=g) * 2
    yshape = shape[:-1] if s.layout != "cd1" else (B, T)
    y = torch.randint(1 if s.convention == "pad" else 0, V, yshape, generator=g)
    if s.mask != "none":
        flat = y.view(-1)
        flat[0] = s.ignored
        flat[-2] = s.ignored
    w = torch.rand(V, generator=g) + 0.5
    return x, y, w


def function(s: Spelling):
    """The spelling as a Python function (compiled from its source, so frames name real lines)."""
    import torch
    import torch.nn.functional as F

    source = s.source()
    namespace = {"torch": torch, "F": F}
    exec(compile(source, f"<spelling {textwrap.shorten(repr(s), 60)}>", "exec"), namespace)
    return namespace["loss_fn"]
