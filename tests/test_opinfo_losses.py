"""PyTorch's own OpInfo samples of the losses the op covers, through backend="smoothce_aot_eager".

Every sample of ``op_db``'s nn.functional.cross_entropy, nll_loss and kl_div, float64 and float32
on the CPU (one of each form; cross_entropy's in both dtypes, the others' in float64), is compiled
with the detector as PyTorch's tests call it, and also with the input
through log_softmax first (nll_loss and kl_div read log-probs: that is the form the op covers).
Each one agrees with eager in float64 (the value, the gradients of the input and of a target that
requires grad, or eager's exception), and each one eager computes is rewritten, except the
samples ``left_alone`` names, each with the reason the op does not take it; those are checked to
be left alone, so the list cannot go stale. The samples differ between torch versions: nothing
here counts them.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from rewrite_check import assert_raises_as_eager, fused_calls
from smoothce.compiler.backend import smoothce_aot_eager

OPS = {  # the op's name in op_db: the function the sample calls, given the sample's input
    "nn.functional.cross_entropy": ("as sampled", F.cross_entropy),
    "nn.functional.nll_loss": ("as sampled", F.nll_loss),
    "nn.functional.kl_div": ("as sampled", F.kl_div),
}
LOG_SOFTMAX_FIRST = ("nn.functional.nll_loss", "nn.functional.kl_div")
# float64: every sample; float32: cross_entropy's (the other ops' float32 samples are the same
# calls in another dtype, and each sample costs a compile)
DTYPES = {"nn.functional.cross_entropy": (torch.float64, torch.float32)}


@functools.cache
def _op_db() -> dict:
    """op_db's entries by name. Importing PyTorch's test helpers freezes torch.backends' flags
    process-wide (common_utils calls disable_global_flags()): the flag is set back as it was."""
    frozen = torch.backends.flags_frozen()
    from torch.testing._internal.common_methods_invocations import op_db

    if not frozen:
        setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)
    return {op.name: op for op in op_db if op.name in OPS and not op.variant_test_name}


def cases():
    """(id, op name, whether the input goes through log_softmax first): what the tests run."""
    for name in OPS:
        for first in (False, True) if name in LOG_SOFTMAX_FIRST else (False,):
            yield pytest.param(name, first, id=name.removeprefix("nn.functional.") + ("+log_softmax" if first else ""))


def left_alone(name: str, log_softmax_first: bool, x, args, kwargs):
    """Why the op does not take this sample (None: it does, and the sample must be rewritten)."""
    if name != "nn.functional.cross_entropy" and not log_softmax_first:
        return f"{name.removeprefix('nn.functional.')} of an input that is not log-probs"
    if name == "nn.functional.kl_div" and kwargs.get("reduction", "mean") == "none":
        return "kl_div(reduction='none') is a loss per class, the op's a loss per row"
    return None


def _samples(name, dtype):
    """The op's samples, one of each form: samples that differ only in their tensors' values
    (nll_loss draws its class weights three times) compile to the same graph."""
    seen, out = set(), []
    for sample in _op_db()[name].sample_inputs("cpu", dtype, requires_grad=True):
        form = tuple(_form(v) for v in (sample.input, *sample.args)) + tuple(
            (k, _form(v)) for k, v in sorted(sample.kwargs.items()))
        if form not in seen:
            seen.add(form)
            out.append(sample)
    return out


def _form(v):
    return (tuple(v.shape), v.dtype, v.requires_grad) if isinstance(v, torch.Tensor) else v


def _class_dim(x) -> int:
    return 0 if x.dim() == 1 else 1


def _function(name, log_softmax_first, kwargs):
    fn = OPS[name][1]
    if log_softmax_first:
        return lambda x, *args: fn(F.log_softmax(x, _class_dim(x)), *args, **kwargs)
    return lambda x, *args: fn(x, *args, **kwargs)


def _grads(out, inputs):
    """The gradients of sum(out * c) for a fixed c, with respect to the inputs that require grad."""
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    c = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)
    return torch.autograd.grad((out * c).sum(), wrt, allow_unused=True)


class Backend:
    """smoothce_aot_eager, keeping the graphs it rewrote."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        compiled = smoothce_aot_eager(gm, example_inputs)
        self.graphs.append(gm)
        return compiled

    def code(self) -> str:
        return "\n".join(gm.code for gm in self.graphs)


def _run_sample(name, log_softmax_first, dtype, i, sample):
    """One sample compiled against eager in float64: returns (rewritten, the rewritten graphs' code)."""
    x, args, kwargs = sample.input, tuple(sample.args), dict(sample.kwargs)
    context = f"{name} sample {i} ({dtype}): input {tuple(x.shape)}, args {args}, kwargs {kwargs}"
    fn = _function(name, log_softmax_first, kwargs)

    def fresh(t, to=None):  # the same values, a leaf of its own
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to(to or t.dtype).requires_grad_(t.requires_grad)

    ref_inputs = [fresh(t, torch.float64 if t.is_floating_point() else None) for t in (x, *args)]
    ours = [fresh(t) for t in (x, *args)]
    ref_kwargs = {k: fresh(v, torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
    ref_fn = _function(name, log_softmax_first, ref_kwargs)
    try:
        expected = ref_fn(*ref_inputs)
    except (RuntimeError, ValueError, IndexError) as err:
        torch._dynamo.reset()
        assert_raises_as_eager(lambda: torch.compile(fn, backend=Backend(), fullgraph=True)(*ours), err)
        return None, ""
    torch._dynamo.reset()
    backend = Backend()
    got = torch.compile(fn, backend=backend, fullgraph=True)(*ours)
    assert got.dtype == dtype and got.shape == expected.shape, context
    tol = dict(rtol=1e-7, atol=1e-7) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), expected, **tol, equal_nan=True, msg=lambda m: f"{m}\n{context}")
    for g, e in zip(_grads(got, ours), _grads(expected, ref_inputs), strict=True):
        assert (g is None) == (e is None), context
        if e is not None:
            torch.testing.assert_close(g.double(), e, **tol, equal_nan=True, msg=lambda m: f"{m}\n{context}")
    return sum(fused_calls(gm) for gm in backend.graphs) > 0, backend.code()


@pytest.mark.parametrize("name, log_softmax_first", cases())
def test_opinfo_samples(name, log_softmax_first):
    """Each sample agrees with eager; those eager computes are rewritten unless ``left_alone``
    says why not, and those are left alone."""
    outcomes = {}
    for dtype in DTYPES.get(name, (torch.float64,)):
        for i, sample in enumerate(_samples(name, dtype)):
            rewritten, code = _run_sample(name, log_softmax_first, dtype, i, sample)
            if rewritten is None:
                continue  # eager raised, and so did the compiled call
            why = left_alone(name, log_softmax_first, sample.input, sample.args, sample.kwargs)
            outcomes.setdefault(why, []).append(i)
            assert rewritten == (why is None), (
                f"{name} sample {i} ({dtype}) {'rewritten' if rewritten else 'left alone'}, expected "
                f"{why or 'rewritten'}: input {tuple(sample.input.shape)}, kwargs {sample.kwargs}, graph:\n{code}")
    assert outcomes, f"no sample of {name} that eager computes"
