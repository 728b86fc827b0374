"""A TRL DPO recipe given to ``gradlens record --config``: what each of its keys does here.

A settings file is a *TRL recipe* when it uses a name from TRL's ``DPOConfig``,
``ModelConfig``, ``ScriptArguments`` or ``DatasetMixtureConfig`` that gradlens's
own settings do not have (``learning_rate``, ``model_name_or_path``, ...). A recipe
is trained by TRL's own ``DPOTrainer`` (``trl_run.py``), so it is TRL's run: the
optimiser and its defaults, the schedule and warm-up, clipping, every ``loss_type``,
precision and LoRA options all come from TRL itself.

``key_rules()`` is the source of truth. It is built from TRL's dataclasses, so a
key TRL adds is covered the day TRL adds it: every key is passed to TRL as
written (the default), read by gradlens, or refused with the reason. The table in
``docs/integrations.md`` is generated from it (``python -m gradlens.record.trl_recipe
docs/integrations.md``) and a test checks that the two agree.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

# Where a TRL key lives. Order matters only for the docs table.
SOURCES = ("ScriptArguments", "ModelConfig", "DPOConfig", "DatasetMixtureConfig")
OLDER = "older TRL"  # names earlier TRL/transformers releases used
GRADLENS = "gradlens"  # gradlens's own settings, also accepted in a recipe


@dataclass(frozen=True)
class KeyRule:
    """What gradlens does with one recipe key.

    ``to``: which object gets the value ("DPOConfig", "ModelConfig", "ScriptArguments",
    "gradlens", or "" for none). ``allowed``: values outside it are refused with ``reason``.
    ``rename``: the key is another name for this one.
    """

    does: str
    to: str = ""
    allowed: Callable[[Any], bool] | None = None
    reason: str = ""
    rename: str | None = None

    def refuses(self, value: Any) -> bool:
        return self.allowed is not None and not self.allowed(value)


def _is(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(v == x and type(v) is type(x) for x in values)


_OFF = _is(None, False, "", [], {})  # a switch or setting left off
_NONE = _is(None)


def refused(reason: str, allowed: Callable[[Any], bool] = _OFF, *, to: str = "") -> KeyRule:
    return KeyRule(does="refused unless left off", to=to, allowed=allowed, reason=reason)


DATA = "a local `.jsonl`, `.csv` or `.parquet` file or a `save_to_disk` directory, read and checked like `--data`; a Hub name is refused with how to save it"
PASSED = "passed to TRL as written"

# Keys whose handling is not "passed to TRL as written". Keys of TRL's dataclasses not named here are passed.
SPECIAL: dict[str, KeyRule] = {
    # ScriptArguments and DatasetMixtureConfig: where the data comes from.
    "dataset_name": KeyRule(f"the training data: {DATA}", GRADLENS),
    "dataset_config": refused("selects a configuration of a Hub dataset; gradlens never downloads: save that configuration with `save_to_disk` and give its directory", _NONE),
    "dataset_train_split": KeyRule("the split of a saved `DatasetDict` to train on", GRADLENS),
    "dataset_test_split": KeyRule("the split of a saved `DatasetDict` to evaluate on when `eval_strategy` is not `no` (or give `eval_data`)", GRADLENS),
    "dataset_streaming": refused("streams a Hub dataset; gradlens reads local data only", _is(False)),
    "ignore_bias_buffers": KeyRule("applied as TRL's script applies it (DDP ignores boolean buffers)", GRADLENS),
    "datasets": refused("mixes Hub datasets; gradlens never downloads: save the mixture with `save_to_disk` and give it as `dataset_name`"),
    "streaming": refused("streams Hub datasets; gradlens reads local data only", _is(False)),
    "test_split_size": refused("splits a `datasets` mixture (refused above)", _NONE),
    # ModelConfig
    "model_name_or_path": KeyRule("the policy: a local directory written by `save_pretrained` (nothing is downloaded)", GRADLENS),
    "model_revision": refused("a local directory has no revisions", _is("main", None), to="ModelConfig"),
    "dtype": KeyRule("passed to `from_pretrained` through `model_init_kwargs`, as TRL's script does", "ModelConfig"),
    "attn_implementation": KeyRule("passed to `from_pretrained` through `model_init_kwargs`, as TRL's script does", "ModelConfig"),
    "lora_target_parameters": refused("LoRA on bare parameters (mixture-of-experts weights): the recorder splits layer outputs, and mixture-of-experts models are not supported", _NONE, to="ModelConfig"),
    "use_dora": refused("DoRA is not supported by the recorder (its magnitude vector is applied outside the hooked layers)", _is(False), to="ModelConfig"),
    "load_in_8bit": refused("needs bitsandbytes and a GPU; not supported", _is(False), to="ModelConfig"),
    "load_in_4bit": refused("needs bitsandbytes and a GPU; not supported", _is(False), to="ModelConfig"),
    # DPOConfig: where things are written, what would leave the machine.
    "output_dir": KeyRule("passed to TRL (its checkpoints and the final model); the gradlens run directory is `--out`, by default `OUTPUT_DIR/gradlens`", "DPOConfig"),
    "push_to_hub": refused("gradlens record works offline and never uploads; push `output_dir` yourself", _is(False)),
    "hub_token": refused("a token in a settings file would be stored in the run's `config.json`; log in with `hf auth login` instead", _NONE),
    "resume_from_checkpoint": refused("resuming a TRL recipe is not supported by `gradlens record`; resume a `GradlensDPOTrainer` script with `GradlensCallback(resume=True)`", _NONE),
    # DPOConfig: what the recorder cannot follow.
    "deepspeed": refused("DeepSpeed is not supported by the recorder", _NONE),
    "fsdp": refused("the Trainer's FSDP needs accelerate on GPUs; use `accelerate launch` with a `GradlensDPOTrainer` script, or `torchrun -m gradlens record --fsdp` with gradlens's own settings"),
    "fsdp_config": refused("only with `fsdp` (refused above)", _is(None, {})),
    "parallelism_config": refused("tensor and context parallelism split rows across processes; the recorder needs whole rows", _NONE),
    "auto_find_batch_size": refused("restarts training with a smaller batch after running out of memory; the run directory would hold two runs", _is(False)),
    "use_liger_kernel": refused("Liger's fused kernels compute the loss where no layer hook sees it (and need a GPU)", _is(False)),
    "padding_free": refused("packs every row into one sequence; the chosen/rejected split needs the rows along dim 0", _is(False)),
    "disable_tqdm": KeyRule("passed to TRL (`--quiet` sets it)", "DPOConfig"),
    "bf16": KeyRule("passed to TRL (TRL's default is on, also on CPU); a note at the start says what it does to the numbers", "DPOConfig"),
    "fp16": KeyRule("passed to TRL; a note at the start says what it does to the numbers", "DPOConfig"),
    "gradient_checkpointing": KeyRule("passed to TRL as `activation_checkpointing` (transformers 5's name; TRL's default is on); recorded exactly", "DPOConfig"),
    "gradient_checkpointing_kwargs": KeyRule("passed to TRL as `activation_checkpointing_kwargs`", "DPOConfig"),
    "torch_compile": KeyRule("passed to TRL; recorded steps run the uncompiled module (see *torch.compile* below)", "DPOConfig"),
    "report_to": KeyRule("passed to TRL; gradlens writes its own TensorBoard files in the run directory as well", "DPOConfig"),
    "use_peft": KeyRule("passed to TRL's `get_peft_config`, which builds the LoRA adapter as TRL's script does", "ModelConfig"),
    "bnb_4bit_quant_type": KeyRule("no effect without `load_in_4bit` (refused)", "ModelConfig"),
    "bnb_4bit_quant_storage": KeyRule("no effect without `load_in_4bit` (refused)", "ModelConfig"),
    "use_bnb_nested_quant": KeyRule("no effect without `load_in_4bit` (refused)", "ModelConfig"),
    "liger_kernel_config": KeyRule("no effect without `use_liger_kernel` (refused)", "DPOConfig"),
    # Names earlier releases used.
    "torch_dtype": KeyRule("the older name of `dtype` (honoured as `dtype`)", "ModelConfig", rename="dtype"),
    "rpo_alpha": refused("removed from TRL; RPO is `loss_type: [sigmoid, sft]` with `loss_weights: [1.0, ALPHA]`", _NONE),
    "max_prompt_length": refused("removed from TRL; `max_length` bounds prompt + completion (cut as `truncation_mode` says)", _NONE),
    "max_completion_length": refused("removed from TRL; `max_length` bounds prompt + completion (cut as `truncation_mode` says)", _NONE),
    "logging_dir": refused("removed from transformers 5; the Trainer's TensorBoard writer follows `TENSORBOARD_LOGGING_DIR`, gradlens's own event files are in the run directory", _NONE),
}
OLDER_NAMES = ("torch_dtype", "rpo_alpha", "max_prompt_length", "max_completion_length", "logging_dir")

# gradlens's own settings in a recipe: which TRL key they set (None: read by gradlens itself).
GRADLENS_NAMES: dict[str, str | None] = {
    "model": "model_name_or_path", "data": "dataset_name", "out": None, "lr": "learning_rate",
    "steps": "max_steps", "grad_accum": "gradient_accumulation_steps", "beta": "beta", "seed": "seed",
    "max_length": "max_length", "dtype": "dtype", "lora_r": "lora_r", "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout", "lora_target_modules": "lora_target_modules",
    "loss": None, "unfused_head": None, "balance_space": None, "adadpo_cap": None, "layers_every": None, "eval_data": None,
    "prompt_column": None, "chosen_column": None, "rejected_column": None,
    "env": None, "optimizer": None, "device": None, "eval_every": None, "checkpoint_every": None,
}  # fmt: skip
# gradlens settings that have no meaning for a TRL recipe, and why.
GRADLENS_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (_NONE, "a TRL recipe sets `per_device_train_batch_size` (pairs per micro-batch) instead"),
    "sft_steps": (_is(None, 0), "the SFT warm start belongs to the tiny-gpt2 environment"),
    "shuffle": (_is(True), "TRL's Trainer always shuffles (seeded by `seed` or `data_seed`)"),
    "per_row": (_is(False), "per-row norms are written by `gradlens record`'s own loop only"),
    "skip_nonfinite": (_is(False), "TRL's Trainer has no such option; non-finite steps are recorded and flagged in `steps.csv`"),
    "fsdp": (_is(False), "a TRL recipe is trained by TRL's Trainer; shard it with `accelerate launch` and a `GradlensDPOTrainer` script"),
    "loss_options": (_is({}), "a TRL recipe takes `balance_space` and `adadpo_cap` only"),
}


def _trl_classes() -> dict[str, type]:
    try:
        import trl
    except ImportError as exc:
        raise ValueError("this config file is a TRL recipe, which gradlens trains with TRL: pip install 'gradlens[trl]'") from exc
    return {name: getattr(trl, name) for name in SOURCES}


def trl_fields() -> dict[str, tuple[str, Any]]:
    """Every key of TRL's recipe dataclasses: name -> (class name, declared type); the first class listing a name wins."""
    out: dict[str, tuple[str, Any]] = {}
    for name, cls in _trl_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                out.setdefault(f.name, (name, hints.get(f.name)))
    return out


def key_rules() -> dict[str, tuple[str, KeyRule]]:
    """Every key a recipe may hold: name -> (where it comes from, what gradlens does with it)."""
    rules: dict[str, tuple[str, KeyRule]] = {}
    for name, (source, _) in trl_fields().items():
        lora = name.startswith("lora_") or name == "use_rslora"
        rule = SPECIAL.get(name) or KeyRule("passed to TRL's `get_peft_config` (with `use_peft`)" if lora else PASSED, source)
        rules[name] = (source, rule if rule.to else dataclasses.replace(rule, to=source))
    for name in OLDER_NAMES:
        rules[name] = (OLDER, SPECIAL[name])
    return rules


def looks_like_recipe(keys: Any, gradlens_fields: set[str]) -> bool:
    """True when a settings file uses a TRL name that is not also a gradlens setting (imports TRL only then)."""
    foreign = {str(k).replace("-", "_") for k in keys} - gradlens_fields
    if not foreign:
        return False
    try:
        names = set(trl_fields()) | set(OLDER_NAMES)
    except ValueError:  # no TRL: a recipe's telltale names ask for it, other keys are unknown gradlens settings
        if foreign & TELLTALE:
            raise
        return False
    return bool(foreign & names)


# Names only a TRL recipe uses: without TRL installed, a file with one of them asks for TRL.
TELLTALE = frozenset({"model_name_or_path", "dataset_name", "learning_rate", "output_dir", "per_device_train_batch_size", "max_steps", "loss_type"})


@dataclass
class Recipe:
    """A TRL recipe split by destination, every value checked; flags already applied."""

    path: Path
    dpo: dict[str, Any] = field(default_factory=dict)  # DPOConfig keyword arguments
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig keyword arguments
    script: dict[str, Any] = field(default_factory=dict)  # ScriptArguments + gradlens's own settings
    written: dict[str, Any] = field(default_factory=dict)  # the keys as written (for config.json)


def parse_recipe(path: Path, data: Mapping[str, Any], flags: Mapping[str, Any]) -> Recipe:
    """Check every key of ``data`` (a recipe file) and ``flags`` (gradlens flags, which win) and sort them."""
    rules, fields_ = key_rules(), trl_fields()
    recipe = Recipe(path, written={str(k): v for k, v in data.items()})
    lines = key_lines(path)
    for source, items, is_flag in ((str(path), data.items(), False), ("the command line", flags.items(), True)):
        seen: dict[str, str] = {}
        for written, value in items:
            key = str(written).replace("-", "_")
            where = f"{source}: line {lines[str(written)]}" if not is_flag and str(written) in lines else source
            for to, target, val in _destinations(key, value, where, rules, is_flag):
                if target in seen and seen[target] != key:
                    raise ValueError(f"{where}: {seen[target]!r} and {key!r} both set {target!r}; keep one")
                seen[target] = key
                if target in fields_:
                    val = _coerce(target, val, fields_[target][1], where)
                {"DPOConfig": recipe.dpo, "ModelConfig": recipe.model}.get(to, recipe.script)[target] = val
    if "dataset_name" not in recipe.script:
        raise ValueError(f"{path}: the recipe names no data: add dataset_name (a local file or save_to_disk directory) or pass --data")
    if "model_name_or_path" not in recipe.script:
        raise ValueError(f"{path}: the recipe names no model: add model_name_or_path (a local directory) or pass --model")
    return recipe


def key_lines(path: Path) -> dict[str, int]:
    """Top-level key -> its line in a YAML, TOML or JSON settings file (for messages; first occurrence)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    found: dict[str, int] = {}
    pattern = re.compile(r'^\s{0,2}["\']?([A-Za-z_][A-Za-z0-9_-]*)["\']?\s*[:=]')
    for number, line in enumerate(text.splitlines(), start=1):
        match = pattern.match(line)
        if match:
            found.setdefault(match.group(1), number)
    return found


def _destinations(key: str, value: Any, where: str, rules: dict, is_flag: bool) -> list[tuple[str, str, Any]]:
    """Where one setting goes: [(bucket, TRL or gradlens key, value)]; raises for a refused or unknown one.

    In the file, a name TRL has means TRL's key (``lora_r`` is a rank, LoRA stays off without
    ``use_peft``); a flag means gradlens's setting (``--lora-r 8`` turns LoRA on).
    """
    if key in rules and not (is_flag and key in GRADLENS_NAMES):
        source, rule = rules[key]
        if rule.refuses(value):
            raise ValueError(f"{where}: {key}: {value!r} is not supported: {rule.reason}")
        return [(rule.to, rule.rename or key, value)]
    if key in GRADLENS_REFUSED:
        allowed, reason = GRADLENS_REFUSED[key]
        if not allowed(value):
            raise ValueError(f"{where}: {key!r} is not available for a TRL recipe: {reason}")
        return []
    if key not in GRADLENS_NAMES:
        raise ValueError(
            f"{where}: unknown setting {key!r}: it is neither a key of TRL's DPOConfig, ModelConfig or ScriptArguments "
            "nor a gradlens setting (every key is listed in docs/integrations.md, 'Every key of a TRL recipe')"
        )
    target = GRADLENS_NAMES[key]
    if target is not None and target in rules:
        if key == "lora_target_modules" and isinstance(value, str):
            modules = [m.strip() for m in value.split(",") if m.strip()]
            value = modules[0] if modules == ["all-linear"] else modules
        out = _destinations(target, value, where, rules, is_flag=False)
        return out + ([("ModelConfig", "use_peft", True)] if key == "lora_r" and value else [])
    if key == "env":
        from .config import OWN_MODEL_ENV

        if value != OWN_MODEL_ENV:
            raise ValueError(f"{where}: a TRL recipe trains your own model and data; 'env' must be {OWN_MODEL_ENV!r}, got {value!r}")
        return []
    if key == "optimizer":
        optim = {"adamw": "adamw_torch", "sgd": "sgd"}.get(value)
        if optim is None:
            raise ValueError(f"{where}: optimizer {value!r} has no TRL counterpart here; set TRL's optim (adamw_torch, sgd, ...)")
        return [("DPOConfig", "optim", optim)]
    if key == "device":
        if value not in ("auto", "cpu"):
            raise ValueError(f"{where}: a TRL recipe runs where TRL's Trainer puts it; device {value!r} cannot be chosen (use CUDA_VISIBLE_DEVICES, or device: cpu)")
        return [("DPOConfig", "use_cpu", True)] if value == "cpu" else []
    if key == "eval_every":
        return [("DPOConfig", "eval_strategy", "steps"), ("DPOConfig", "eval_steps", value)] if value else [("DPOConfig", "eval_strategy", "no")]
    if key == "checkpoint_every":
        return [("DPOConfig", "save_strategy", "steps"), ("DPOConfig", "save_steps", value)] if value else [("DPOConfig", "save_strategy", "no")]
    return [(GRADLENS, key, value)]


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check a value against TRL's declared type; numbers written as strings (YAML reads 5e-7 as one) become numbers."""
    kinds = {typing.get_origin(a) or a for a in (typing.get_args(hint) or (hint,))} if hint is not None else set()
    numeric = bool(kinds & {int, float})
    if value is None or not kinds or Any in kinds:
        return value
    if isinstance(value, str) and numeric and str not in kinds:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{where}: {key!r} must be a number, got {value!r}") from None
        return int(number) if float not in kinds and number.is_integer() else number
    if isinstance(value, bool):
        if bool not in kinds and numeric:
            raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
        if bool not in kinds and str in kinds and value is False:
            return "no"  # YAML reads an unquoted `no` (eval_strategy: no) as false
        return value
    if kinds <= {bool, type(None)}:
        raise ValueError(f"{where}: {key!r} must be true or false, got {value!r}")
    if isinstance(value, int) and float in kinds and int not in kinds:
        return float(value)
    if isinstance(value, float) and int in kinds and float not in kinds:
        if not value.is_integer():
            raise ValueError(f"{where}: {key!r} must be an integer, got {value!r}")
        return int(value)
    return value


# ---- the docs table ----------------------------------------------------------------------------

TABLE_START = "<!-- trl-keys:start (generated by python -m gradlens.record.trl_recipe docs/integrations.md) -->"
TABLE_END = "<!-- trl-keys:end -->"


def key_table() -> str:
    """The markdown table of every recipe key and what gradlens does with it."""
    lines = ["| key | from | what gradlens does |", "|---|---|---|"]
    rules = key_rules()
    order = {s: i for i, s in enumerate((*SOURCES, OLDER))}
    for name, (source, rule) in sorted(rules.items(), key=lambda kv: (order[kv[1][0]], kv[0])):
        does = f"refused unless left off: {rule.reason}" if rule.allowed is not None else rule.does
        if rule.allowed is not None and rule.rename is None and name in ("model_revision",):
            does = f"refused unless `main`: {rule.reason}"
        lines.append(f"| `{name}` | {source} | {does} |")
    return "\n".join(lines)


def docs_with_table(text: str) -> str:
    """``text`` (a markdown page) with the generated table between its markers."""
    pattern = re.compile(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"the page has no {TABLE_START!r} ... {TABLE_END!r} markers")
    return pattern.sub(lambda _: f"{TABLE_START}\n{key_table()}\n{TABLE_END}", text)


if __name__ == "__main__":  # python -m gradlens.record.trl_recipe docs/integrations.md
    page = Path(sys.argv[1])
    page.write_text(docs_with_table(page.read_text(encoding="utf-8")), encoding="utf-8")
