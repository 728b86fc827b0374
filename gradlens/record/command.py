"""`gradlens record`: train DPO / Balanced-DPO / AdaDPO and record chosen vs rejected gradients.

With no arguments it runs the built-in job: DPO, then Balanced-DPO, on the
tiny-gpt2 environment with its ground-truth reward. Everything that can be
wrong with the input (flags, config file, data, model directory, run
directories) is checked before the first file is written.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..runs import is_complete, is_run_dir, lock_run_dir, release_run_dir, restore_replaced, run_contents, schema
from . import plan as P
from . import resume as R
from .config import (
    BALANCE_SPACES, DEFAULT_ENV, DTYPES, OPTIMIZERS, OPTION_FIELDS, RecordConfig, load_config_file, loss_names, parse_loss_options,
    parse_losses, resolve,
)
from .envs.registry import env_names, envs_with, get_env, load_envs, per_env

from .grpo_command import ENV as GRPO_ENV

_CONFIG_FIELDS = set(RecordConfig.__dataclass_fields__)
# TRL's DPOConfig learning rate: made for large models and long runs.
TRL_DEFAULT_LR = 1e-6

EPILOG = """\
examples:
  gradlens record                                   # DPO then Balanced-DPO on tiny-gpt2 (timings: docs/performance.md)
  gradlens record --env tabular --loss dpo,balanced,adadpo --steps 500
  gradlens record --env user --model ./my-model --data prefs.jsonl --loss balanced --out runs/mine
  gradlens record --out runs/mine --resume         # continue from the last checkpoint
  gradlens record --config job.toml --lr 1e-5      # flags override the file
  torchrun --nproc_per_node 4 -m gradlens record --env user --model ./my-model --data prefs.jsonl --fsdp
  gradlens record --config trl_recipe.yaml --data ./saved_dataset --chosen-column good --rejected-column bad
  gradlens record --loss grpo --steps 200 --loss-option num_generations=8   # GRPO on the toy task (seconds)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    s = argparse.SUPPRESS  # unset flags stay unset, so a --config file can supply them
    own, lora_envs, fsdp_envs = (" or ".join(envs_with(flag)) for flag in ("model_and_data", "lora", "fsdp"))
    what = parser.add_argument_group("what to train")
    what.add_argument("--env", choices=(*env_names(), GRPO_ENV), default=s,
                      help=f"{_env_help()}; {GRPO_ENV}: the GRPO toy task, with --loss grpo (default {DEFAULT_ENV})")
    what.add_argument("--model", metavar="DIR", default=s, help=f"--env {own}: local Hugging Face model directory (never downloaded)")
    what.add_argument(
        "--data", metavar="PATH", default=s,
        help=f"--env {own}: preference pairs: .jsonl/.csv/.parquet or a Dataset.save_to_disk directory; TRL's standard, "
        "conversational or implicit-prompt format",
    )  # fmt: skip
    what.add_argument("--eval-data", metavar="FILE", default=s, help=f"--env {own}: held-out pairs for evaluations (default: the first 64 training pairs)")
    what.add_argument("--prompt-column", metavar="NAME", default=s, help=f"--env {own}: the data's prompt column (default prompt; absent: implicit prompt)")
    what.add_argument("--chosen-column", metavar="NAME", default=s, help=f"--env {own}: the data's chosen column (default chosen)")
    what.add_argument("--rejected-column", metavar="NAME", default=s, help=f"--env {own}: the data's rejected column (default rejected)")
    what.add_argument("--loss", metavar="LOSS[,LOSS]", default=s, help=f"one of {', '.join(loss_names())} (the reweighting registry); a comma list records one run per loss (default dpo,balanced); or grpo: GRPO on --env {GRPO_ENV}, its options from --loss-option num_generations=, epsilon=, kl=, iterations=")
    what.add_argument("--beta", type=float, default=s, help="DPO beta (default 0.1)")
    what.add_argument("--balance-space", choices=BALANCE_SPACES, default=s, help="Balanced-DPO weights from sequence log-probs or per-token means (default sequence)")
    what.add_argument("--adadpo-cap", type=float, default=s, help="AdaDPO cap C on p_w/p_l (default 2)")
    what.add_argument("--loss-option", dest="loss_options", metavar="KEY=VALUE", action="append", default=s, help=f"another option of the loss, repeatable: {_option_help()}")
    lora = parser.add_argument_group(f"LoRA (--env {lora_envs}; pip install 'gradlens[peft]')")
    lora.add_argument("--lora-r", type=int, default=s, help="train a LoRA adapter of this rank instead of every weight (default 0: no LoRA)")
    lora.add_argument("--lora-alpha", type=float, default=s, help="LoRA alpha (default 2 x rank)")
    lora.add_argument("--lora-target-modules", metavar="NAMES", default=s, help="comma-separated module names, or all-linear (default)")
    lora.add_argument("--lora-dropout", type=float, default=s, help="LoRA dropout saved in the adapter config (gradlens record trains with every dropout off)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument(
        "--lr", type=float, default=s,
        help=f"learning rate (default per env: {per_env('lr')}; 1e-6 = TRL's DPOConfig default, "
        "made for large models and long runs: it barely moves a small model in a few dozen steps; try 1e-5 to 1e-4 there)",
    )  # fmt: skip
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=s, help=f"default per env: {per_env('optimizer')}")
    opt.add_argument("--batch-size", type=int, default=s, help=f"preference pairs per optimizer step (default per env: {per_env('batch_size')})")
    opt.add_argument("--grad-accum", type=int, default=s, help="micro-batches per optimizer step (default 1)")
    opt.add_argument("--steps", type=int, default=s, help=f"optimizer steps (default per env: {per_env('steps')})")
    opt.add_argument("--seed", type=int, default=s, help="seed for data, model and order (default 0)")
    opt.add_argument("--max-length", type=int, default=s, help="max prompt+completion tokens; longer pairs are truncated the TRL way (keep_start)")
    opt.add_argument("--no-shuffle", dest="shuffle", action="store_false", default=s, help="take pairs in file order")
    opt.add_argument("--sft-steps", type=int, default=s, help=f"SFT warm-start steps before training (default per env: {per_env('sft_steps')})")
    rec = parser.add_argument_group("recording")
    rec.add_argument("--eval-every", type=int, default=s, help="evaluate every N steps (also at the start and the end; 0: only then)")
    rec.add_argument("--checkpoint-every", type=int, default=s, help="checkpoint every N steps (and at the end; 0: only at the end)")
    rec.add_argument("--layers-every", type=int, default=s, help="per-layer rows and histograms every N steps (default 1)")
    rec.add_argument("--per-row", action="store_true", default=s, help="also record each row's own gradient norm (rows.csv)")
    rec.add_argument("--skip-nonfinite", action="store_true", default=s, help="skip (and count) steps with a non-finite loss or gradient instead of stopping")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default=s, help="run directory (one loss) or parent directory (several); default runs/ENV-LOSS-sSEED")
    out.add_argument("--resume", action="store_true", help="continue an existing run from its last checkpoint")
    out.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    out.add_argument(
        "--config", metavar="FILE",
        help="TOML, JSON or YAML file of settings (the flags' names); a TRL DPO recipe (TRL's names: learning_rate, "
        "model_name_or_path, ...) is trained by TRL's own DPOTrainer; flags override the file",
    )  # fmt: skip
    out.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    out.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="skip the TensorBoard event files (the CSV tables are always written)")
    dev = parser.add_argument_group("device")
    dev.add_argument("--device", default=s, help="auto (default), cpu, cuda, cuda:1, mps")
    dev.add_argument("--dtype", choices=DTYPES, default=s, help="model dtype (default float32)")
    dev.add_argument("--fsdp", action="store_true", default=s,
                     help=f"--env {fsdp_envs} under torchrun: shard the policy with FSDP2 (fully_shard) instead of DDP replicas")


def _env_help() -> str:
    return "; ".join(f"{name}: {spec.help}" for name, spec in load_envs().items())


def _option_help() -> str:
    from ..losses import REWEIGHTINGS

    parts = [f"{name}: " + ", ".join(f"{o.name} (default {o.default})" for o in m.options if o.name not in OPTION_FIELDS)
             for name, m in REWEIGHTINGS.items() if any(o.name not in OPTION_FIELDS for o in m.options)]  # fmt: skip
    return "; ".join(parts)


def _requested(args: argparse.Namespace) -> tuple[dict, dict]:
    """(settings from the config file, settings from flags)."""
    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k in _CONFIG_FIELDS}
    if "loss" in flags:
        flags["loss"] = parse_losses(flags["loss"], where="--loss")
    if "loss_options" in flags:
        flags["loss_options"] = parse_loss_options(flags["loss_options"])
    return file_values, flags


def _trl_recipe(args: argparse.Namespace):
    """The --config file as a TRL recipe (trl_recipe.Recipe), or None when it uses gradlens's names only."""
    from ..settings_file import read_settings_file
    from .trl_recipe import looks_like_recipe, parse_recipe

    if not getattr(args, "config", None):
        return None
    data = read_settings_file(args.config)
    if not looks_like_recipe(data, _CONFIG_FIELDS):
        return None
    if args.resume:
        raise ValueError(f"{args.config}: --resume: a TRL recipe's run cannot be resumed by gradlens record; start a new run")
    flags = {k: v for k, v in vars(args).items() if k in _CONFIG_FIELDS}
    return parse_recipe(Path(args.config), data, flags)


def _plan(args: argparse.Namespace) -> list[P.PlannedRun]:
    """Every run's directory and action, resumes checked in full; nothing written."""
    file_values, flags = _requested(args)
    explicit = {**file_values, **flags}
    out = explicit.get("out")
    if args.resume and out is not None and is_run_dir(out):
        # `--out RUN --resume`: that one run, whatever the default loss list says.
        losses = explicit.get("loss")
        if losses is not None and len(losses) > 1:
            raise ValueError(f"{out} is a single run; --resume it without a list of losses")
        saved = R.saved_config(Path(out))
        if losses is not None and losses[0] != saved.loss:
            raise ValueError(f"{out}: cannot change --loss when resuming (the run was recorded with {saved.loss!r}, you asked for {losses[0]!r})")
        cfg = R.apply_resume_overrides(saved, {k: v for k, v in explicit.items() if k != "loss"}, str(out))
        configs = [replace(cfg, out=str(out))]
    else:
        configs = resolve(file_values, flags)
    plans = P.plan_runs(configs, resume=args.resume, overwrite=args.overwrite)
    return [_plan_resume(run, explicit) if run.action == P.RESUME else run for run in plans]


def _plan_resume(run: P.PlannedRun, explicit: dict) -> P.PlannedRun:
    saved = R.saved_config(run.path)
    requested = {k: v for k, v in explicit.items() if k != "loss"}
    if saved.loss != run.cfg.loss:  # the directory name says one loss, its config another
        raise ValueError(f"{run.path / 'config.json'}: records loss {saved.loss!r}, but this job resumes {run.cfg.loss!r} there")
    cfg = R.apply_resume_overrides(saved, requested, str(run.path))
    if is_complete(run.path, cfg.steps):
        return P.PlannedRun(cfg, run.path, P.DONE, run.note)
    return P.PlannedRun(cfg, run.path, P.RESUME, run.note, resume=R.plan_resume(run.path, cfg, saved))


@dataclass
class Job:
    """One `gradlens record` invocation: its planned runs and how it reports."""

    plans: list[P.PlannedRun]
    dist: Any  # DistContext
    quiet: bool
    t0: float = field(default_factory=time.perf_counter)
    tensorboard: bool = True

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr)


def _build_envs(job: Job) -> dict:
    """One environment per distinct setup, built before any directory is written."""
    from .checkpoint import reference_path
    from .envs import ENV_FIELDS, build_env
    from .loop import check_compatible, resolve_device

    envs = {}
    for run in job.plans:
        if run.action == P.DONE:
            continue
        resolve_device(run.cfg.device)
        ref = reference_path(run.path) if run.action == P.RESUME and reference_path(run.path).is_file() else None
        key = (tuple(getattr(run.cfg, f) for f in ENV_FIELDS), ref)
        if key not in envs:
            envs[key] = build_env(run.cfg, reference_weights=ref, log=job.say, progress=not job.quiet)
        check_compatible(run.cfg, envs[key], job.dist)
        if run.resume is not None:
            R.check_weights_fit(run.resume, envs[key].policy)
        envs[run.path] = envs[key]
    return envs


def _tensorboard_dir(plans: list[P.PlannedRun]) -> Path:
    if len(plans) == 1 and plans[0].cfg.out is not None:
        return plans[0].path
    parents = {run.path.parent for run in plans}
    if len(parents) == 1:
        return parents.pop()
    return Path(os.path.commonpath([str(run.path.absolute()) for run in plans]))


def _headline(summary: dict | None) -> str:
    if not summary:
        return ""
    final_eval = summary.get(schema.SUMMARY_FINAL_EVAL) or {}
    for name in (schema.EVAL_TRUE_REWARD, schema.EVAL_KL_TO_OPTIMUM, schema.EVAL_PREF_ACCURACY):
        value = final_eval.get(name)
        if value is not None:
            return f"{name} {value:.4g}" if isinstance(value, (int, float)) else f"{name} {value}"
    return ""


# The loss "has hardly moved" when its last value is within this fraction of its first.
STALLED_LOSS = 0.01


def _stalled_note(run: P.PlannedRun) -> str:
    """A note when the loss barely moved: most often the learning rate (TRL's 1e-6 default) is too small."""
    from ..runs import read_table

    steps = read_table(run.path / schema.STEPS, quiet=True)
    if schema.LOSS not in steps or len(steps) < 2:
        return ""
    losses = steps[schema.LOSS].dropna()
    if len(losses) < 2 or not abs(losses.iloc[-1] - losses.iloc[0]) <= STALLED_LOSS * abs(losses.iloc[0]):
        return ""
    trl_default = run.cfg.lr == TRL_DEFAULT_LR == get_env(run.cfg.env).defaults.lr
    default = " (TRL's default, made for large models and long runs)" if trl_default else ""
    return (
        f"note: {run.path}: the loss hardly moved in {len(steps)} steps ({losses.iloc[0]:.4g} -> {losses.iloc[-1]:.4g}); "
        f"--lr {run.cfg.lr:g}{default} may be too small for this model: try --lr {10 * run.cfg.lr:g} or {100 * run.cfg.lr:g}"
    )


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except ValueError as exc:
        print(f"gradlens record: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only directory: the run keeps what it logged
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gradlens record: error: {where}{exc.strerror or exc}; the rows logged so far are kept (--resume continues)", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    from .progress import quiet_libraries

    with quiet_libraries(getattr(args, "quiet", False)):  # --quiet: no loading bars from transformers either
        return _main_body(args)


def _main_body(args: argparse.Namespace) -> int:
    from . import grpo_command
    from .distributed import setup, teardown

    if grpo_command.wants_grpo(args):  # sampled completions, not preference pairs: its own loop
        return grpo_command.main(args)
    if getattr(args, "env", None) == GRPO_ENV:
        raise ValueError(f"--env {GRPO_ENV} is the GRPO toy task: use it with --loss grpo")

    t0 = time.perf_counter()
    recipe = _trl_recipe(args)
    if recipe is not None:  # TRL's names: TRL's own trainer runs it (trl_run.py)
        from .trl_run import Output, run_recipe

        return run_recipe(recipe, Output(quiet=args.quiet, tensorboard=getattr(args, "tensorboard", True), overwrite=args.overwrite))
    dist = setup(getattr(args, "device", None) or "auto")
    try:
        quiet = getattr(args, "quiet", False) or not dist.is_main
        job = Job(_plan(args), dist, quiet=quiet, t0=t0, tensorboard=getattr(args, "tensorboard", True))
        dist.barrier()  # every rank has planned before rank 0 creates a directory
        return _run_plans(job)
    finally:
        teardown(dist)


def _run_plans(job: Job) -> int:
    import torch

    threads = torch.get_num_threads()
    if all(run.cfg.env in envs_with("small") for run in job.plans):
        # These environments (`small=True` in the registry) have tiny models: extra threads only add synchronisation, and on a
        # busy machine they make each step several times slower.
        torch.set_num_threads(1)
    try:
        return _record_all(job)
    finally:
        torch.set_num_threads(threads)


def _record_all(job: Job) -> int:
    envs = _build_envs(job)
    # Only now that every input is validated: a note before an error would describe a job that never runs.
    for run in job.plans:
        if run.note:
            job.say(f"note: {run.note}")
    _say_precision(job)
    results = []
    for run in job.plans:
        if run.action == P.DONE:
            job.say(f"{run.path}: already complete ({run.cfg.steps} steps); nothing to do")
            results.append((run, None))
            continue
        result = _record_one(job, run, envs[run.path])
        if job.dist.is_main:
            if result.message:
                print(f"gradlens record: {run.path}: {result.message}", file=sys.stderr)
            results.append((run, result))
    if job.dist.is_main:
        _report(job.plans, results, time.perf_counter() - job.t0)
    return 1 if any(r is not None and r.status != "complete" for _, r in results) else 0


def _say_precision(job: Job) -> None:
    from .progress import precision_note

    for note in dict.fromkeys(precision_note(run.cfg.dtype) for run in job.plans if run.action != P.DONE):
        if note:
            job.say(note)


def _record_one(job: Job, run: P.PlannedRun, env):
    """One run under the writer lock (rank 0 holds it; other ranks write nothing)."""
    from .loop import record_run

    lock = None
    if job.dist.is_main:
        lock, _ = lock_run_dir(run.path, resume=run.action == P.RESUME, overwrite=run.action == P.OVERWRITE, recheck=lambda: _recheck(run))
    try:
        job.dist.barrier()
        return record_run(run.cfg, run.path, env, resume=run.resume, progress=not job.quiet, dist=job.dist, tensorboard=job.tensorboard)
    finally:
        if lock is not None:
            release_run_dir(lock)
            if run.action == P.OVERWRITE:
                restore_replaced(run.path)  # stopped before the new run's first row: the old run comes back


def _recheck(run: P.PlannedRun) -> None:
    """Under the lock: the directory is still as planned (another writer may have finished meanwhile)."""
    if run.action == P.NEW and run_contents(run.path).started:
        raise ValueError(f"{run.path}: another process wrote this run directory while this job was starting; it was left unchanged")
    if run.action == P.RESUME:
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(run.path)
        if (last.step if last else 0) != run.resume.start or is_complete(run.path, run.cfg.steps):
            raise ValueError(f"{run.path}: another process changed this run while this job was starting; it was left unchanged")


REPORT_WIDTH = 100  # the end-of-run summary fits a 100-column terminal


def _shown(path: Path) -> str:
    """A path as short as it can be said: relative to the current directory when below it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _wrapped_command(words: list[str], width: int = REPORT_WIDTH) -> list[str]:
    """A shell command split over lines of at most ``width`` columns with trailing backslashes."""
    lines, line = [], "  " + words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) + 2 > width:
            lines.append(line + " \\")
            line = "      " + word
        else:
            line += " " + word
    return lines + [line]


def _report(plans: list[P.PlannedRun], results, seconds: float) -> None:
    import json
    import textwrap

    print(f"gradlens record: {len(plans)} run(s) in {seconds:.1f} s")
    for run, result in results:
        summary_path = run.path / schema.SUMMARY
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
        status = summary.get(schema.SUMMARY_STATUS, "?") if summary else "incomplete"
        steps = summary.get(schema.SUMMARY_STEPS_LOGGED, "?") if summary else "?"
        headline = _headline(summary)
        detail = f"{run.cfg.loss}, {status}, {steps} steps" + (f", {headline}" if headline else "")
        line = f"  {_shown(run.path)}: {detail}"
        print(line if len(line) <= REPORT_WIDTH else f"  {_shown(run.path)}\n      {detail}")
    for run, result in results:
        note = _stalled_note(run) if result is not None else ""
        if note:
            print(textwrap.fill(note, REPORT_WIDTH, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False))
    print("Each run directory holds config.json, steps.csv, layers.csv, evals.csv, summary.json,")
    print("checkpoints/ and the TensorBoard event files.")
    print("Next:")
    print("\n".join(_wrapped_command(["gradlens", "plot", *(shlex.quote(_shown(run.path)) for run in plans)])))
    print("\n".join(_wrapped_command(["tensorboard", "--logdir", shlex.quote(_shown(_tensorboard_dir(plans)))])))
