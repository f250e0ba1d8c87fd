"""A real client, the ``llama`` case: one training step of Hugging Face's ``LlamaForCausalLM``.

The model is built from a config (nothing is downloaded): 2 decoder layers of hidden size D, a
vocabulary of V, a batch of 2 sequences of N / 2 tokens, the first eighth of the first sequence
masked with -100 as a prompt is. Its loss is computed inside the compiled function, in one of two
ways that the row's ``smoothing`` tells apart:

    0      transformers' own ``labels=`` loss (ForCausalLMLoss: logits.float(), shift, then
           F.cross_entropy with ignore_index=-100)
    eps    transformers.trainer_pt_utils.LabelSmoother(epsilon=eps) on the logits, as the Trainer
           applies it (hand-written: -log_softmax, gather, sums over the kept tokens)

Methods: eager, Inductor, and the smoothce backend (which fuses the LM head into the loss when
nothing else reads the logits). Gradients: every parameter. Each row's note names the loss.
"""

from __future__ import annotations

import torch

from benchmarks.cases import Case, Grid
from benchmarks.harness import IGNORE_INDEX, Inputs, Problem
from benchmarks.methods import Method, import_error, smoothce_backend_unavailable, smoothce_rewrites

BATCH = 2
LAYERS = 2
HEAD_DIM = 64


def loss_name(p: Problem) -> str:
    if p.smoothing == 0:
        return "loss: HF labels= (ForCausalLMLoss)"
    return f"loss: LabelSmoother(epsilon={p.smoothing:g}) on the logits"


def _loss_fn(p: Problem):
    if p.smoothing == 0:
        def loss(model, ids, labels):
            return model(input_ids=ids, labels=labels).loss

        return loss
    from transformers.trainer_pt_utils import LabelSmoother

    smoother = LabelSmoother(epsilon=p.smoothing)

    def loss(model, ids, labels):
        return smoother(model(input_ids=ids), labels, shift_labels=True)

    return loss


def _compiled(backend: str):
    # dynamic=False, as the other cases compile: every shape gets its own specialised code.
    return lambda p: torch.compile(_loss_fn(p), backend=backend, dynamic=False)


def _unavailable(p: Problem) -> str | None:
    return import_error("transformers")


def _smoothce_unavailable(p: Problem) -> str | None:
    return _unavailable(p) or smoothce_backend_unavailable(p)


METHODS = {
    m.name: m
    for m in (
        Method("eager", "eager", _loss_fn, unavailable=_unavailable, diagnose=lambda p, w: loss_name(p)),
        Method("inductor", "compile (Inductor)", _compiled("inductor"), unavailable=_unavailable,
               diagnose=lambda p, w: loss_name(p)),
        Method("smoothce-backend", 'compile(backend="smoothce")', _compiled("smoothce"),
               unavailable=_smoothce_unavailable, diagnose=lambda p, w: loss_name(p), inspect=smoothce_rewrites),
    )
}


def make_inputs(p: Problem, seed: int = 0) -> Inputs:
    """The model (randomly initialised on the device, in the problem's dtype), token ids and labels."""
    import transformers

    heads = max(1, p.d // HEAD_DIM)
    config = transformers.LlamaConfig(
        vocab_size=p.v, hidden_size=p.d, intermediate_size=4 * p.d, num_hidden_layers=LAYERS,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=p.n // BATCH)
    torch.manual_seed(seed)
    with torch.device(p.device):
        model = transformers.LlamaForCausalLM(config).to(p.torch_dtype)
    g = torch.Generator(device=p.device).manual_seed(seed)
    ids = torch.randint(0, p.v, (BATCH, p.n // BATCH), device=p.device, generator=g)
    labels = ids.clone()
    labels[0, : p.n // BATCH // 8] = IGNORE_INDEX
    return Inputs((model, ids, labels), list(model.parameters()))


def llama_grid(device: str, quick: bool) -> Grid:
    if device == "cuda":
        # hidden 2048 (a Llama-3.2-1B's), Llama 3's vocabulary, 2 x 4096 tokens
        return Grid((BATCH * 4096,), (128256,), ("bfloat16",), d=2048)
    # small enough that compiling and measuring every method takes a few minutes on two cores
    return Grid((BATCH * (256 if quick else 512),), (32000,), ("float32",), d=128)


CASES = {
    "llama": Case("llama", f"HF LlamaForCausalLM ({LAYERS} layers) training step, every parameter's gradient; "
                           "label_smoothing 0: its labels= loss, eps: LabelSmoother(eps)",
                  METHODS, llama_grid, make_inputs, METHODS["eager"]),
}
