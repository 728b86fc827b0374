r"""The tiny-gpt2 environment: a controlled-sentiment task in miniature.

In the spirit of the DPO paper's controlled-sentiment experiment, with every
piece built here so that nothing is downloaded:

* **Synthetic language.** Prompts are ``BOS w1 .. wk SEP`` (k = 2..4 words).
  A completion is 3..6 words from a fixed random bigram chain (its first word
  depends on the prompt's last word), then ``EOS``. Of the 32 words, 8 are
  positive, 8 negative and 16 neutral.
* **Ground-truth reward** over token sequences:
  r(x, y) = (#positive words − #negative words) / #words of y, in [−1, 1].
* **Model.** A transformers GPT-2 built from a config (2 layers, width 48,
  tied embeddings) with random initialisation, then a short **SFT warm-start**
  on the synthetic language (completion tokens only). The warm-started model
  is the starting policy and the reference.
* **Pairs.** Two completions sampled from the language for the same prompt,
  labelled by Bradley–Terry on r with scale ``PREFERENCE_SCALE``.
* **Evaluations.** ``eval/true_reward``: mean r of completions sampled from the
  policy for held-out prompts; ``eval/kl_to_ref``: the Monte-Carlo estimate
  mean(ℓ_θ − ℓ_ref) on those samples; ``eval/pref_accuracy``: held-out pairs whose
  implicit reward ranks chosen above rejected. Sampling uses a generator
  re-seeded at every evaluation, so evaluations share their random numbers.

Data generation uses Python's ``random.Random(seed)``, so the pairs are identical
on every machine; the SFT weights are saved in the run directory for ``--resume``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import nn

from ...runs import schema
from ..config import RecordConfig
from ..logps import sequence_logps
from ..tokenization import TokenPair, collate_pairs, collate_sequences, truncate_pair
from .base import TokenPairsEnv, pair_margins
from .registry import EnvDefaults, register_env

PAD, BOS, SEP, EOS = 0, 1, 2, 3
FIRST_WORD, NUM_WORDS = 4, 32
VOCAB_SIZE = FIRST_WORD + NUM_WORDS
POSITIVE = frozenset(range(FIRST_WORD, FIRST_WORD + 8))
NEGATIVE = frozenset(range(FIRST_WORD + 8, FIRST_WORD + 16))
MIN_WORDS, MAX_WORDS = 3, 6
PREFERENCE_SCALE = 4.0
TRAIN_PAIRS, HELDOUT_PAIRS, EVAL_PROMPTS = 512, 128, 64
SFT_BATCH, SFT_LR = 32, 3e-3
EVAL_BATCH = 64

MODEL_CONFIG = dict(n_layer=2, n_head=2, n_embd=48, n_positions=32)


def true_reward(completion: list[int] | tuple[int, ...]) -> float:
    """(#positive − #negative) / #words, counting tokens before EOS."""
    words = []
    for token in completion:
        if token == EOS:
            break
        words.append(token)
    if not words:
        return 0.0
    return (sum(t in POSITIVE for t in words) - sum(t in NEGATIVE for t in words)) / len(words)


class SyntheticLanguage:
    """Prompts and completions from a fixed random bigram chain over the words."""

    def __init__(self, seed: int):
        rng = random.Random(f"gradlens-tiny-gpt2-language-{seed}")
        words = list(range(FIRST_WORD, FIRST_WORD + NUM_WORDS))
        self.words = words
        self.successors = {}
        for w in words:  # each word has 4 favourite successors
            favourites = set(rng.sample(words, 4))
            self.successors[w] = [5.0 if v in favourites else 0.2 for v in words]

    def prompt(self, rng: random.Random) -> tuple[int, ...]:
        return (BOS, *rng.choices(self.words, k=rng.randint(2, 4)), SEP)

    def completion(self, prompt: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
        out, previous = [], prompt[-2]
        for _ in range(rng.randint(MIN_WORDS, MAX_WORDS)):
            previous = rng.choices(self.words, weights=self.successors[previous])[0]
            out.append(previous)
        return (*out, EOS)

    def pairs(self, n: int, rng: random.Random) -> list[TokenPair]:
        pairs = []
        while len(pairs) < n:
            x = self.prompt(rng)
            y1, y2 = self.completion(x, rng), self.completion(x, rng)
            if y1 == y2:
                continue
            p_first = 1.0 / (1.0 + math.exp(-PREFERENCE_SCALE * (true_reward(y1) - true_reward(y2))))
            chosen, rejected = (y1, y2) if rng.random() < p_first else (y2, y1)
            pairs.append(TokenPair(x, chosen, rejected, f"pair {len(pairs)}"))
        return pairs


def build_model(seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **MODEL_CONFIG,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def sft_warm_start(model: nn.Module, language: SyntheticLanguage, steps: int, seed: int, log, progress: bool = False) -> float:
    """Completion-only next-token training on the synthetic language; returns the last loss.

    ``progress``: a bar on stderr (the warm-start takes ~20 s on a laptop CPU; silence looks like a hang)."""
    from ..progress import Progress

    bar = Progress(steps, desc="tiny-gpt2 SFT warm-start", enabled=progress and steps > 0)
    rng = random.Random(f"gradlens-tiny-gpt2-sft-{seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        prompts = [language.prompt(rng) for _ in range(SFT_BATCH)]
        batch = collate_sequences(prompts, [language.completion(p, rng) for p in prompts], PAD)
        logps, lengths = sequence_logps(model, batch)
        loss = -(logps.sum() / lengths.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        bar.advance(f"nll={loss_value:.3g}")
    bar.close()
    model.eval()
    if steps:
        log(f"tiny-gpt2: SFT warm-start {steps} steps, final per-token NLL {loss_value:.3f}")
    return loss_value


@register_env(
    "tiny-gpt2", help="a 2-layer GPT-2 on a synthetic language with a programmatic reward",
    defaults=EnvDefaults(lr=1e-3, optimizer="adamw", batch_size=16, steps=300, eval_every=25, checkpoint_every=100, max_length=32, sft_steps=300),
    small=True,
)  # fmt: skip
class TinyGPT2Env(TokenPairsEnv):
    save_reference = True  # the SFT result depends on float arithmetic: keep it

    def __init__(self, cfg: RecordConfig, *, reference_weights=None, log=print, progress: bool = False):
        self.seed = cfg.seed
        self.pad_token_id = PAD
        self.language = SyntheticLanguage(cfg.seed)
        data_rng = random.Random(f"gradlens-tiny-gpt2-data-{cfg.seed}")
        source = "tiny-gpt2 synthetic data"
        self.pairs = [truncate_pair(p, cfg.max_length, source)[0] for p in self.language.pairs(TRAIN_PAIRS, data_rng)]
        self.heldout = [truncate_pair(p, cfg.max_length, source)[0] for p in self.language.pairs(HELDOUT_PAIRS, data_rng)]
        self.eval_prompts = [self.language.prompt(data_rng) for _ in range(EVAL_PROMPTS)]
        self.policy = build_model(cfg.seed)
        if reference_weights is not None:
            from safetensors.torch import load_model

            load_model(self.policy, str(reference_weights))
            self.sft_loss = None
        else:
            self.sft_loss = sft_warm_start(self.policy, self.language, cfg.sft_steps, cfg.seed, log, progress)
        self.policy.eval()

    @torch.no_grad()
    def sample(self, model: nn.Module, device: torch.device) -> list[tuple[int, ...]]:
        """Completions for the eval prompts, at most MAX_WORDS + 1 tokens each."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 7919)
        out = []
        for start in range(0, len(self.eval_prompts), EVAL_BATCH):
            prompts = self.eval_prompts[start : start + EVAL_BATCH]
            completions = [[] for _ in prompts]
            done = [False] * len(prompts)
            for _ in range(MAX_WORDS + 1):
                batch = collate_sequences(prompts, [tuple(c) for c in completions], PAD, device, allow_empty=True)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                last = batch.attention_mask.sum(-1) - 1
                probs = torch.softmax(logits[torch.arange(len(prompts)), last].float().cpu(), dim=-1)
                tokens = torch.multinomial(probs, 1, generator=gen).squeeze(1).tolist()
                for i, t in enumerate(tokens):
                    if not done[i]:
                        completions[i].append(t)
                        done[i] = t == EOS
                if all(done):
                    break
            out.extend(tuple(c) for c in completions)
        return out

    @torch.no_grad()
    def evaluate(self, policy: nn.Module, reference: nn.Module, *, beta: float, device: torch.device) -> dict[str, float]:
        samples = self.sample(policy, device)
        batch = collate_sequences(self.eval_prompts, samples, PAD, device)
        pol, _ = sequence_logps(policy, batch)
        ref, _ = sequence_logps(reference, batch)
        metrics = {
            schema.EVAL_TRUE_REWARD: sum(true_reward(s) for s in samples) / len(samples),
            schema.EVAL_KL_TO_REF: (pol - ref).double().mean().item(),
            schema.EVAL_SAMPLE_LENGTH: sum(len(s) for s in samples) / len(samples),
        }
        batches = [collate_pairs(self.heldout[i : i + EVAL_BATCH], PAD, device) for i in range(0, len(self.heldout), EVAL_BATCH)]
        metrics.update(pair_margins(self.logps, policy, reference, batches, beta))
        return metrics

    def info(self) -> dict[str, Any]:
        return {
            "num_pairs": len(self.pairs),
            "heldout_pairs": len(self.heldout),
            "eval_prompts": len(self.eval_prompts),
            "vocab_size": VOCAB_SIZE,
            "model": MODEL_CONFIG,
            "sft_final_nll": self.sft_loss,
        }
