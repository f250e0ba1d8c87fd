"""The Hugging Face Trainer as a client: its whole loss inside the model it compiles.

With ``TrainingArguments(torch_compile=True)`` accelerate compiles the model's ``forward``; the
model computes its own loss there when it gets the labels, so after ``register_patterns()``
Inductor rewrites it. Two things keep the Trainer's loss out of reach:

- ``label_smoothing_factor > 0``: the Trainer takes the labels away from the model and applies
  its ``LabelSmoother`` to the returned logits, outside the compiled region.
- the forward returns the logits along with the loss, so they must exist in memory and the LM
  head cannot be fused into the loss.

:func:`move_loss_into_model` changes both for one Trainer: the model computes the smoothed loss
itself (transformers' causal-LM loss with ``label_smoothing`` added; the same value as the
Trainer's ``LabelSmoother`` with its label shift) and, while training, returns only the loss.
"""

from __future__ import annotations

import functools

__all__ = ["move_loss_into_model", "causal_lm_loss"]


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, *, label_smoothing: float = 0.0, **kwargs):
    """transformers' ``ForCausalLMLoss`` with ``label_smoothing``: token t predicts label t + 1,
    a mean over the tokens that are not ``ignore_index``, or a sum divided by
    ``num_items_in_batch`` when the Trainer passes one."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def move_loss_into_model(trainer) -> None:
    """Make ``trainer``'s causal LM compute the Trainer's (label-smoothed) loss in its compiled
    forward, and return only the loss while training. Call it after building the Trainer and
    before ``trainer.train()``; ``TrainingArguments`` stay as they are.

    With ``smoothce.register_patterns()`` and ``torch_compile=True`` the loss then runs as one
    fused ``smoothce::linear_cross_entropy`` (head and loss) without the logits in memory.
    Evaluation is unchanged: in eval mode the model returns its logits as before.
    """
    model = trainer.model
    if getattr(model, "loss_type", None) != "ForCausalLM":
        raise TypeError(
            f"smoothce: move_loss_into_model supports causal language models (loss_type "
            f"'ForCausalLM'), got {type(model).__name__} with loss_type {getattr(model, 'loss_type', None)!r}"
        )
    if trainer.compute_loss_func is not None:
        raise ValueError(
            f"smoothce: the Trainer has compute_loss_func={trainer.compute_loss_func!r}, a loss computed "
            "outside the model; move_loss_into_model would replace it"
        )
    eps = trainer.args.label_smoothing_factor
    if eps:
        # The Trainer now hands the labels to the model and reads the loss it returns.
        trainer.label_smoother = None
        model.loss_function = functools.partial(causal_lm_loss, label_smoothing=eps)
    if getattr(model.forward, "_smoothce_loss_only", False):
        return
    forward = model.forward

    @functools.wraps(forward)  # the Trainer reads the signature to pick the batch's columns
    def forward_loss_only_in_training(*args, **kwargs):
        out = forward(*args, **kwargs)
        if model.training and out.loss is not None:
            # Nothing else is returned, so nothing else (logits, KV cache) has to exist.
            return type(out)(loss=out.loss)
        return out

    forward_loss_only_in_training._smoothce_loss_only = True
    model.forward = forward_loss_only_in_training
