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
from pathlib import Path

from ..runs import is_run_dir, prepare_run_dir
from . import plan as P
from .config import (
    BALANCE_SPACES, DTYPES, ENVS, OPTIMIZERS, RecordConfig, apply_resume_overrides, config_from_saved,
    load_config_file, parse_losses, resolve,
)

_CONFIG_FIELDS = set(RecordConfig.__dataclass_fields__)
SMALL_ENVS = ("tabular", "tiny-gpt2")

EPILOG = """\
examples:
  gradlens record                                   # DPO then Balanced-DPO on tiny-gpt2 (about a minute on a laptop CPU)
  gradlens record --env tabular --loss dpo,balanced,adadpo --steps 500
  gradlens record --env user --model ./my-model --data prefs.jsonl --loss balanced --out runs/mine
  gradlens record --out runs/mine --resume         # continue from the last checkpoint
  gradlens record --config job.toml --lr 1e-5      # flags override the file
  torchrun --nproc_per_node 4 -m gradlens record --env user --model ./my-model --data prefs.jsonl --fsdp
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    s = argparse.SUPPRESS  # unset flags stay unset, so a --config file can supply them
    what = parser.add_argument_group("what to train")
    what.add_argument("--env", choices=ENVS, default=s, help="built-in environment or your own model+data (default tiny-gpt2)")
    what.add_argument("--model", metavar="DIR", default=s, help="--env user: local Hugging Face model directory (never downloaded)")
    what.add_argument("--data", metavar="FILE", default=s, help="--env user: preference pairs, .jsonl/.csv/.parquet, TRL standard or conversational format")
    what.add_argument("--eval-data", metavar="FILE", default=s, help="--env user: held-out pairs for evaluations (default: the first 64 training pairs)")
    what.add_argument("--loss", metavar="LOSS[,LOSS]", default=s, help="dpo, balanced or adadpo; a comma list records one run per loss (default dpo,balanced)")
    what.add_argument("--beta", type=float, default=s, help="DPO beta (default 0.1)")
    what.add_argument("--balance-space", choices=BALANCE_SPACES, default=s, help="Balanced-DPO weights from sequence log-probs or per-token means (default sequence)")
    what.add_argument("--adadpo-cap", type=float, default=s, help="AdaDPO cap C on p_w/p_l (default 2)")
    lora = parser.add_argument_group("LoRA (--env user; pip install 'gradlens[peft]')")
    lora.add_argument("--lora-r", type=int, default=s, help="train a LoRA adapter of this rank instead of every weight (default 0: no LoRA)")
    lora.add_argument("--lora-alpha", type=float, default=s, help="LoRA alpha (default 2 x rank)")
    lora.add_argument("--lora-target-modules", metavar="NAMES", default=s, help="comma-separated module names, or all-linear (default)")
    lora.add_argument("--lora-dropout", type=float, default=s, help="LoRA dropout saved in the adapter config (gradlens record trains with every dropout off)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=s, help="learning rate (default per env: tabular 0.05, tiny-gpt2 1e-3, user 1e-6)")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=s, help="default adam (tabular) or adamw")
    opt.add_argument("--batch-size", type=int, default=s, help="preference pairs per optimizer step (default tabular 32, tiny-gpt2 16, user 8)")
    opt.add_argument("--grad-accum", type=int, default=s, help="micro-batches per optimizer step (default 1)")
    opt.add_argument("--steps", type=int, default=s, help="optimizer steps (default 300 tabular/tiny-gpt2, 100 user)")
    opt.add_argument("--seed", type=int, default=s, help="seed for data, model and order (default 0)")
    opt.add_argument("--max-length", type=int, default=s, help="max prompt+completion tokens; longer pairs are truncated the TRL way (keep_start)")
    opt.add_argument("--no-shuffle", dest="shuffle", action="store_false", default=s, help="take pairs in file order")
    opt.add_argument("--sft-steps", type=int, default=s, help="tiny-gpt2: SFT warm-start steps (default 300)")
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
    out.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings (same names as the flags); flags override it")
    out.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    dev = parser.add_argument_group("device")
    dev.add_argument("--device", default=s, help="auto (default), cpu, cuda, cuda:1, mps")
    dev.add_argument("--dtype", choices=DTYPES, default=s, help="model dtype (default float32)")
    dev.add_argument("--fsdp", action="store_true", default=s,
                     help="--env user under torchrun: shard the policy with FSDP2 (fully_shard) instead of DDP replicas")


def _requested(args: argparse.Namespace) -> tuple[dict, dict]:
    """(settings from the config file, settings from flags)."""
    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k in _CONFIG_FIELDS}
    if "loss" in flags:
        flags["loss"] = parse_losses(flags["loss"], where="--loss")
    return file_values, flags


def _plan(args: argparse.Namespace) -> list[P.PlannedRun]:
    file_values, flags = _requested(args)
    configs = resolve(file_values, flags)
    explicit = {**file_values, **flags}
    out = configs[0].out
    if args.resume and out is not None and is_run_dir(out):
        # `--out RUN --resume`: that one run, whatever the default loss list says.
        if len(configs) > 1 and "loss" in explicit:
            raise ValueError(f"{out} is a single run; --resume it without a list of losses")
        configs = configs[:1]
    plans = P.plan_runs(configs, resume=args.resume, overwrite=args.overwrite)
    resolved = []
    for run in plans:
        if run.action != P.RESUME:
            resolved.append(run)
            continue
        import json

        header = json.loads((run.path / "config.json").read_text(encoding="utf-8"))
        saved = config_from_saved(header.get("config", {}), str(run.path / "config.json"))
        cfg = apply_resume_overrides(saved, explicit, str(run.path))
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(run.path)
        if last is not None and last.step > cfg.steps:
            raise ValueError(f"{run.path}: --steps {cfg.steps} is below the last checkpoint (step {last.step}); a run cannot be shortened")
        action = P.DONE if P.is_complete(run.path, cfg.steps) else P.RESUME
        resolved.append(P.PlannedRun(cfg, run.path, action, run.note))
    return resolved


def _build_envs(plans: list[P.PlannedRun], say, dist) -> dict:
    """One environment per distinct setup, built before any directory is written."""
    from .checkpoint import reference_path
    from .envs import ENV_FIELDS, build_env
    from .loop import check_compatible, resolve_device

    envs = {}
    for run in plans:
        if run.action == P.DONE:
            continue
        resolve_device(run.cfg.device)
        ref = reference_path(run.path) if run.action == P.RESUME and reference_path(run.path).is_file() else None
        key = (tuple(getattr(run.cfg, f) for f in ENV_FIELDS), ref)
        if key not in envs:
            envs[key] = build_env(run.cfg, reference_weights=ref, log=say)
        check_compatible(run.cfg, envs[key], dist)
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
    final_eval = summary.get("final_eval") or {}
    for name in ("eval/true_reward", "eval/kl_to_optimum", "eval/pref_accuracy"):
        value = final_eval.get(name)
        if value is not None:
            return f"{name} {value:.4g}" if isinstance(value, (int, float)) else f"{name} {value}"
    return ""


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except ValueError as exc:
        print(f"gradlens record: error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from .distributed import setup, teardown

    t0 = time.perf_counter()
    dist = setup(getattr(args, "device", None) or "auto")
    try:
        quiet = getattr(args, "quiet", False) or not dist.is_main
        say = (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr))
        plans = _plan(args)
        dist.barrier()  # every rank has planned before rank 0 creates a directory
        return _run_plans(plans, say, quiet, t0, dist)
    finally:
        teardown(dist)


def _run_plans(plans: list[P.PlannedRun], say, quiet: bool, t0: float, dist) -> int:
    for run in plans:
        if run.note:
            say(f"note: {run.note}")
    import torch

    threads = torch.get_num_threads()
    if all(run.cfg.env in SMALL_ENVS for run in plans):
        # The built-in models are tiny: extra threads only add synchronisation, and on a
        # busy machine they make each step several times slower.
        torch.set_num_threads(1)
    try:
        return _record_all(plans, say, quiet, t0, dist)
    finally:
        torch.set_num_threads(threads)


def _record_all(plans: list[P.PlannedRun], say, quiet: bool, t0: float, dist) -> int:
    envs = _build_envs(plans, say, dist)

    from .loop import record_run

    results = []
    for run in plans:
        if run.action == P.DONE:
            say(f"{run.path}: already complete ({run.cfg.steps} steps); nothing to do")
            results.append((run, None))
            continue
        if run.action in (P.NEW, P.OVERWRITE) and dist.is_main:
            prepare_run_dir(run.path, overwrite=run.action == P.OVERWRITE)
        dist.barrier()
        result = record_run(run.cfg, run.path, envs[run.path], resume=run.action == P.RESUME, progress=not quiet, dist=dist)
        if not dist.is_main:
            continue
        if result.message:
            print(f"gradlens record: {run.path}: {result.message}", file=sys.stderr)
        results.append((run, result))
    if dist.is_main:
        _report(plans, results, time.perf_counter() - t0)
    return 1 if any(r is not None and r.status != "complete" for _, r in results) else 0


def _report(plans: list[P.PlannedRun], results, seconds: float) -> None:
    import json

    from ..runs import schema

    print(f"gradlens record: {len(plans)} run(s) in {seconds:.1f} s")
    width = max(len(str(run.path)) for run in plans)
    for run, result in results:
        summary_path = run.path / schema.SUMMARY
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
        status = summary.get("status", "?") if summary else "incomplete"
        steps = summary.get("steps_logged", "?") if summary else "?"
        print(f"  {str(run.path):<{width}}  {run.cfg.loss:<8}  {status:<9}  {steps} steps  {_headline(summary)}".rstrip())
    print("Each run directory holds config.json, steps.csv, layers.csv, evals.csv, summary.json,")
    print("checkpoints/ and the TensorBoard event files.")
    print("Next:")
    print("  gradlens plot " + " ".join(shlex.quote(str(run.path)) for run in plans))
    print(f"  tensorboard --logdir {shlex.quote(str(_tensorboard_dir(plans)))}")
