"""A seeded generator of hand-written (label-smoothed) cross-entropy losses.

Each draw picks one value on every axis below and writes the loss as Python source, the way a
person would write it. The axes are independent except where PyTorch itself rules a pair out
(nll_loss reduces its term itself, logsumexp takes no dtype=, ...) or where the detector leaves the
pair alone (``draw`` quotes its reason): ``draw`` then moves the later axis to a value that works,
so every draw is a valid program the detector rewrites. ``Spelling.calls`` is the number of op
calls the rewrite needs; ``Spelling.source("float64")`` is the same program upcasting its
bfloat16 logits to float64 (the reference).

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
    layout       (N, V) | (B, T, V) flattened | (B, T, V) kept | (B, V, T) classes at dim 1
    extra        none | z-loss | softcap | temperature | class weights
    target       a one-hot label target times lp | scaled in place (t.mul_(a), t *= a) | its
                 masked rows cleared by torch.where against a 0-dim tensor
    transpose    (B, V, T) log-probs used as they are | transposed to classes last
    shapes       static | B and T dynamic (torch._dynamo.maybe_mark_dynamic)
    select       boolean indexing (mask) of the per-row loss | of the logits and the labels first
                 (x[keep]) | of the log-probs and the labels (log_softmax(x)[keep])
    kept         the one-hot target built in the loss | a table of one-hots (or of one-hots scaled
                 by the label term's coefficient) in a module buffer filled in __init__, indexed
                 by the labels | built before a graph break (a host count, .item()), used after it
    reads        the labels read once | the label term read a second time, the same labels through
                 take_along_dim or nll_loss, half of it each way

The axes after the twelfth came later: they are drawn after the others, so the values a seed
draws on the earlier axes stay what they were (and the source of a draw whose later axes are at
their first value is the source it had before they came).
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
    "target": ["product", "mul_", "imul", "where_0dim"],
    "transpose": ["none", "classes_last"],
    "shapes": ["static", "dynamic"],
    "select": ["after", "logits", "log_probs"],
    "kept": ["inline", "buffer", "graph_break"],
    "reads": ["one", "take_along_dim", "nll_loss"],
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
    target: str
    transpose: str
    shapes: str
    select: str
    kept: str = "inline"
    reads: str = "one"

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
        """Where the logits (and the softmax over them) have their classes."""
        return 1 if self.layout == "cd1" and self.select != "logits" else -1

    @property
    def selected_before(self) -> bool:
        """The kept rows are selected (from the logits or the log-probs) before any term reads them."""
        return self.select != "after"

    @property
    def lp_layout(self) -> str:
        """The layout the code reads the log-probs in: (B, V, T) log-probs transposed are (B, T, V),
        rows selected by boolean indexing are one flat batch."""
        if self.selected_before:
            return "flat"
        return "bt" if self.transpose == "classes_last" else self.layout

    @property
    def target_carries_a(self) -> bool:
        """The label target is scaled by the label term's coefficient in place."""
        return self.target in ("mul_", "imul")

    @property
    def later(self) -> bool:
        """A value off the first on an axis the call count (``calls``) does not model: the target
        kept in a buffer or across a graph break, the labels read twice."""
        return self.kept != "inline" or self.reads != "one"

    @property
    def calls(self) -> int:
        """The fused op calls the rewrite makes: one, but more where the terms cannot share one."""
        return self._cross_entropy_calls + int(self.z_apart)

    @property
    def z_apart(self) -> bool:
        """The z term counts on rows the label term drops (arange == y matches no class of a label
        outside [0, V); nll_loss drops the rows labelled -100, with no mask or before the boolean
        one): it gets an op call of its own, on its own rows."""
        return self.extra == "z_loss" and (self.nll == "arange" or self.nll in ("nll_none", "nll_sum")
                                           and self.mask == "none" or self.nll == "nll_none" and self.mask == "boolean")

    @property
    def _cross_entropy_calls(self) -> int:
        """The op calls of the cross-entropy terms (with the z term where it has their rows)."""
        if self.order == "terms" and (self.mask == "boolean" and not self.selected_before
                                      or self.reduction == "sequence"):
            # each term reaches its own output of the graph before the break at r[keep], or is
            # averaged per sequence apart: a per-row call each
            return 2
        if self.nll == "index" and self.extra == "weight":
            # lp[arange(N), y_] reads a negative label from the end: the detector keeps w[y_]
            # apart (a per-row call for the label term, times w[y_] in the graph, and one for the
            # smooth term, even at eps = 0), where one call with weight=w would do
            return 2
        if self.nll == "nll_mean" and self.reduction == "mean" and (self.extra == "z_loss"
                                                                    or self.eps and self.mask != "none"):
            # the z (or masked smooth) term divided by all rows, nll_loss's by the kept ones: one
            # call divides each term by its own rows only for an unmasked smooth term and no z
            return 2
        if self.eps == 0:
            return 1  # no smooth term: the label term (and z) alone
        if self.convention == "pad" and (self.mask in ("none", "boolean") and not self.nll.startswith("nll_")
                                         or self.nll == "nll_mean" and self.mask == "none"):
            # rows labelled with the padding class count in the label term (no mask, or only
            # after the break) but the padding column is a class weight of the smooth term alone
            # (nll_loss's ignore_index drops those rows itself: one call, but for nll_loss's
            # mean next to the smooth term's over all rows, which one call divides by their own
            # rows only without padding columns)
            return 2
        return 1

    # -- source -------------------------------------------------------------------------------

    def source(self, upcast: str = "float32") -> str:
        """The loss as Python source. ``upcast``: the float dtype a bfloat16 spelling converts its
        logits to (``x.float()``, ``log_softmax(..., dtype=torch.float32)`` as drawn; the float64
        reference runs the same program with ``x.double()``, ``dtype=torch.float64``)."""
        lines = ["def loss_fn(x, y, w):"]
        add = lines.append
        cd = self.class_dim
        lcd = -1 if self.transpose == "classes_last" else cd  # where lp has its classes
        if self.layout == "flattened":
            add(f"    x = x.view(-1, {V})")
            add("    y = y.view(-1)")
        if self.select == "logits":
            add(f"    keep = y != {self.ignored}")
            x = "x.transpose(1, 2)" if self.layout == "cd1" else "x"  # rows of (B, T, V) logits
            add(f"    x, y = {x}[keep], y[keep]  # the kept rows, one flat batch")
        nll = self._nll(lcd)
        if self.kept == "graph_break":  # the target first, then a count on the host, then the loss
            if self.mask != "none":
                add(f"    keep = y != {self.ignored}")
            add(f"    y_ = {self._safe_labels()}")
            lines += nll[:-1]
            add("    rows = (y_ >= 0).sum().item()  # a count on the host (logged): Dynamo breaks the graph here")
            nll = nll[-1:]
        if self.dtype == "bfloat16":
            add("    x = " + {"float32": "x.float()", "float64": "x.double()"}[upcast])
        if self.extra == "softcap":
            add("    x = 5.0 * torch.tanh(x / 5.0)")
        elif self.extra == "temperature":
            add("    x = x / 2.0")
        add(f"    lp = {self._logprobs(cd, upcast)}")
        if self.transpose == "classes_last":
            add("    lp = lp.transpose(1, 2)  # (B, T, V)")
        if self.kept != "graph_break":
            if self.mask != "none" and self.select != "logits":
                add(f"    keep = y != {self.ignored}")
            if self.select == "log_probs":
                add("    lp, y = lp[keep], y[keep]  # the kept rows, one flat batch")
            add(f"    y_ = {self._safe_labels()}")
        lines += nll
        if self.reads != "one":
            lines += self._second_read(lcd)
        if self.extra == "weight" and not self.nll.startswith("nll_"):  # nll_loss takes weight= itself
            add("    nll = nll * w[y_]")
        add(f"    smooth = {self._uniform(lcd)}")
        if self.convention == "pad":
            # (lp[:, pad] of the (B, V, T) log-probs is the same column, but the detector reads
            # it as a slice: "log-probs are sliced")
            col = {"flat": f"lp[:, {PAD}]", "flattened": f"lp[:, {PAD}]", "bt": f"lp[..., {PAD}]",
                   "cd1": f"lp.select(1, {PAD})"}[self.lp_layout]
            add(f"    smooth = smooth + {col}  # the padding column gets no mass")
        if self.extra == "z_loss":
            add(f"    zl = 1e-4 * torch.logsumexp(x, dim={cd}) ** 2")
            if self.order == "terms" and not self.reduced_nll:  # with the label's term, on its rows
                add("    nll = nll + zl")
        a, b = self._coefficients()
        if self.target_carries_a:
            a = "1.0"  # the target holds it
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
        if self.kept == "buffer":
            lines = self._module(lines, upcast)
        return "\n".join(lines) + "\n"

    def _module(self, lines: list[str], upcast: str) -> list[str]:
        """The loss as the forward of a module whose buffer holds a one-hot per class, built in
        __init__ the way the drawn label term builds its one-hot (scaled there, in place, where
        the target carries the label term's coefficient)."""
        classes = f"torch.arange({V})"
        table = {
            "one_hot": f"F.one_hot({classes}, {V}).to(torch.{upcast})",
            "scatter": f"torch.zeros({V}, {V}, dtype=torch.{upcast}).scatter_(1, {classes}[:, None], 1.0)",
            "arange": f"({classes}[:, None] == {classes}).to(torch.{upcast})",
        }[self.nll]
        init = ["class Loss(torch.nn.Module):", "    def __init__(self):", "        super().__init__()",
                f"        table = {table}  # row c: the target of label c"]
        if self.target_carries_a:
            a, _ = self._coefficients()
            init.append(f"        table.mul_({a})" if self.target == "mul_" else f"        table *= {a}")
        init += ['        self.register_buffer("table", table)', "",
                 "    def forward(self, x, y, w):"]
        return init + ["    " + line for line in lines[1:]] + ["", "", "loss_fn = Loss()"]

    def _second_read(self, cd) -> list[str]:
        """Half the label term read again from the same labels, through take_along_dim or nll_loss."""
        unsq = "[..., None]" if cd == -1 else "[:, None]"
        if self.reads == "take_along_dim":
            again = f"-lp.take_along_dim(y_{unsq}, {cd}).squeeze({cd})"
            if self.nll == "nll_none" and self.extra == "weight":  # nll_loss weighted its own half
                again += " * w[y_]"
        else:
            again = self._nll_loss("y_", "none")
        return [f"    nll = 0.5 * nll + 0.5 * {again}"]

    def _nll_loss(self, y: str, reduction: str) -> str:
        """F.nll_loss of the log-probs and labels ``y``, as the layout they are read in needs."""
        w = ", weight=w" if self.extra == "weight" and y == "y" else ""
        flat = "view" if self.transpose == "none" else "reshape"  # transposed log-probs are no view
        bt = self.lp_layout == "bt"
        lp = f"lp.{flat}(-1, {V})" if bt else "lp"
        y = f"{y}.view(-1)" if bt else y
        out = f"F.nll_loss({lp}, {y}, ignore_index={self.ignored}, reduction='{reduction}'{w})"
        if reduction == "none" and bt:
            out += f".view({B}, {T})"
        return out

    def _coefficients(self) -> tuple[str, str]:
        """(a, b) multiplying the per-row nll and the per-row (smooth) term, as written."""
        eps = self.eps
        if self.convention == "all":
            return f"(1 - {eps})", f"{eps} / {V}"
        spread = V - 1 if self.convention == "others" else V - 2
        # eps / spread on every class but the label (and the padding column): subtract the
        # label's share from the smooth term
        return f"(1 - {eps} - {eps} / {spread})", f"{eps} / {spread}"

    def _logprobs(self, cd, upcast) -> str:
        dt = f", dtype=torch.{upcast}" if self.dtype == "bfloat16_dtype" else ""
        return {
            "F": f"F.log_softmax(x, dim={cd}{dt})",
            "torch": f"torch.log_softmax(x, {cd}{dt})",
            "method": f"x.log_softmax({cd}{dt})",
            "lse": f"x - torch.logsumexp(x, dim={cd}, keepdim=True)",
            "log_softmax_of_softmax": f"torch.log(torch.softmax(x, dim={cd}))",
        }[self.logprobs]

    def _safe_labels(self) -> str:
        reads = (self.nll not in ("nll_none", "nll_sum", "nll_mean", "arange") or self.extra == "weight"
                 or self.kept == "buffer" or self.reads != "one")  # table[y], take_along_dim(y) read every label
        if self.mask == "none" or self.selected_before or self.ignored >= 0 or not reads:
            return "y"
        return {"clamp": "y.clamp(min=0)", "where": "torch.where(keep, y, 0)",
                "masked_fill": "y.masked_fill(~keep, 0)"}[self.labels]

    def _nll(self, cd) -> list[str]:
        """The lines that compute the per-row label term ``nll`` (lp has its classes at cd)."""
        if self.nll.startswith("nll_"):
            return [f"    nll = {self._nll_loss('y', self.nll[4:])}"]
        unsq = "[..., None]" if cd == -1 else "[:, None]"
        index = {  # the label's entry of each row: torch.arange at every dim but the classes'
            "cd1": f"lp[torch.arange({B})[:, None], y_, torch.arange({T})]",
            "bt": f"lp[torch.arange({B})[:, None], torch.arange({T}), y_]",
        }.get(self.lp_layout, "lp[torch.arange(lp.shape[0]), y_]")
        if self.nll in ("gather", "index"):
            return [f"    nll = -lp.gather({cd}, y_{unsq}).squeeze({cd})" if self.nll == "gather" else f"    nll = -{index}"]
        classes = f"torch.arange({V})" if cd == -1 else f"torch.arange({V})[:, None]"
        target = {  # a 0/1 target: 1 at the label
            "one_hot": f"F.one_hot(y_, {V}).float()",
            "scatter": f"torch.zeros_like(lp).scatter_({cd}, y_{unsq}, 1.0)",
            "arange": f"({classes} == y_{unsq}).float()",
        }[self.nll]
        if self.kept == "buffer":  # the module's table, one row per label (its classes last)
            target = "self.table[y_]" if cd == -1 else "self.table[y_].movedim(-1, 1)"
        if self.target == "product" and self.kept == "inline":
            return [f"    nll = -({target} * lp).sum({cd})"]
        lines = [f"    t = {target}"]
        a, _ = self._coefficients()
        if self.kept == "buffer" and self.target_carries_a:
            pass  # scaled in __init__
        elif self.target == "mul_":
            lines.append(f"    t.mul_({a})")
        elif self.target == "imul":
            lines.append(f"    t *= {a}")
        elif self.target == "where_0dim":  # the masked rows' target cleared against a 0-dim tensor
            lines.append(f"    t = torch.where(keep{unsq}, t, torch.tensor(0.0))")
        return lines + [f"    nll = -(t * lp).sum({cd})"]

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
            kept = r if self.selected_before else f"{r}[keep]"
            red = {"mean": f"{kept}.mean()", "sum": f"{kept}.sum()",
                   "token": f"{kept}.sum() / keep.sum()"}[self.reduction]
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
    """One spelling with a value on every axis, moved where PyTorch rules a pair out, or where the
    detector leaves the pair alone (the reason it gives is quoted)."""
    c = {axis: rng.choice(values) for axis, values in AXES.items()}
    # -- what PyTorch rules out ------------------------------------------------------------------
    if c["reduction"] == "sequence" and c["layout"] == "flat":  # rows of no sequence
        c["layout"] = "flattened"
    if c["dtype"] == "bfloat16_dtype" and c["logprobs"] in ("lse", "log_softmax_of_softmax"):
        c["dtype"] = "bfloat16"  # logsumexp and softmax + log take no dtype=
    if c["mask"] == "boolean" and c["reduction"] == "sequence":
        c["reduction"] = "token"  # r[keep] is one flat vector: no sequence is left in it
    if c["nll"] in ("nll_sum", "nll_mean"):
        c["order"] = "terms"  # nll_loss reduces its own term
        if c["mask"] == "boolean":  # nll_loss reduces before any row can be selected
            c["mask"] = "masked_fill"
        if c["reduction"] == "sequence":
            c["reduction"] = "token"
        # the smooth term is reduced like the nll: sum with sum, a mean over kept rows with mean
        c["reduction"] = {"nll_sum": "sum", "nll_mean": c["reduction"] if c["reduction"] != "sum" else "token"}[c["nll"]]
        if c["nll"] == "nll_mean" and c["mask"] == "none":
            c["reduction"] = "mean"  # the widely copied formula: nll_loss's mean next to a mean over rows
    # -- what the detector leaves alone ----------------------------------------------------------
    if c["layout"] != "cd1":
        c["transpose"] = "none"  # only (B, V, T) log-probs have their classes elsewhere than last
    if c["layout"] == "cd1" and c["transpose"] == "none":
        # F.one_hot(y_, V).float().permute(0, 2, 1) * lp: "the log-probs are multiplied by
        # permute, which is not built from the labels"
        if c["nll"] == "one_hot":
            c["nll"] = "scatter"
        # torch.ones(V) @ lp sums dim 1 of (B, V, T): "log-probs in a matrix product (matmul at
        # ...)" (lp.new_ones(V) @ lp: "log-probs also read at ... (new_ones)")
        if c["uniform"] == "ones_matmul":
            c["uniform"] = "sum"
    if c["convention"] == "pad" and c["extra"] == "weight":
        # a padding column is a class weight of the smooth term alone: "weighted and unweighted
        # log-prob terms are mixed" (left alone on purpose)
        c["extra"] = "none"
    if c["mask"] != "boolean":
        c["select"] = "after"  # rows are selected only by boolean indexing
    if c["select"] != "after" and c["extra"] == "z_loss":
        # torch.logsumexp(x[keep]): Dynamo breaks the graph at a logsumexp of a data-dependent
        # row count, and the z term is computed in a graph of its own; torch.logsumexp(x)[keep]
        # next to lp[keep]: the z term's logsumexp stays in the graph
        c["select"] = "after"
    if c["select"] == "logits" and c["logprobs"] == "lse":
        c["select"] = "log_probs"  # the logsumexp of x[keep]: the graph break above
    if c["select"] == "log_probs" and c["layout"] == "cd1":
        # log_softmax(x, 1).transpose(1, 2)[keep]: "rows of log-probs whose classes a transpose
        # moved are selected": the user selects x.transpose(1, 2)[keep] instead
        c["select"] = "logits" if c["logprobs"] != "lse" else "after"
    if c["select"] == "logits":
        c["transpose"] = "none"  # x.transpose(1, 2)[keep]: the classes are last already
    if c["nll"] not in ("one_hot", "scatter", "arange") or c["target"] == "where_0dim" and (
            c["mask"] == "none" or c["select"] != "after"):
        # no target tensor (gather, index, nll_loss), or no masked row left to clear
        c["target"] = "product"
    # -- the later axes move themselves only ------------------------------------------------------
    if c["nll"] not in ("one_hot", "scatter", "arange"):
        c["kept"] = "inline"  # no one-hot to keep
    if c["kept"] == "graph_break" and (c["nll"] == "scatter" or c["select"] != "after"):
        # zeros_like(lp).scatter_ needs the log-probs, lp[keep] reselects the labels after the break
        c["kept"] = "buffer" if c["nll"] == "scatter" else "inline"
    if c["layout"] == "cd1":
        # a target given as data against (B, V, T) logits: "the rewrite raised ValueError
        # (smoothce: target shape (2, 3, 11) must equal the logits' shape (2, 11, 3))"
        c["kept"] = "inline"
    if c["nll"] in ("nll_sum", "nll_mean") or c["nll"] == "nll_none" and c["reads"] == "nll_loss":
        # a reduced nll_loss has no per-row term to halve; nll_loss read twice is one way
        c["reads"] = "one" if c["nll"] != "nll_none" else "take_along_dim"
    if c["reads"] == "take_along_dim" and c["select"] != "after":
        # take_along_dim of rows selected by a boolean mask: Dynamo breaks the graph there, and
        # the log-probs are "also returned from the graph"
        c["reads"] = "nll_loss" if c["nll"] != "nll_none" else "one"
    return Spelling(**c)


def dynamic_dims(s: Spelling) -> tuple[tuple, tuple]:
    """The dims of (x, y) that a "dynamic" draw marks: every dim but the classes'."""
    x_dims = {"flat": (0,), "flattened": (0, 1), "bt": (0, 1), "cd1": (0, 2)}[s.layout]
    return x_dims, tuple(range(len(x_dims)))


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


def function(s: Spelling, upcast: str = "float32"):
    """The spelling as a Python function (compiled from its source, so frames name real lines).
    ``upcast``: the dtype a bfloat16 spelling upcasts to (float64: the reference's program)."""
    import torch
    import torch.nn.functional as F

    source = s.source(upcast)
    namespace = {"torch": torch, "F": F}
    exec(compile(source, f"<spelling {textwrap.shorten(repr(s), 60)}>", "exec"), namespace)
    return namespace["loss_fn"]
