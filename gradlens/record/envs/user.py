"""The user environment: a local Hugging Face model directory and a preference file.

The model and tokenizer load with ``from_pretrained(PATH, local_files_only=True)``:
nothing is downloaded. The data is JSONL, CSV, Parquet or a saved ``datasets``
directory in TRL's standard, conversational or implicit-prompt format (see ``gradlens.record.data``), tokenised the TRL way
(``gradlens.record.tokenization``). Evaluations use ``--eval-data`` when given,
otherwise a fixed subset (the first ``EVAL_SUBSET`` pairs) of the training data,
and report the policy's log-probs of chosen and rejected, the preference accuracy
of the implicit reward, its mean margin and the DPO loss. Without ``--eval-data``
the accuracy is logged as ``eval/train_pair_accuracy``, never as held-out accuracy.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RecordConfig
from ..data import Columns, load_preferences
from ..tokenization import collate_pairs, tokenize_preferences
from ...runs.schema import EVAL_PREF_ACCURACY, EVAL_TRAIN_PAIR_ACCURACY
from .base import TokenPairsEnv, pair_margins
from .registry import EnvDefaults, register_env

EVAL_SUBSET = 64
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"{path}: model directory not found; --model takes a local directory written by save_pretrained "
            "(gradlens never downloads models)"
        )
    if not path.is_dir():
        raise ValueError(f"{path}: --model must be a directory written by save_pretrained, not a file")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path


def load_model_and_tokenizer(path: Path, dtype: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for unusable directories
        raise ValueError(f"{path}: could not load a tokenizer: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=TORCH_DTYPES[dtype])
    except Exception as exc:
        raise ValueError(f"{path}: could not load a causal language model: {exc}") from exc
    return model, tokenizer


def add_lora(model: nn.Module, cfg: RecordConfig) -> nn.Module:
    """``model`` with a fresh LoRA adapter (B = 0: the policy starts as the base model, the reference)."""
    try:
        import peft
    except ImportError as exc:
        raise ValueError("--lora-r needs peft, which is not installed: pip install 'gradlens[peft]'") from exc
    targets = [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()]
    config = peft.LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha,  # config.with_env_defaults resolved the default, 2 x rank
        target_modules=targets[0] if targets == ["all-linear"] else targets, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
    )  # fmt: skip
    torch.manual_seed(cfg.seed)  # the adapter's A matrices are random
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")  # GPT-2's Conv1D: peft fixes it itself
            return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise ValueError(f"--lora-target-modules {cfg.lora_target_modules!r}: {exc}") from exc


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# lr 1e-6 is TRL's DPOConfig default, made for large models and long runs.
DEFAULTS = EnvDefaults(lr=1e-6, optimizer="adamw", batch_size=8, steps=100, eval_every=25, checkpoint_every=50, max_length=1024)


@register_env("user", help="your own --model DIR trained on --data PATH", defaults=DEFAULTS, model_and_data=True, lora=True, fsdp=True)
class UserEnv(TokenPairsEnv):
    save_reference = False  # the reference is the model directory itself

    def __init__(self, cfg: RecordConfig, *, reference_weights=None, log=print, progress: bool = False):
        """``reference_weights`` and ``progress`` are the registry's keywords: the model directory is the reference."""
        model_dir = check_model_dir(cfg.model)
        columns = Columns(cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
        data = load_preferences(cfg.data, columns)
        eval_data = load_preferences(cfg.eval_data, columns) if cfg.eval_data else None
        self.policy, self.tokenizer = load_model_and_tokenizer(model_dir, cfg.dtype)
        if cfg.lora_r:
            self.policy = add_lora(self.policy, cfg)
        self.policy.eval()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"{model_dir}: the tokenizer has neither a pad token nor an EOS token to pad with")
        self.pad_token_id = pad
        self.max_length = cfg.max_length
        limit = max_positions(self.policy)
        if limit is not None and limit < self.max_length:
            if cfg.max_length != DEFAULTS.max_length:  # only warn when the user chose the value
                warnings.warn(f"--max-length {cfg.max_length} exceeds the model's {limit} positions; using {limit}", UserWarning, stacklevel=2)
            self.max_length = limit
        tokenized = tokenize_preferences(self.tokenizer, data, self.max_length)
        self.pairs = tokenized.pairs
        self._info = {
            "num_pairs": len(self.pairs),
            "data_rows_skipped_identical": data.skipped_identical,
            "pairs_truncated": tokenized.truncated,
            "pairs_identical_after_truncation": tokenized.identical_after_truncation,
            "conversational": data.conversational,
            "implicit_prompts": data.implicit_prompts,
            "max_length_used": self.max_length,
        }
        if cfg.lora_r:
            trainable = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
            self._info["lora"] = {"trainable_parameters": trainable, "parameters": sum(p.numel() for p in self.policy.parameters()),
                                  "target_modules": sorted(self.policy.peft_config["default"].target_modules)}
        if tokenized.truncated:
            warnings.warn(
                f"{data.path}: {tokenized.truncated} pair(s) were longer than --max-length {self.max_length} tokens and were "
                "truncated (TRL keep_start: the end of the completion is cut)",
                UserWarning,
                stacklevel=2,
            )
        if tokenized.identical_after_truncation:
            warnings.warn(
                f"{data.path}: skipped {tokenized.identical_after_truncation} pair(s) whose chosen and rejected are identical "
                f"after truncation to {self.max_length} tokens",
                UserWarning,
                stacklevel=2,
            )
        self.eval_on_training_pairs = eval_data is None
        if eval_data is not None:
            self.eval_pairs = tokenize_preferences(self.tokenizer, eval_data, self.max_length).pairs
            self._info["eval_source"] = str(eval_data.path)
        else:
            self.eval_pairs = self.pairs[:EVAL_SUBSET]
            self._info["eval_source"] = f"first {len(self.eval_pairs)} training pairs"
        self.eval_batch = max(1, cfg.batch_size)

    @torch.no_grad()
    def evaluate(self, policy: nn.Module, reference: nn.Module, *, beta: float, device: torch.device) -> dict[str, float]:
        step = self.eval_batch
        batches = [collate_pairs(self.eval_pairs[i : i + step], self.pad_token_id, device) for i in range(0, len(self.eval_pairs), step)]
        metrics = pair_margins(self.logps, policy, reference, batches, beta)
        if self.eval_on_training_pairs:
            # Accuracy on pairs the policy trains on is not held-out accuracy: name it so.
            metrics[EVAL_TRAIN_PAIR_ACCURACY] = metrics.pop(EVAL_PREF_ACCURACY)
        return metrics

    def info(self) -> dict[str, Any]:
        return dict(self._info)
