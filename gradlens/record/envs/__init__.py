"""Built-in training environments (described in docs/recording.md), one module each, and their factory."""

from __future__ import annotations

from pathlib import Path

from ..config import RecordConfig
from .base import PreferenceEnv


def build_env(cfg: RecordConfig, *, reference_weights: Path | None = None, log=print, progress: bool = False) -> PreferenceEnv:
    """The environment ``cfg.env``; ``reference_weights`` replaces a warm-start on resume;
    ``progress`` shows a bar for slow set-up work (tiny-gpt2's SFT warm-start)."""
    if cfg.env == "tabular":
        from .tabular import TabularEnv

        return TabularEnv(cfg)
    if cfg.env == "tiny-gpt2":
        from .tiny_gpt2 import TinyGPT2Env

        return TinyGPT2Env(cfg, reference_weights=reference_weights, log=log, progress=progress)
    if cfg.env == "user":
        from .user import UserEnv

        return UserEnv(cfg, log=log)
    raise ValueError(f"unknown environment {cfg.env!r}")


# Config fields that decide what an environment builds; runs that agree on them share one.
ENV_FIELDS = ("env", "model", "data", "eval_data", "prompt_column", "chosen_column", "rejected_column", "seed", "max_length", "sft_steps", "dtype", "batch_size",
              "lora_r", "lora_alpha", "lora_target_modules", "lora_dropout")

__all__ = ["ENV_FIELDS", "PreferenceEnv", "build_env"]
