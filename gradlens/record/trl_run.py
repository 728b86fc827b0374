"""`gradlens record --config RECIPE` for a TRL recipe: TRL's own DPOTrainer trains it, gradlens records it.

The story, top to bottom: sort and check the recipe's keys (``trl_recipe.py``),
check the run directory, the model directory and the data before anything is
loaded, then build what TRL's ``trl/scripts/dpo.py`` builds -- ``DPOConfig``,
``model_init_kwargs`` from ``ModelConfig``, TRL's own ``get_peft_config`` -- and
train with ``GradlensDPOTrainer``, which is ``trl.DPOTrainer`` plus the recorder.
So the optimiser and its defaults, the schedule, warm-up, clipping, every
``loss_type`` and the precision flags are TRL's, not re-implemented here.

The run directory is the one ``gradlens record`` writes (through the integration's
``RunLog``): ``--out``, by default ``OUTPUT_DIR/gradlens``. TRL's ``output_dir`` keeps
its meaning: TRL's checkpoints and the final model.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..runs import run_contents
from .data import hub_hint
from .trl_recipe import Recipe

RUN_SUBDIR = "gradlens"  # the run directory inside TRL's output_dir when --out is not given


@dataclass(frozen=True)
class Output:
    """How this invocation reports and writes."""

    quiet: bool = False
    tensorboard: bool = True
    overwrite: bool = False

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr)


@dataclass(frozen=True)
class Prepared:
    """Everything checked before the model is loaded."""

    args: Any  # trl.DPOConfig
    run_dir: Path
    model_dir: str
    train: Any  # datasets.Dataset of standard or conversational pairs
    evaluation: Any  # the same, or None


def run_recipe(recipe: Recipe, output: Output) -> int:
    """Train ``recipe`` with TRL's DPOTrainer, recording every step into the run directory."""
    t0 = time.perf_counter()
    hub_hint(Path(recipe.script["dataset_name"]), where=f"{recipe.path}: dataset_name")
    args = _dpo_config(recipe, output)
    run_dir = _run_dir(recipe, args, output)
    model_dir = _model_dir(recipe)
    train, evaluation = _datasets(recipe)
    trainer = _trainer(recipe, Prepared(args, run_dir, model_dir, train, evaluation), output)
    for note in _precision_notes(recipe, args):
        output.say(note)
    trainer.train()
    trainer.save_model(args.output_dir)  # as trl/scripts/dpo.py
    _report(run_dir, trainer, time.perf_counter() - t0)
    return 0


def _run_dir(recipe: Recipe, args, output: Output) -> Path:
    """The run directory, refused before anything is loaded when it already holds a run."""
    path = Path(recipe.script.get("out") or Path(args.output_dir) / RUN_SUBDIR)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory")
    if path.is_dir() and run_contents(path).started and not output.overwrite:
        raise ValueError(
            f"{path}: run directory already exists and is not empty; pass --overwrite to replace it (it was left unchanged)"
        )
    return path


def _model_dir(recipe: Recipe) -> str:
    from .envs.user import check_model_dir

    return str(check_model_dir(recipe.script["model_name_or_path"]))


def _datasets(recipe: Recipe):
    """(train, eval or None) as ``datasets.Dataset`` of standard or conversational pairs, checked like ``--data``."""
    import datasets

    from .data import Columns, is_saved_dataset, load_preferences

    script = recipe.script
    columns = Columns(*(script.get(f"{name}_column", name) for name in ("prompt", "chosen", "rejected")))
    source = Path(script["dataset_name"])

    def pairs(path: Path):
        data = load_preferences(path, columns)
        return datasets.Dataset.from_list([{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in data.records])

    def split(name: str) -> Path:
        """A DatasetDict's split is a saved Dataset of its own in a subdirectory (dataset_dict.json lists them)."""
        is_dict = (source / "dataset_dict.json").is_file()
        if not is_dict:
            if name != "train" and source.is_dir():
                raise ValueError(f"{source}: a saved Dataset has no splits, but the recipe asks for split {name!r}")
            return source
        if not is_saved_dataset(source / name):
            found = sorted(p.name for p in source.iterdir() if is_saved_dataset(p))
            raise ValueError(f"{source}: the saved DatasetDict has no split {name!r} (it has {found})")
        return source / name

    train = pairs(split(script.get("dataset_train_split", "train")))
    evaluates = recipe.dpo.get("eval_strategy", "no") not in ("no", None)
    if not evaluates:
        return train, None
    if script.get("eval_data"):
        return train, pairs(Path(script["eval_data"]))
    test = script.get("dataset_test_split", "test")
    if not source.is_dir():
        raise ValueError(f"{recipe.path}: eval_strategy {recipe.dpo['eval_strategy']!r} needs evaluation pairs: give eval_data (a file) or a saved DatasetDict with a {test!r} split")
    return train, pairs(split(test))


def _dpo_config(recipe: Recipe, output: Output):
    """TRL's DPOConfig of the recipe, with ``model_init_kwargs`` from ModelConfig as trl/scripts/dpo.py sets them."""
    import trl

    model_args = trl.ModelConfig(**recipe.model)
    dpo = dict(recipe.dpo)
    init = dict(revision=model_args.model_revision, trust_remote_code=dpo.get("trust_remote_code", False),
                attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)  # fmt: skip
    init.update(dpo.pop("model_init_kwargs", None) or {})
    if output.quiet:
        dpo["disable_tqdm"] = True
    _new_checkpointing_names(dpo)
    try:
        return trl.DPOConfig(model_init_kwargs=init, **dpo)
    except (TypeError, ValueError) as exc:
        hint = " (without a GPU: use_cpu: true, or bf16: false)" if "bf16" in str(exc) else ""
        raise ValueError(f"{recipe.path}: TRL's DPOConfig refused the recipe: {exc}{hint}") from None


def _new_checkpointing_names(dpo: dict) -> None:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing and warns on the old name
    (TRL's default sets the old one). Give the new names, with the recipe's value or TRL's default."""
    import dataclasses

    import trl

    fields = {f.name: f for f in dataclasses.fields(trl.DPOConfig)}
    for old, new in (("gradient_checkpointing", "activation_checkpointing"), ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if new in fields and dpo.get(new) is None:
            value = dpo.pop(old, fields[old].default)
            dpo[new] = value
            dpo[old] = None


def _trainer(recipe: Recipe, ready: Prepared, output: Output):
    """GradlensDPOTrainer as trl/scripts/dpo.py builds DPOTrainer, with the run log as a callback."""
    import trl

    from ..integrations.transformers import GradlensCallback
    from ..integrations.trl import GradlensDPOTrainer

    script = recipe.script
    model_args = trl.ModelConfig(**recipe.model)
    loss = script.get("loss", "dpo")
    losses = [loss] if isinstance(loss, str) else list(loss)
    if len(losses) != 1:
        raise ValueError(f"{recipe.path}: a TRL recipe trains one loss; got {losses} (run it once per loss)")
    callback = GradlensCallback(
        ready.run_dir, layers_every=int(script.get("layers_every", 1)), tensorboard=output.tensorboard, overwrite=output.overwrite,
        config={"recipe": str(recipe.path), "recipe_keys": _jsonable(recipe.written)},
    )  # fmt: skip
    options = {k: script[k] for k in ("balance_space", "adadpo_cap", "unfused_head") if k in script}
    try:
        trainer = GradlensDPOTrainer(
            model=ready.model_dir, args=ready.args, train_dataset=ready.train, eval_dataset=ready.evaluation, callbacks=[callback],
            peft_config=trl.get_peft_config(model_args), loss=losses[0], **options,
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{recipe.path}: TRL's DPOTrainer refused the recipe: {exc}") from None
    if script.get("ignore_bias_buffers"):
        import torch  # as trl/scripts/dpo.py: DDP ignores the boolean buffers

        trainer.model._ddp_params_and_buffers_to_ignore = [n for n, b in trainer.model.named_buffers() if b.dtype == torch.bool]
    if output.quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # with the progress bar off, it prints every log line
    return trainer


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)) for k, v in values.items()}


def _precision_notes(recipe: Recipe, args) -> list[str]:
    """What the resolved precision does to the numbers; TRL's DPOConfig turns bf16 on by default."""
    from .progress import precision_note

    dtype = recipe.model.get("dtype") or "float32"
    autocast = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    note = precision_note(str(dtype), autocast)
    if note and autocast == "bf16" and "bf16" not in recipe.dpo:
        note += " (bf16 is TRL's DPOConfig default; bf16: false trains in float32)"
    return [note] if note else []


def _report(run_dir: Path, trainer, seconds: float) -> None:
    steps = trainer.state.global_step
    print(f"gradlens record: {run_dir}: {steps} steps of TRL's DPOTrainer in {seconds:.1f} s")
    print("The run directory holds config.json, steps.csv, layers.csv, summary.json and the TensorBoard event files;")
    print(f"TRL's output (the final model) is in {trainer.args.output_dir}.")
    print(f"Next:\n  gradlens plot {run_dir}\n  tensorboard --logdir {run_dir}")


