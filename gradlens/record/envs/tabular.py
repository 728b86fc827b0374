r"""The tabular environment: softmax logits θ[x, y] over discrete prompts and responses.

This is the setting of the paper's theory. Everything is known exactly:

* a reward table r(x, y) and a reference policy π_ref = softmax(θ_ref);
* training and held-out pairs: (y1, y2) drawn from π_ref(·|x) and labelled by
  Bradley–Terry on r, P(y1 ≻ y2) = σ(r(x, y1) − r(x, y2));
* the population optimum of the DPO objective, π* ∝ π_ref · exp(r/β), so
  ``eval/kl_to_optimum`` = mean_x KL(π_θ(·|x) ‖ π*(·|x)) measures convergence;
* ``eval/ood_mass``: the mean probability π_θ puts on responses that appear in
  no training pair for their prompt -- where mass pushed off rejected responses goes.

The policy is an ``nn.Embedding`` holding θ, so the recorder's Embedding rule
splits its gradient exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ...runs import schema
from ..config import RecordConfig
from .base import PreferenceEnv, pair_margins
from .registry import EnvDefaults, register_env

NUM_PROMPTS = 8
NUM_RESPONSES = 16
TRAIN_PAIRS_PER_PROMPT = 8
HELDOUT_PAIRS_PER_PROMPT = 16
REFERENCE_SCALE = 1.5  # spread of θ_ref: some responses are rare, so some never appear in a pair


class TabularPolicy(nn.Module):
    """log π(y|x) = log softmax(θ[x])[y]."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.logits = nn.Embedding(theta.shape[0], theta.shape[1])
        with torch.no_grad():
            self.logits.weight.copy_(theta)

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        return self.logits(prompts)

    def table(self) -> torch.Tensor:
        return torch.log_softmax(self.logits.weight.detach().double(), dim=-1)


def _sample_pairs(theta: torch.Tensor, reward: torch.Tensor, per_prompt: int, gen: torch.Generator) -> torch.Tensor:
    """(N, 3) rows (x, chosen y, rejected y), y1 != y2, labelled by Bradley-Terry."""
    probs = torch.softmax(theta, dim=-1)
    rows = []
    for x in range(theta.shape[0]):
        while sum(1 for r in rows if r[0] == x) < per_prompt:
            y1, y2 = torch.multinomial(probs[x], 2, replacement=True, generator=gen).tolist()
            if y1 == y2:
                continue
            p_first = torch.sigmoid(reward[x, y1] - reward[x, y2])
            first_wins = bool(torch.rand((), generator=gen) < p_first)
            rows.append((x, y1, y2) if first_wins else (x, y2, y1))
    return torch.tensor(rows, dtype=torch.long)


@register_env(
    "tabular", help="softmax logits over discrete prompts and responses, with a known optimum",
    defaults=EnvDefaults(lr=0.05, optimizer="adam", batch_size=32, steps=300, eval_every=25, checkpoint_every=100, max_length=2),
    small=True,
)  # fmt: skip
class TabularEnv(PreferenceEnv):
    save_reference = False  # rebuilt exactly from the seed

    def __init__(self, cfg: RecordConfig, *, reference_weights=None, log=print, progress: bool = False):
        """Everything comes from ``cfg.seed``; the keywords are the registry's and unused here."""
        gen = torch.Generator().manual_seed(cfg.seed)
        self.theta_ref = REFERENCE_SCALE * torch.randn(NUM_PROMPTS, NUM_RESPONSES, generator=gen, dtype=torch.float64)
        self.reward = torch.randn(NUM_PROMPTS, NUM_RESPONSES, generator=gen, dtype=torch.float64)
        self.train_pairs = _sample_pairs(self.theta_ref, self.reward, TRAIN_PAIRS_PER_PROMPT, gen)
        self.heldout_pairs = _sample_pairs(self.theta_ref, self.reward, HELDOUT_PAIRS_PER_PROMPT, gen)
        seen = torch.zeros(NUM_PROMPTS, NUM_RESPONSES, dtype=torch.bool)
        seen[self.train_pairs[:, 0], self.train_pairs[:, 1]] = True
        seen[self.train_pairs[:, 0], self.train_pairs[:, 2]] = True
        self.ood = ~seen
        self.policy = TabularPolicy(self.theta_ref.float())

    def num_pairs(self) -> int:
        return len(self.train_pairs)

    @staticmethod
    def _rows(pairs: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = torch.cat([pairs[:, 0], pairs[:, 0]])
        responses = torch.cat([pairs[:, 1], pairs[:, 2]])
        return prompts.to(device), responses.to(device)

    def make_batch(self, indices: Sequence[int], device: torch.device) -> Any:
        return self._rows(self.train_pairs[list(indices)], device)

    def logps(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        prompts, responses = batch
        logp = torch.log_softmax(model(prompts).float(), dim=-1)
        return logp.gather(1, responses[:, None]).squeeze(1), torch.ones_like(responses)

    def optimum(self, beta: float) -> torch.Tensor:
        """log π*(y|x), π* ∝ π_ref exp(r / β)."""
        return torch.log_softmax(torch.log_softmax(self.theta_ref, -1) + self.reward / beta, dim=-1)

    @torch.no_grad()
    def evaluate(self, policy: nn.Module, reference: nn.Module, *, beta: float, device: torch.device) -> dict[str, float]:
        logp = policy.table().cpu()
        logp_ref = reference.table().cpu()
        p = logp.exp()
        kl_opt = (p * (logp - self.optimum(beta))).sum(-1).mean()
        kl_ref = (p * (logp - logp_ref)).sum(-1).mean()
        metrics = {
            schema.EVAL_KL_TO_OPTIMUM: kl_opt.item(),
            schema.EVAL_OOD_MASS: (p * self.ood).sum(-1).mean().item(),
            schema.EVAL_TRUE_REWARD: (p * self.reward).sum(-1).mean().item(),
            schema.EVAL_KL_TO_REF: kl_ref.item(),
        }
        batches = [self._rows(self.heldout_pairs, device)]
        metrics.update(pair_margins(self.logps, policy, reference, batches, beta))
        return metrics

    def info(self) -> dict[str, Any]:
        return {
            "num_pairs": self.num_pairs(),
            "num_prompts": NUM_PROMPTS,
            "num_responses": NUM_RESPONSES,
            "heldout_pairs": len(self.heldout_pairs),
            "ood_responses": int(self.ood.sum()),
        }
