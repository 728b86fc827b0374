"""Preference pairs from the model's own samples, labelled by the verifier, and cached.

On-policy (the default): each prompt gets ``samples`` completions sampled from the
starting model; the first verified-correct one is chosen and the first wrong one
rejected. A prompt whose samples are all wrong takes the reference answer as
chosen, and one whose samples are all right takes the task's plausible wrong answer
as rejected, so every prompt gives a pair with at least one side sampled (each
pair says which kind it is; the environment reports the counts). Off-policy: the task's reference answer against its
plausible wrong answer. Either way the completion texts are rendered through the
chat template as an assistant turn, as TRL renders conversational data.

Sampling is the slow part, so the samples are cached as JSON (never pickle) under
a key made of the model's weights hash, the generation settings and the prompts:
a changed model, setting or task list samples afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .tasks import Task
from .verify import is_correct

SYSTEM = "You are a helpful assistant. Answer briefly."


@dataclass(frozen=True)
class SamplingSettings:
    samples: int = 4            # completions per prompt
    max_new_tokens: int = 24
    temperature: float = 1.0
    seed: int = 0
    batch: int = 32             # prompts per generate call


@dataclass(frozen=True)
class TextPair:
    task: Task
    chosen: str
    rejected: str
    kind: str = "offpolicy"  # "onpolicy" (both sampled), "reference_chosen", "template_rejected" or "offpolicy"


def messages(task: Task) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.question}]


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order: the model's identity for the cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, tasks: Sequence[Task], *, samples: int, max_new_tokens: int,
             temperature: float = 0.0, batch: int = 32) -> list[list[str]]:  # fmt: skip
    """``samples`` completions per task (greedy when ``temperature`` is 0), as text without special tokens."""
    prompts = [tokenizer.apply_chat_template(messages(t), tokenize=False, add_generation_prompt=True) for t in tasks]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues every row at the right end
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch):
            enc = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=samples, logits_to_keep=1,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)  # fmt: skip
            texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out.extend([t.strip() for t in texts[i : i + samples]] for i in range(0, len(texts), samples))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def _cache_file(cache_dir: Path, model_hash: str, settings: SamplingSettings, tasks: Sequence[Task]) -> Path:
    key = json.dumps({"model": model_hash, "settings": asdict(settings), "system": SYSTEM, "prompts": [t.question for t in tasks]}, sort_keys=True)
    return cache_dir / f"samples-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def cached_samples(model: nn.Module, tokenizer: Any, tasks: Sequence[Task], settings: SamplingSettings, *,
                   cache_dir: Path, model_hash: str, log: Callable[[str], None] = print) -> list[list[str]]:  # fmt: skip
    """The samples of ``tasks`` from the cache, or sampled now (seeded) and cached."""
    path = _cache_file(cache_dir, model_hash, settings, tasks)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if len(stored["samples"]) == len(tasks):
            return stored["samples"]
    except (OSError, ValueError, KeyError):
        pass  # not cached yet, or a damaged file of ours: sample again
    log(f"sampling {settings.samples} completions for each of {len(tasks)} prompts (cached afterwards in {path.parent}) ...")
    torch.manual_seed(settings.seed)
    samples = generate(model, tokenizer, tasks, samples=settings.samples, max_new_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, batch=settings.batch)  # fmt: skip
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": asdict(settings), "model": model_hash, "samples": samples}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs time on the next run, nothing else
        log(f"note: could not cache the samples in {cache_dir}: {exc.strerror or exc}")
    return samples


def onpolicy_pairs(tasks: Sequence[Task], samples: Sequence[Sequence[str]]) -> list[TextPair]:
    """(first correct, first wrong) of each task's samples; the reference or the plausible wrong answer fills a missing side."""
    pairs = []
    for task, texts in zip(tasks, samples):
        right = [t for t in texts if t and is_correct(task, t)]
        wrong = [t for t in texts if t and not is_correct(task, t)]
        if right and wrong:
            pairs.append(TextPair(task, right[0], wrong[0], "onpolicy"))
        elif wrong:
            pairs.append(TextPair(task, task.answer, wrong[0], "reference_chosen"))
        elif right:
            pairs.append(TextPair(task, right[0], task.wrong, "template_rejected"))
    return pairs


def offpolicy_pairs(tasks: Sequence[Task]) -> list[TextPair]:
    """The reference answer against the task's plausible wrong answer."""
    return [TextPair(t, t.answer, t.wrong) for t in tasks]
