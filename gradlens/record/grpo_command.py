"""`gradlens record --loss grpo`: the flags of a GRPO run on the built-in toy task, checked, then run.

GRPO trains on sampled completions, not on preference pairs, so it has its own loop
(``grpo.py``) and its own environment, the toy task ``toy-grpo`` (``grpo_task.py``). This
module maps the flags that mean the same thing (seed, steps, learning rate, prompts per
step, evaluation and layer cadence, output) onto ``GRPOSettings``, takes GRPO's own
settings from ``--loss-option`` (``num_generations``, ``epsilon``, ``kl``, ``iterations``),
and refuses every flag that has no meaning for it, naming the flag.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..runs import RunLockedError, check_overwritable, is_run_dir

if TYPE_CHECKING:
    from .grpo import GRPOSettings

LOSS = "grpo"
ENV = "toy-grpo"
# flag (argparse dest) -> GRPOSettings field
SHARED_FLAGS = {"seed": "seed", "steps": "steps", "lr": "lr", "batch_size": "batch_size", "eval_every": "eval_every",
                "layers_every": "layers_every"}  # fmt: skip
OPTIONS = {"num_generations": int, "epsilon": float, "kl": float, "iterations": int}
# flags that are fine to pass (they select this path or say how to report)
NEUTRAL = {"loss", "env", "out", "overwrite", "quiet", "tensorboard", "loss_options", "resume", "config", "device", "dtype"}


def wants_grpo(args: argparse.Namespace) -> bool:
    """True when ``--loss`` names grpo (alone or in a list: the list is refused later with a clear message)."""
    loss = getattr(args, "loss", None)
    return isinstance(loss, str) and LOSS in [part.strip() for part in loss.split(",")]


def settings_from(args: argparse.Namespace) -> tuple[GRPOSettings, Path]:
    """The run's ``GRPOSettings`` and output directory, or ValueError naming the flag."""
    from .grpo import GRPOSettings

    if [p.strip() for p in args.loss.split(",")] != [LOSS]:
        raise ValueError(f"--loss {args.loss}: grpo trains on sampled completions with its own loop; record it alone (--loss grpo)")
    env = getattr(args, "env", ENV)
    if env != ENV:
        raise ValueError(f"--loss grpo runs on the built-in toy task (--env {ENV}); --env {env} trains on preference pairs")
    from .config import RecordConfig

    given = vars(args)
    for name, value in given.items():
        if name not in RecordConfig.__dataclass_fields__ or name in NEUTRAL or name in SHARED_FLAGS or value is None or value is False:
            continue
        raise ValueError(f"--{name.replace('_', '-')} has no meaning for --loss grpo (it sets up preference-pair training)")
    if given.get("resume"):
        raise ValueError("--resume is not available for --loss grpo runs (they take seconds: run again with --overwrite)")
    if given.get("config"):
        raise ValueError("--config is not read for --loss grpo: give its few settings as flags")
    if given.get("dtype") not in (None, "float32"):
        raise ValueError("--loss grpo runs in float32 (the toy policy is tiny)")
    if given.get("device") not in (None, "auto", "cpu"):
        raise ValueError("--loss grpo runs on the CPU (the toy policy is tiny)")
    settings = GRPOSettings(**{field: given[flag] for flag, field in SHARED_FLAGS.items() if flag in given})
    options = _options(given.get("loss_options") or [])
    settings = replace(settings, **options).validate()
    out = Path(given.get("out") or f"runs/{ENV}-{LOSS}-s{settings.seed}")
    return settings, out


def _options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--loss-option {item!r}: expected KEY=VALUE, e.g. --loss-option num_generations=8")
        if key not in OPTIONS:
            raise ValueError(f"--loss-option {key}: grpo's options are {', '.join(OPTIONS)}")
        try:
            out[key] = OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"--loss-option {key}={value}: expected {OPTIONS[key].__name__}") from None
    return out


def main(args: argparse.Namespace) -> int:
    try:
        settings, out = settings_from(args)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a directory")
        if is_run_dir(out) or (out.exists() and any(out.iterdir())):
            if not args.overwrite:
                raise ValueError(f"{out} already holds files; pass --overwrite to replace a gradlens run there, or choose another --out")
            check_overwritable(out)  # never deletes what gradlens did not write
    except (ValueError, RunLockedError) as exc:
        print(f"gradlens record: error: {exc}", file=sys.stderr)
        return 2
    return _run(settings, out, args)


def _run(settings, out: Path, args: argparse.Namespace) -> int:
    import torch

    from .grpo import record_grpo

    quiet = getattr(args, "quiet", False)
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only add synchronisation
    try:
        say(f"{out}: GRPO on {ENV}, {settings.steps} steps, {settings.batch_size} prompts x {settings.num_generations} completions")
        row = record_grpo(settings, out, log=say, tensorboard=getattr(args, "tensorboard", True), overwrite=bool(args.overwrite))
    except (ValueError, RunLockedError) as exc:
        print(f"gradlens record: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only directory: the run keeps what it logged
        print(f"gradlens record: error: {exc.filename or out}: {exc.strerror or exc}; the rows logged so far are kept", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
    print(f"gradlens record: {out}: grpo, {settings.steps} steps; last step: rho = |g_negative|/|g_positive| = "
          f"{row.get('grad/ratio', float('nan')):.3g}, cosine = {row.get('grad/cosine', float('nan')):.3g}")  # fmt: skip
    print(f"Next:\n  gradlens plot {out}\n  tensorboard --logdir {out}")
    return 0


__all__ = ["ENV", "LOSS", "main", "settings_from", "wants_grpo"]
