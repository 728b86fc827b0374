"""Training environments (described in docs/recording.md), one module each, and their factory.

Each environment module registers itself with ``registry.register_env``; this
package finds them on first use, so a new environment is one new module here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .base import PreferenceEnv
from .registry import get_env

if TYPE_CHECKING:  # config imports this package's registry, so only for the annotations
    from ..config import RecordConfig


def build_env(cfg: RecordConfig, *, reference_weights: Path | None = None, log=print, progress: bool = False) -> PreferenceEnv:
    """The environment ``cfg.env``; ``reference_weights`` replaces a warm-start on resume;
    ``progress`` shows a bar for slow set-up work (tiny-gpt2's SFT warm-start)."""
    return get_env(cfg.env).cls(cfg, reference_weights=reference_weights, log=log, progress=progress)


# Config fields that decide what an environment builds; runs that agree on them share one.
ENV_FIELDS = ("env", "model", "data", "eval_data", "prompt_column", "chosen_column", "rejected_column", "seed", "max_length", "sft_steps", "dtype", "batch_size",
              "lora_r", "lora_alpha", "lora_target_modules", "lora_dropout")

__all__ = ["ENV_FIELDS", "PreferenceEnv", "build_env"]
