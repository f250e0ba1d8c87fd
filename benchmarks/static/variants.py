"""What the static report compiles: every kernel variant a call can run, built by the project's own
launchers (the op's ``launch_row_stats`` and ``launch_row_grad``, the fused head's ``launch_chunk``,
the soft-target op's ``launch_soft_cross_entropy``) with ``compile_for``.

A call is an entry point (the op with or without its gradient, a fused head's chunk with or
without it), a dtype, a vocabulary size V and a feature set. Its logits are CPU tensors of the real
shape (``torch.empty``: address space, never touched), so the launcher specialises the arguments
exactly as it would on the GPU. The op's two kernels have one tile per V; the head's fused kernel
decides as it would between its fixed choice (problems under ``AUTOTUNE_MIN_ELEMENTS``) and the
configurations the autotuner keeps: the report compiles both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoothce.kernels import cross_entropy_tuning as tuning
from smoothce.kernels.cross_entropy_triton import launch_row_grad, launch_row_stats
from smoothce.kernels.form import LossForm, SoftTargetForm
from smoothce.kernels.inputs import Labels, acc_dtype
from smoothce.kernels.linear_cross_entropy import chunk_rows
from smoothce.kernels.linear_cross_entropy_triton import launch_chunk
from smoothce.kernels.soft_cross_entropy_triton import launch_soft_cross_entropy
from smoothce.kernels.soft_inputs import COEFFICIENTS, Terms

VS = (1024, 4096, 32768, 131072, 262144)
DTYPES = ("bfloat16", "float32")
FEATURES = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "weights": dict(weight=True),
    "z_loss": dict(z_loss=1e-4),
    "softcap": dict(softcap=30.0),
    "all": dict(weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
}
# Losses against a distribution (smoothce::soft_cross_entropy), each with its own features: Hinton
# distillation (a teacher's logits at T = 2, its KL with T**2 beside a label-smoothed CE on the
# labels), timm's probability targets (smoothed), torchtune's symmetric KL over the valid tokens,
# mixup's two smoothed labels without a target, and probability targets with class weights and a
# softcap too.
SOFT_FEATURES = {
    "kd": dict(labels=True, target="logits", soft=dict(target_logit_scale=0.5, soft_logit_scale=0.5,
                                                       soft_scale=2.8, soft_kl=True), form=dict(label_smoothing=0.1,
                                                                                                scale=0.3)),
    "probs": dict(target="probs", soft=dict(soft_label_smoothing=0.1)),
    "symmetric": dict(labels=True, target="logits", soft=dict(soft_scale=0.5, reverse_kl=0.5), form=dict(scale=0.0)),
    "mixup": dict(labels=True, mixup=True, form=dict(label_smoothing=0.1)),
    "probs_all": dict(target="probs", weight=True, soft=dict(soft_label_smoothing=0.1), form=dict(softcap=30.0)),
}
ENTRIES = {
    "op": "smoothce::cross_entropy in a training step: its statistics kernel in forward, its gradient "
          "kernel in backward",
    "op_loss": "smoothce::cross_entropy without a gradient: the statistics kernel (evaluation)",
    "head": "the fused head's kernel on one chunk of logits, the gradient written over them "
            "(N = 16384, D = 4096: the benchmark's head)",
    "head_loss": "the same without a gradient (the head's reduction='none' forward, evaluation)",
    "soft": "smoothce::soft_cross_entropy in a training step with the gradient written in forward (the choice "
            "for a target as wide as the logits): one launch reads the logits and the target and writes the "
            "gradient",
    "soft_loss": "the same without a gradient (evaluation)",
}
OP_ROWS = 8192  # the benchmark's N: the rows the L2 plan counts for the op
HEAD_N, HEAD_D = 16384, 4096


@dataclass(frozen=True)
class Call:
    entry: str
    dtype: str
    V: int
    features: str
    choice: str  # "fixed" (the tuning table's choice) or "tuned" (every candidate the pruner keeps)

    @property
    def grad(self) -> bool:
        return not self.entry.endswith("_loss")

    @property
    def itemsize(self) -> int:
        return getattr(torch, self.dtype).itemsize


def calls(entries=tuple(ENTRIES), dtypes=DTYPES, vs=VS, features=tuple(FEATURES)) -> list[Call]:
    """Every call of the grid: the fixed choice (a problem under the autotuning threshold: the op
    on few rows, a head's last, ragged chunk), and every configuration the tuner keeps (the op on
    many rows, the head where its chunk at the benchmark's shape tunes)."""
    out = []
    for entry in entries:
        own = SOFT_FEATURES if entry.startswith("soft") else FEATURES  # each entry's own feature sets
        for dtype in dtypes:
            for V in vs:
                for f in (f for f in features if f in own):
                    out.append(Call(entry, dtype, V, f, "fixed"))
                    chunk = head_chunk_rows(V, getattr(torch, dtype).itemsize)
                    if entry.startswith("head") and _tunes(chunk, V):
                        out.append(Call(entry, dtype, V, f, "tuned"))
    return out


def head_chunk_rows(V: int, itemsize: int) -> int:
    return chunk_rows(HEAD_N, V, HEAD_D, itemsize)


def _tunes(rows: int, V: int) -> bool:
    return rows * V >= tuning.AUTOTUNE_MIN_ELEMENTS


def rows(call: Call) -> int:
    """Rows of the logits the call is compiled with: a head's chunk at the benchmark's shape where
    it chooses as asked, else 16 for the fixed choice or the fewest rows that tune."""
    if call.entry.startswith("head"):
        chunk = head_chunk_rows(call.V, call.itemsize)
        if _tunes(chunk, call.V) == (call.choice == "tuned"):
            return chunk
    if call.choice == "fixed":
        return 16
    n = -(-tuning.AUTOTUNE_MIN_ELEMENTS // call.V)
    return max(16, -(-n // 16) * 16)


def plan_rows(call: Call) -> int:
    """Rows of the problem the L2 plan is made for: the benchmark's N, or the head's chunk."""
    return head_chunk_rows(call.V, call.itemsize) if call.entry.startswith("head") else OP_ROWS


def compile_soft(call: Call, target) -> list:
    """smoothce::soft_cross_entropy's kernel as the op launches it (its fixed choice) on (16, V)
    logits and a target of their dtype."""
    f = SOFT_FEATURES[call.features]
    dtype = getattr(torch, call.dtype)
    acc = acc_dtype(dtype)
    form = LossForm(**f.get("form", {}))
    soft = SoftTargetForm(target_kind=f.get("target", "probs"), **f.get("soft", {}))
    terms = Terms.of(form, soft, call.V, f.get("labels", False), "target" in f, f.get("mixup", False))
    n = rows(call)
    x3 = torch.empty(n, call.V, 1, dtype=dtype)
    t3 = torch.empty_like(x3) if "target" in f else None
    y = torch.zeros(n, dtype=torch.long) if f.get("labels") else None
    yb = y if f.get("mixup") else None
    coef, loss_rows = torch.empty(n, COEFFICIENTS, dtype=acc), torch.empty(n, dtype=acc)
    grad = torch.empty_like(x3) if call.grad else None
    weight = torch.ones(call.V, dtype=acc) if f.get("weight") else None
    return launch_soft_cross_entropy(x3, t3, y, yb, coef, weight, loss_rows, grad, None, terms=terms,
                                     compile_for=target)


def tensors_read(call: Call) -> int:
    """The N x V tensors the call reads: the logits, and a soft call's target."""
    return 2 if call.entry.startswith("soft") and "target" in SOFT_FEATURES[call.features] else 1


def compile_call(call: Call, target) -> list:
    """The compiled kernels the call would run on ``target``: one for the fixed choice, one per
    configuration the autotuner keeps otherwise."""
    if call.entry.startswith("soft"):
        return compile_soft(call, target)
    f = FEATURES[call.features]
    dtype = getattr(torch, call.dtype)
    acc = acc_dtype(dtype)
    form = LossForm(ignore_index=-100, reduction="mean", label_smoothing=f.get("label_smoothing", 0.0),
                    z_loss=f.get("z_loss", 0.0), softcap=f.get("softcap"))
    a, b, c = form.coefficients(call.V)
    weight = torch.ones(call.V, dtype=acc) if f.get("weight") else None
    n = rows(call)
    if call.entry.startswith("head"):
        tg = Labels(torch.zeros(HEAD_N, dtype=torch.long), weight, -100, call.V, acc)
        scales = tg.scales("mean") if call.grad else torch.ones(2, dtype=acc)
        logits = torch.empty(n, call.V, dtype=dtype)
        ce_rows, z_rows = torch.empty(HEAD_N, dtype=acc), torch.zeros(HEAD_N, dtype=acc)
        kernels = launch_chunk(logits, tg, 0, ce_rows, z_rows, scales, call.grad, -100, a, b, c, form.z_loss,
                               form.softcap or 0.0, form.logit_scale, compile_for=target)
    else:
        # as smoothce::cross_entropy runs on (N, V) logits (kernels/cross_entropy.py): the statistics
        # op in forward (the weighted sum only with smoothing), its gradient op in backward
        x3 = torch.empty(n, call.V, dtype=dtype).view(n, call.V, 1)
        y2 = torch.zeros(n, 1, dtype=torch.long)
        stats = torch.empty(3, n, dtype=acc)
        kw = dict(logit_scale=form.logit_scale, softcap=form.softcap, weighted_sum=b != 0.0, compile_for=target)
        kernels = launch_row_stats(x3, y2, weight, stats, **kw)
        if call.grad:
            kernels = kernels + launch_row_grad(stats, x3, y2, weight, stats[0], torch.empty_like(x3), **kw)
        return kernels
    if _tunes(n, call.V) != (call.choice == "tuned"):
        raise AssertionError(f"{call}: the launcher's choice at {n} rows is not the one asked for")
    return kernels


@dataclass(frozen=True)
class Variant:
    """What the report reads of a compiled kernel's configuration."""

    mode: str  # the fused kernel's mode (tuning.MODE_NAMES), or "stats" / "grad": the op's two kernels
    block_r: int
    block_c: int
    num_warps: int
    num_stages: int
    reverse: bool
    programs_per_sm: int
    writes_gradient: bool


def config_of(kernel) -> Variant:
    """The configuration a compiled kernel was built with (from its own constants)."""
    names = kernel.src.fn.arg_names
    const = {names[k[0]]: v for k, v in kernel.src.constants.items()}
    warps, stages = kernel.metadata.num_warps, kernel.metadata.num_stages
    if "MODE" in const:  # the fused kernel: loss and gradient in one launch
        return Variant(tuning.MODE_NAMES[const["MODE"]], const["BLOCK_R"], const["BLOCK_C"], warps, stages,
                       bool(const["REVERSE"]), const["PROGRAMS_PER_SM"], bool(const["COMPUTE_GRAD"]))
    grad = "g_ptr" in names  # the gradient kernel writes it, the statistics kernel reads only
    return Variant("grad" if grad else "stats", const["BLOCK_R"], const["BLOCK_C"], warps, stages, False, 0, grad)


def specialisation(kernel) -> dict:
    """The run-time specialisation the kernel was compiled with: ints that became the constant 1,
    and arguments known to be divisible by 16 (pointers: 16-byte aligned)."""
    names = kernel.src.fn.arg_names
    # the kernel's own constexprs are in capitals
    ones = sorted(names[k[0]] for k, v in kernel.src.constants.items() if v == 1 and not names[k[0]].isupper())
    aligned = sorted(names[k[0]] for k, v in kernel.src.attrs.items() if ["tt.divisibility", 16] in v)
    return {"constant_1": ones, "divisible_by_16": aligned}
