"""The real-model environment: SmolLM2-135M-Instruct on preference pairs a program can verify.

The model is the one ``gradlens fetch smollm2`` caches (see ``gradlens.pretrained``).
The data is generated (``gradlens.verifiable.tasks``): arithmetic, unit conversions,
letter counts and capitals, each put through the model's chat template. A fixed
split of the prompts is held out.

Pairs are on-policy by default: the starting model samples ``SAMPLES`` completions
per prompt and the verifier labels them (chosen = first correct, rejected = first
wrong; where all samples are wrong the reference answer is chosen, where all are
right the plausible wrong answer is rejected, and ``env_info`` counts each kind);
the samples are cached by model hash and generation settings. The loss
``--pairs offpolicy`` uses the reference answer against a plausible wrong one.

Every evaluation reports, on the held-out prompts: preference accuracy and the
implicit-reward margin of the held-out pairs, their chosen/rejected log-probs and
the change of each since step 0 (likelihood displacement), the verifier's accuracy
of greedy answers, and KL(pi_theta || pi_ref) estimated from one sample of pi_theta
per prompt, with its standard error.

LoRA is the default (rank ``DEFAULT_LORA_R`` on every linear layer): full
fine-tuning of 135M weights keeps AdamW state and a full-size gradient (a 2-step
run peaked at 4.9 GiB, the whole LoRA job at 3.8 GiB) and its backward computes
every weight's gradient; ``--lora-r 0`` does it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...pretrained.fetch import cache_root, model_dir
from ...pretrained.load import load_causal_lm
from ...pretrained.sources import SMOLLM2
from ...runs import schema
from ...verifiable.sampling import SamplingSettings, TextPair, cached_samples, generate, messages, offpolicy_pairs, onpolicy_pairs
from ...verifiable.tasks import Task, make_tasks
from ...verifiable.verify import is_correct
from ..config import RecordConfig
from ..data import PreferenceRecord
from ..logps import token_logps
from ..tokenization import TokenBatch, TokenPair, collate_pairs, collate_sequences, tokenize_record, truncate_pair
from .base import TokenPairsEnv, pair_margins
from .registry import EnvDefaults, register_env
from .user import add_lora

SAMPLES = 4                 # completions sampled per prompt for on-policy pairs
MAX_NEW_TOKENS = 16         # the answers are a few words; longer samples are judged as cut
TEMPERATURE = 0.7           # sampling the pairs (the KL estimate samples pi_theta itself, at temperature 1)
EVAL_BATCH = 16             # rows per evaluation forward
DEFAULT_LORA_R = 8


def token_pair(tokenizer: Any, pair: TextPair, where: str, max_length: int) -> TokenPair:
    """A text pair through the chat template (the TRL rendering of conversational data), truncated TRL's way."""
    turn = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    record = PreferenceRecord(messages(pair.task), turn(pair.chosen), turn(pair.rejected), where)
    return truncate_pair(tokenize_record(tokenizer, record, conversational=True, source="smollm2"), max_length, "smollm2")[0]


def completion_logps(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` with the head applied only from the first completion token on (``logits_to_keep``):
    the prompt positions' logits over 49,152 tokens would be most of the memory and a fifth of the compute,
    and their gradient is zero. The result is the same sums."""
    width = batch.input_ids.shape[1]
    first = int(batch.completion_mask.to(torch.int8).argmax(dim=1).min())  # the earliest completion token of any row
    keep = width - first + 1  # positions first-1 .. width-1: position p predicts token p+1
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=keep).logits
    labels = batch.input_ids[:, first:]
    mask = batch.completion_mask[:, first:].bool()
    per_token = token_logps(logits[:, :-1], labels)
    logps = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
    return logps, mask.sum(-1)


@torch.no_grad()
def kl_to_reference(policy: nn.Module, reference: nn.Module, tokenizer: Any, tasks: list[Task], pad: int) -> tuple[float, float]:
    """KL(pi_theta || pi_ref) per prompt, estimated by one sample y ~ pi_theta: mean and standard error of
    log pi_theta(y|x) - log pi_ref(y|x) over the prompts (unbiased; its spread is what the error reports)."""
    texts = [s[0] for s in generate(policy, tokenizer, tasks, samples=1, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, batch=EVAL_BATCH)]
    prompts = [tokenizer.apply_chat_template(messages(t), tokenize=False, add_generation_prompt=True) for t in tasks]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    ratios = []
    device = next(policy.parameters()).device
    for i in range(0, len(tasks), EVAL_BATCH):
        batch = collate_sequences(prompt_ids[i : i + EVAL_BATCH], completion_ids[i : i + EVAL_BATCH], pad, device)
        ratios.append(completion_logps(policy, batch)[0].double() - completion_logps(reference, batch)[0].double())
    r = torch.cat(ratios)
    return r.mean().item(), (r.std(unbiased=True) / math.sqrt(len(r))).item() if len(r) > 1 else float("nan")


@register_env(
    "smollm2",
    help="a real pretrained chat model (SmolLM2-135M-Instruct; `gradlens fetch smollm2` first) on verifiable questions, on-policy pairs",
    defaults=EnvDefaults(lr=2e-4, optimizer="adamw", batch_size=4, steps=24, eval_every=12, checkpoint_every=24, max_length=128, lora_r=DEFAULT_LORA_R),
    lora=True,
)
class SmolLM2Env(TokenPairsEnv):
    save_reference = False  # the reference is the cached model itself

    def __init__(self, cfg: RecordConfig, *, reference_weights: Path | None = None, log=print, progress: bool = False):
        source = cfg.pairs
        path = model_dir(SMOLLM2)  # a clear message naming `gradlens fetch smollm2` when it is missing or damaged
        model, self.tokenizer = load_causal_lm(path, cfg.dtype)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = cfg.max_length
        tasks = make_tasks(cfg.prompts + cfg.prompts // 3, cfg.seed)
        self.train_tasks, self.eval_tasks = tasks[: cfg.prompts], tasks[cfg.prompts :]
        if source == "offpolicy":
            train, held = offpolicy_pairs(self.train_tasks), offpolicy_pairs(self.eval_tasks)
        else:
            settings = SamplingSettings(samples=SAMPLES, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, seed=cfg.seed, batch=EVAL_BATCH)
            weights = (path / "gradlens_source.json").read_text()  # holds the weights' sha256: the model's identity
            samples = cached_samples(model, self.tokenizer, tasks, settings, cache_dir=cache_root() / "samples",
                                     model_hash=weights, log=log)  # fmt: skip
            train, held = onpolicy_pairs(self.train_tasks, samples[: cfg.prompts]), onpolicy_pairs(self.eval_tasks, samples[cfg.prompts :])
        if not train or not held:  # only when a prompt's samples are all empty
            raise ValueError(f"smollm2: the model's samples gave {len(train)} training and {len(held)} held-out pairs; "
                             "try another --seed or --pairs offpolicy")  # fmt: skip
        kinds = {kind: sum(p.kind == kind for p in train + held) for kind in dict.fromkeys(p.kind for p in train + held)}
        self.pairs = [token_pair(self.tokenizer, p, f"training prompt {i}", self.max_length) for i, p in enumerate(train)]
        self.eval_pairs = [token_pair(self.tokenizer, p, f"held-out prompt {i}", self.max_length) for i, p in enumerate(held)]
        self.policy = add_lora(model, cfg) if cfg.lora_r else model
        self.policy.eval()
        self._start: dict[str, float] | None = None
        self._info = {"model": str(path), "pairs": source, "training_prompts": len(self.train_tasks), "held_out_prompts": len(self.eval_tasks),
                      "num_pairs": len(self.pairs), "held_out_pairs": len(self.eval_pairs), "samples_per_prompt": SAMPLES if source == "onpolicy" else 0,
                      "lora_r": cfg.lora_r, "pair_kinds": kinds}  # fmt: skip

    @torch.no_grad()
    def evaluate(self, policy: nn.Module, reference: nn.Module, *, beta: float, device: torch.device) -> dict[str, float]:
        batches = [collate_pairs(self.eval_pairs[i : i + EVAL_BATCH // 2], self.pad_token_id, device) for i in range(0, len(self.eval_pairs), EVAL_BATCH // 2)]
        metrics = pair_margins(self.logps, policy, reference, batches, beta)
        if self._start is None:  # the frozen reference is the step-0 policy, also after --resume
            self._start = pair_margins(self.logps, reference, reference, batches, beta)
        for change, logps in ((schema.EVAL_LOGPS_CHANGE_CHOSEN, schema.EVAL_LOGPS_CHOSEN), (schema.EVAL_LOGPS_CHANGE_REJECTED, schema.EVAL_LOGPS_REJECTED)):
            metrics[change] = metrics[logps] - self._start[logps]
        greedy = generate(policy, self.tokenizer, self.eval_tasks, samples=1, max_new_tokens=MAX_NEW_TOKENS, batch=EVAL_BATCH)
        metrics[schema.EVAL_VERIFIER_ACCURACY] = sum(is_correct(t, s[0]) for t, s in zip(self.eval_tasks, greedy)) / len(self.eval_tasks)
        metrics[schema.EVAL_KL_TO_REF], metrics[schema.EVAL_KL_TO_REF_SE] = kl_to_reference(policy, reference, self.tokenizer, self.eval_tasks, self.pad_token_id)
        return metrics

    def logps(self, model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(model, batch)

    def info(self) -> dict[str, Any]:
        return dict(self._info)
