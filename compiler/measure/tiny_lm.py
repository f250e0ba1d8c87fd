"""A tiny language model to train in the demo and in the benchmarks' compile-time run.

Embedding -> one pre-norm MLP block -> LM head (no bias): the smallest model whose loss reads an
LM head. ``model(idx)`` gives the logits; ``model(idx, target)`` the label-smoothed
``F.cross_entropy`` over the tokens that are not padding. :func:`smoothed_cross_entropy` is the
same loss written out by hand, as training scripts do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 0  # the padding token: its positions count in no loss


class TinyLM(torch.nn.Module):
    # Defaults: V, D, sequences per batch, tokens per sequence, label smoothing.
    V, D, BATCH, SEQ, SMOOTHING = 8192, 256, 4, 256, 0.1

    def __init__(self, vocab: int = V, dim: int = D, smoothing: float = SMOOTHING):
        super().__init__()
        self.smoothing = smoothing
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(idx)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        logits = self.head(h)
        if target is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD,
                               label_smoothing=self.smoothing)

    @classmethod
    def build(cls, device, vocab: int = V, dim: int = D, batch: int = BATCH, seq: int = SEQ,
              smoothing: float = SMOOTHING, seed: int = 0):
        """``(model, idx, target)``: the same weights and batch for the same arguments, in any process.

        Sequences are ragged, as a batch of documents is: each ends in padding from a random
        length on; ``target`` is ``idx`` shifted by one token."""
        torch.manual_seed(seed)
        model = cls(vocab, dim, smoothing).to(device)
        gen = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(1, vocab, (batch, seq + 1), generator=gen)
        lengths = torch.randint(seq // 2, seq + 2, (batch, 1), generator=gen)
        tokens[torch.arange(seq + 1).expand(batch, -1) >= lengths] = PAD
        return model, tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Label-smoothed cross-entropy written out by hand, padding masked, as training scripts do.

    (1 - eps) * nll + eps * (mean over classes of -log p): F.cross_entropy's eps/V convention.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    smooth = -logprobs.mean(dim=-1)
    loss = (1.0 - eps) * nll + eps * smooth
    mask = (target != PAD).float()
    return (loss * mask).sum() / mask.sum()
