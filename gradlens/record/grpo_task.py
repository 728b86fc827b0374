r"""The built-in GRPO toy task: a digit successor with a verifier, small enough to train in seconds.

* **Prompts.** ``BOS a b`` for digits a, b in 0..K-1 (K = ``NUM_DIGITS``): K² prompts.
* **Completions.** ``ANSWER_TOKENS`` tokens sampled from the policy (no stop token, so every
  completion has the same length and no padding is needed).
* **Verifier reward.** The share of completion tokens equal to (a + 1) mod K, in [0, 1]
  (b is a distractor): checked by a rule, not learned, like the answer check of a maths task.
  A rule the tiny policy learns within a few hundred GRPO steps; (a + b) mod K was tried
  first and did not move in 300 steps, which would make a poor toy.
* **Policy.** A transformers GPT-2 built from a config (2 layers, width 32, tied
  embeddings), randomly initialised with the run's seed; nothing is downloaded.
* **Evaluation.** ``eval/true_reward``: the mean verifier reward of the greedy completion
  of every prompt.

At initialisation a completion token is right with probability about 1/(K + 1), so most
prompt groups have completions of different rewards: both signs of advantage appear.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_DIGITS = 7
BOS = NUM_DIGITS  # token ids: digits 0..K-1, then BOS
VOCAB_SIZE = NUM_DIGITS + 1
PROMPT_TOKENS = 3
ANSWER_TOKENS = 3
MODEL_CONFIG = dict(n_layer=2, n_head=2, n_embd=32, n_positions=PROMPT_TOKENS + ANSWER_TOKENS)


def build_policy(seed: int) -> nn.Module:
    """The starting policy: a tiny GPT-2 with dropout off (the split is of a deterministic function)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=BOS, eos_token_id=BOS, **MODEL_CONFIG)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def all_prompts() -> torch.Tensor:
    """Every prompt, (K², 3)."""
    a, b = torch.meshgrid(torch.arange(NUM_DIGITS), torch.arange(NUM_DIGITS), indexing="ij")
    return torch.stack([torch.full_like(a, BOS), a, b], dim=-1).reshape(-1, PROMPT_TOKENS)


def sample_prompts(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` prompts drawn uniformly (with replacement), (count, 3)."""
    prompts = all_prompts()
    return prompts[torch.randint(len(prompts), (count,), generator=generator)]


def verifier_reward(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Share of completion tokens equal to (a + 1) mod K, one float per row."""
    answer = (prompts[:, 1] + 1) % NUM_DIGITS
    return (completions == answer[:, None]).float().mean(dim=1)


@torch.no_grad()
def sample(policy: nn.Module, prompts: torch.Tensor, generator: torch.Generator, *, greedy: bool = False) -> torch.Tensor:
    """Completions of ``ANSWER_TOKENS`` tokens, (rows, ANSWER_TOKENS); the random draws use ``generator``."""
    ids = prompts
    for _ in range(ANSWER_TOKENS):
        logits = policy(input_ids=ids).logits[:, -1].float()
        if greedy:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator).squeeze(1).to(ids.device)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids[:, PROMPT_TOKENS:]


def completion_logps(policy: nn.Module, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of the completion tokens, (rows, ANSWER_TOKENS)."""
    ids = torch.cat([prompts, completions], dim=1)
    logits = policy(input_ids=ids).logits[:, PROMPT_TOKENS - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, completions[..., None]).squeeze(-1)


@torch.no_grad()
def greedy_reward(policy: nn.Module, device: torch.device) -> float:
    """Mean verifier reward of the greedy completion of every prompt."""
    prompts = all_prompts().to(device)
    return verifier_reward(prompts, sample(policy, prompts, torch.Generator(), greedy=True)).mean().item()
