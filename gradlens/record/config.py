"""The `gradlens record` configuration: one dataclass, file loading and merging.

Precedence, lowest to highest: dataclass defaults, the environment's defaults
(fields left ``None``), a ``--config`` file (TOML, JSON or YAML), command-line flags.
A file that uses TRL's names is a TRL recipe and is trained by TRL itself
(``trl_recipe.py``, ``trl_run.py``).
The resolved config -- every field concrete -- is what a run directory stores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from ..losses import BALANCE_SPACE, REWEIGHTINGS, LossSpec, get_reweighting, resolve_loss
from .envs.registry import envs_with, get_env

OPTIMIZERS = ("sgd", "adam", "adamw")
DTYPES = ("float32", "bfloat16", "float16")
BALANCE_SPACES = BALANCE_SPACE.choices  # the registry's option, offered as --balance-space
# Method options that are also RecordConfig fields (flags of their own, kept for old configs).
OPTION_FIELDS = ("balance_space", "adadpo_cap")


def loss_names() -> tuple[str, ...]:
    """What --loss accepts: every registered reweighting, including ones registered by the user."""
    return tuple(REWEIGHTINGS)

# `gradlens record` with no arguments: both methods, one after the other.
DEFAULT_LOSSES = ("dpo", "balanced")


@dataclass(frozen=True)
class RecordConfig:
    """Everything that decides what one recorded run does."""

    env: str = "tiny-gpt2"
    loss: str = "dpo"
    model: str | None = None          # user env: local HF model directory
    data: str | None = None           # user env: JSONL / CSV / Parquet preference file
    eval_data: str | None = None      # user env: held-out preference file (else a training subset)
    prompt_column: str = "prompt"     # user env: the data's column names (TRL's by default)
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    beta: float = 0.1
    lr: float | None = None
    optimizer: str | None = None
    batch_size: int | None = None     # preference pairs per optimizer step
    grad_accum: int = 1               # micro-batches per optimizer step
    steps: int | None = None
    eval_every: int | None = None     # 0 = only at the start and the end
    checkpoint_every: int | None = None
    layers_every: int = 1             # per-layer rows + histograms every N steps
    seed: int = 0
    max_length: int | None = None     # prompt + completion tokens (TRL keep_start truncation)
    shuffle: bool = True
    per_row: bool = False
    skip_nonfinite: bool = False
    balance_space: str = "sequence"
    adadpo_cap: float = 2.0
    loss_options: dict = field(default_factory=dict)  # the method's other options (--loss-option KEY=VALUE)
    sft_steps: int | None = None      # tiny-gpt2 warm-start steps
    device: str = "auto"
    dtype: str = "float32"
    # LoRA (--env user, needs peft): rank 0 trains every weight; alpha defaults to 2 x rank.
    lora_r: int = 0
    lora_alpha: float | None = None
    lora_target_modules: str = "all-linear"   # comma-separated module names, or peft's "all-linear"
    lora_dropout: float = 0.0          # stored in the adapter; `gradlens record` turns every dropout off
    fsdp: bool = False                 # under torchrun: shard the policy with FSDP2 (fully_shard) instead of DDP
    out: str | None = None

    @cached_property
    def loss_spec(self) -> LossSpec:
        """``loss`` with every option resolved (registry defaults, the option fields, then ``loss_options``),
        once per config: validation resolves it and the training loop passes it down to ``preference_loss``."""
        declared = {o.name for o in get_reweighting(self.loss).options}
        given = {name: getattr(self, name) for name in OPTION_FIELDS if name in declared}
        return resolve_loss(self.loss, {**given, **self.loss_options})


# The fields left None above take the environment's defaults (``envs.registry.EnvDefaults``).
DEFAULT_ENV = RecordConfig.env
# `--model`/`--data` without `--env` mean the environment that trains the user's model.
OWN_MODEL_ENV = "user"

_FIELD_TYPES = {f.name: f.type for f in fields(RecordConfig)}
COLUMN_FIELDS = ("prompt_column", "chosen_column", "rejected_column")
_DEFAULTS = {f.name: f.default for f in fields(RecordConfig)}

def _check_type(name: str, value: Any, where: str) -> Any:
    """Coerce/validate one value against the field's declared type."""
    kind = _FIELD_TYPES[name]
    if value is None:
        if "None" in kind:
            return None
        raise ValueError(f"{where}: '{name}' may not be null")
    if kind.startswith("dict"):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where}: '{name}' must be a table of KEY = VALUE settings, got {value!r}")
        return dict(value)
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: '{name}' must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: '{name}' must be an integer, got {value!r}")
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: '{name}' must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{name}' must be a string, got {value!r}")
    return value


def _normalise_key(key: str) -> str:
    return key.replace("-", "_")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, JSON or YAML config; keys are RecordConfig fields (``-`` or ``_``).

    A file with TRL's names is a TRL recipe, trained by TRL itself (``trl_recipe.py``), not read here.

    ``loss`` may be one name, a comma-separated string or a list: one run per loss.
    """
    from ..settings_file import read_settings_file

    path = Path(path)
    data = read_settings_file(path)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _normalise_key(str(key))
        if name == "loss":
            out["loss"] = parse_losses(value, where=str(path))
            continue
        if name not in _FIELD_TYPES:
            known = ", ".join(sorted(_FIELD_TYPES))
            raise ValueError(f"{path}: unknown setting {name!r}; known settings: {known} (a TRL recipe uses TRL's own names: learning_rate, model_name_or_path, ...)")
        out[name] = _check_type(name, value, str(path))
    return out


def parse_losses(value: Any, *, where: str) -> tuple[str, ...]:
    """'dpo', 'dpo,balanced' or ['dpo', 'balanced'] -> ('dpo', 'balanced')."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ValueError(f"{where}: 'loss' must be a name or a list of names from {list(loss_names())}, got {value!r}")
    if not items:
        raise ValueError(f"{where}: 'loss' is empty; choose from {list(loss_names())}")
    for item in items:
        if item not in loss_names():
            raise ValueError(f"{where}: unknown loss {item!r}; choose from {list(loss_names())}")
    if len(set(items)) != len(items):
        raise ValueError(f"{where}: 'loss' lists a method twice: {items}")
    return tuple(items)


def parse_loss_options(items: list[str], *, where: str = "--loss-option") -> dict[str, str]:
    """['tau=0.5', 'balance_scope=per_layer'] -> {'tau': '0.5', ...}; values are checked per method later."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = _normalise_key(key.strip())
        if not sep or not key or not value.strip():
            raise ValueError(f"{where} {item!r}: expected KEY=VALUE, e.g. --loss-option tau=0.5")
        out[key] = value.strip()
    return out


def _options_for(loss: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``options`` that ``loss`` declares (one --loss-option list serves several losses)."""
    declared = {o.name: o for o in get_reweighting(loss).options}
    return {k: declared[k].parse(v, loss) for k, v in options.items() if k in declared}


def _check_options_used(losses: tuple[str, ...], options: Mapping[str, Any]) -> None:
    offered = {name: [o.name for o in get_reweighting(name).options] for name in losses}
    for key in options:
        if key in OPTION_FIELDS:
            raise ValueError(f"--loss-option {key}: use --{key.replace('_', '-')} for this one")
        if not any(key in names for names in offered.values()):
            listing = "; ".join(f"{n}: {', '.join(o) or 'none'}" for n, o in offered.items())
            raise ValueError(f"--loss-option {key}: no requested loss has this option (options per loss: {listing})")


def with_env_defaults(cfg: RecordConfig) -> RecordConfig:
    """Fill fields left None with the environment's defaults (and LoRA's alpha with 2 x rank)."""
    defaults = get_env(cfg.env).defaults.as_dict()
    if cfg.lora_r and cfg.lora_alpha is None:
        defaults["lora_alpha"] = 2.0 * cfg.lora_r
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def validate(cfg: RecordConfig) -> RecordConfig:
    """Range and consistency checks; the messages name the flag."""
    spec = get_env(cfg.env)  # an unknown --env lists the registered ones
    if cfg.loss not in loss_names():
        raise ValueError(f"--loss must be one of {list(loss_names())}, got {cfg.loss!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {list(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    if cfg.balance_space not in BALANCE_SPACES:
        raise ValueError(f"--balance-space must be one of {list(BALANCE_SPACES)}, got {cfg.balance_space!r}")
    cfg.loss_spec  # every option known to the method and valid (the message names both); resolved once, kept
    for name in ("beta", "lr", "adadpo_cap"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    for name in ("batch_size", "grad_accum", "steps", "layers_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("eval_every", "checkpoint_every", "sft_steps"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {cfg.seed}")
    if cfg.grad_accum > cfg.batch_size:
        raise ValueError(f"--grad-accum {cfg.grad_accum} is larger than --batch-size {cfg.batch_size}: a micro-batch needs at least one pair")
    if cfg.max_length < 2:
        raise ValueError(f"--max-length must be at least 2, got {cfg.max_length}")
    _validate_lora(cfg)
    if cfg.fsdp and not spec.fsdp:
        raise ValueError(f"--fsdp is for --env {_either('fsdp')} (the {cfg.env} environment's model is too small to shard)")
    if spec.model_and_data:
        if not cfg.model or not cfg.data:
            raise ValueError(f"--env {cfg.env} needs --model DIR (a local Hugging Face model directory) and --data FILE (JSONL, CSV or Parquet)")
    else:
        for name in ("model", "data", "eval_data"):
            if getattr(cfg, name):
                raise ValueError(f"--{name.replace('_', '-')} is only used with --env {_either('model_and_data')} (the {cfg.env} environment builds its own)")
        for name in COLUMN_FIELDS:
            if getattr(cfg, name) != _DEFAULTS[name]:
                raise ValueError(
                    f"--{name.replace('_', '-')} is only used with --env {_either('model_and_data')} (the {cfg.env} environment builds its own data)"
                )
    columns = [getattr(cfg, name) for name in COLUMN_FIELDS]
    if any(not c.strip() for c in columns) or len(set(columns)) < len(columns):
        raise ValueError(f"--prompt-column, --chosen-column and --rejected-column must be three different non-empty names, got {columns}")
    return cfg


def _either(flag: str) -> str:
    """'user', or 'a or b' when several environments set ``flag`` in the registry."""
    return " or ".join(envs_with(flag))


def _validate_lora(cfg: RecordConfig) -> None:
    if cfg.lora_r < 0:
        raise ValueError(f"--lora-r must be 0 (no LoRA) or a positive rank, got {cfg.lora_r}")
    if not cfg.lora_r:
        changed = [n for n in ("lora_alpha", "lora_target_modules", "lora_dropout") if getattr(cfg, n) != getattr(RecordConfig, n)]
        if changed:
            raise ValueError(f"--{changed[0].replace('_', '-')} needs --lora-r RANK (LoRA is off at rank 0)")
        return
    if not get_env(cfg.env).lora:
        raise ValueError(f"--lora-r is only used with --env {_either('lora')} (the {cfg.env} environment trains its own small model in full)")
    if cfg.lora_alpha is not None and not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise ValueError(f"--lora-alpha must be a positive number, got {cfg.lora_alpha}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not [m for m in cfg.lora_target_modules.split(",") if m.strip()]:
        raise ValueError("--lora-target-modules is empty; give module names (q_proj,v_proj) or all-linear")


def resolve(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> list[RecordConfig]:
    """Merge file and flags into one validated config per requested loss."""
    merged = {**file_values, **flag_values}
    if "env" not in merged and ("model" in merged or "data" in merged):
        merged["env"] = OWN_MODEL_ENV
    losses = merged.pop("loss", DEFAULT_LOSSES)
    options = merged.pop("loss_options", {})
    _check_options_used(losses, options)
    configs = []
    for loss in losses:
        cfg = RecordConfig(**merged, loss=loss, loss_options=_options_for(loss, options))
        configs.append(validate(with_env_defaults(cfg)))
    return configs


def config_from_saved(saved: Mapping[str, Any], where: str) -> RecordConfig:
    """Rebuild the config stored in a run directory's config.json (types checked as for --config)."""
    known = {k: _check_type(k, v, where) for k, v in saved.items() if k in _FIELD_TYPES}
    try:
        return validate(RecordConfig(**known))
    except TypeError as exc:
        raise ValueError(f"{where}: saved config is not a gradlens record config: {exc}") from exc


def to_dict(cfg: RecordConfig) -> dict[str, Any]:
    return asdict(cfg)
