"""What a training environment provides to the recording loop.

An environment owns its data and its starting policy. The loop owns the
optimisation: it copies the starting policy into a trainable policy and a
frozen reference, asks the environment for batches in the [chosen; rejected]
layout and their sequence log-probs, and calls ``evaluate`` every few steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import nn

from ...pairs import split_pairs
from ...runs import schema
from ..logps import sequence_logps
from ..tokenization import TokenBatch, TokenPair, collate_pairs


class PreferenceEnv(ABC):
    """A starting policy, training pairs and an evaluation."""

    name: str = ""
    # True when the starting policy can only be rebuilt by re-running setup that is
    # not bit-reproducible (e.g. an SFT warm-start): the loop then saves its weights
    # into the run directory so --resume uses the same reference.
    save_reference: bool = True

    policy: nn.Module
    tokenizer: Any = None  # a Hugging Face tokenizer, saved with each checkpoint when there is one

    @abstractmethod
    def num_pairs(self) -> int: ...

    @abstractmethod
    def make_batch(self, indices: Sequence[int], device: torch.device) -> Any:
        """Training pairs ``indices`` as one batch of 2b rows (chosen rows first)."""

    @abstractmethod
    def logps(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed completion log-probs (2b,), completion lengths (2b,))."""

    @abstractmethod
    def evaluate(self, policy: nn.Module, reference: nn.Module, *, beta: float, device: torch.device) -> dict[str, float]:
        """Evaluation metrics named ``eval/...``."""

    def info(self) -> dict[str, Any]:
        """Facts about the data, stored in config.json under ``env_info``."""
        return {"num_pairs": self.num_pairs()}


class TokenPairsEnv(PreferenceEnv):
    """Shared batching for environments whose pairs are token sequences."""

    pairs: list[TokenPair]
    pad_token_id: int

    def num_pairs(self) -> int:
        return len(self.pairs)

    def make_batch(self, indices: Sequence[int], device: torch.device) -> TokenBatch:
        return collate_pairs([self.pairs[i] for i in indices], self.pad_token_id, device)

    def logps(self, model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(model, batch)


@torch.no_grad()
def pair_margins(env_logps, policy: nn.Module, reference: nn.Module, batches: Sequence[Any], beta: float) -> dict[str, float]:
    """Held-out policy log-probs, preference accuracy, mean implicit-reward margin and DPO loss."""
    margins, chosen, rejected = [], [], []
    for batch in batches:
        pol, _ = env_logps(policy, batch)
        ref, _ = env_logps(reference, batch)
        (pol_c, pol_r), (ref_c, ref_r) = split_pairs(pol), split_pairs(ref)
        margins.append(beta * ((pol_c - ref_c) - (pol_r - ref_r)))
        chosen.append(pol_c)
        rejected.append(pol_r)
    m = torch.cat(margins).double()
    return {
        schema.EVAL_LOGPS_CHOSEN: torch.cat(chosen).double().mean().item(),
        schema.EVAL_LOGPS_REJECTED: torch.cat(rejected).double().mean().item(),
        schema.EVAL_PREF_ACCURACY: (m > 0).double().mean().item(),
        schema.EVAL_MARGIN: m.mean().item(),
        schema.EVAL_DPO_LOSS: (-torch.nn.functional.logsigmoid(m)).mean().item(),
    }
