"""Sequence log-probabilities ℓ(y|x): the sum of the completion tokens' log-probs.

Prompt and padding positions are masked out (docs/recording.md, Conventions). Logits are upcast
to float32 before the log-softmax so bf16/fp16 models give stable sums.
"""

from __future__ import annotations

import torch
from torch import nn

from .tokenization import TokenBatch


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] without materialising the full log-softmax."""
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (summed completion log-probs (R,), completion token counts (R,)).

    Position t's logits predict token t+1, so the completion mask is shifted by one.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    labels = batch.input_ids[:, 1:]
    mask = batch.completion_mask[:, 1:].bool()
    per_token = token_logps(logits[:, :-1], labels)
    # where(), not multiplication: a masked position may hold -inf and -inf * 0 is nan.
    logps = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
    return logps, mask.sum(-1)
