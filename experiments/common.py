"""Shared plumbing for the experiment scripts: arguments, where outputs go,
recording one preference run through ``gradlens record``'s API, paired
bootstrap intervals and result tables.

Nothing here trains, measures or plots on its own: the scripts call
``gradlens.record.loop.record_run``, ``gradlens.analysis``, ``gradlens.plot``
and ``gradlens.langevin``; this module only saves each script from repeating
the same dozen lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
FIGURES = REPO / "figures"
RUNS = REPO / "experiments" / "runs"


def parse_args(description: str, name: str, extra=None) -> argparse.Namespace:
    """``--smoke`` and ``--out``; full runs go to experiments/runs/NAME and results to figures/.

    ``extra(parser)`` adds a script's own flags.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for the tests")
    parser.add_argument(
        "--out", default=None, metavar="DIR",
        help=f"where runs and (with --smoke) results go; default: experiments/runs/{name} (full) or a temporary directory (smoke)",
    )  # fmt: skip
    parser.add_argument(
        "--figures", default=None, metavar="DIR",
        help="where figures and tables go; default: figures/ (full) or OUT/figures (smoke)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix=f"gradlens-{name}-") if args.smoke else str(RUNS / name)
    args.out = Path(args.out)
    if args.figures is None:
        args.figures = args.out / "figures" if args.smoke else FIGURES
    args.figures = Path(args.figures)
    args.out.mkdir(parents=True, exist_ok=True)
    args.figures.mkdir(parents=True, exist_ok=True)
    return args


def quiet_threads() -> None:
    """One thread: the models are tiny and the machine is shared (as `gradlens record` does)."""
    import torch

    torch.set_num_threads(1)


def record(cfg, run_dir: Path, env=None, log=None):
    """One run through `gradlens record`'s API; a run that already finished is kept.

    ``cfg`` is a RecordConfig with the fields that matter set; the environment's
    defaults fill the rest and the result is validated as the CLI would.
    """
    from gradlens.runs import RunLock, prepare_run_dir
    from gradlens.record.config import validate, with_env_defaults
    from gradlens.record.envs import build_env
    from gradlens.record.loop import record_run

    cfg = validate(with_env_defaults(replace(cfg, out=str(run_dir))))
    if is_done(run_dir, cfg.steps):
        return "kept"
    if env is None:
        env = build_env(cfg, log=log or (lambda message: None))
    with RunLock(run_dir):  # one writer per run directory, as for `gradlens record`
        prepare_run_dir(run_dir, overwrite=Path(run_dir).exists())  # an unfinished run of ours: replaced
        return record_run(cfg, Path(run_dir), env, progress=False, log=log or (lambda message: None)).status


def is_done(run_dir: Path, steps: int) -> bool:
    """The run ended at ``steps`` (complete, or stopped on a non-finite loss, which a rerun would repeat)."""
    from gradlens.runs import run_status

    return run_status(run_dir, steps) is not None


def paired_ci(values: Sequence[float], baseline: Sequence[float], *, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the per-seed differences and its 95 % bootstrap CI over seeds.

    Seeds are matched (same environment, data and order), so the difference is
    taken per seed and those differences are resampled (``paired=True``).
    """
    from gradlens.analysis import bootstrap_diff_ci

    return bootstrap_diff_ci(np.asarray(values, float), np.asarray(baseline, float), paired=True, seed=seed)


def fmt_ci(diff: float, low: float, high: float, digits: int = 3) -> str:
    """``-0.12 [-0.20, -0.05]``; an interval excluding 0 is marked with ``*``."""
    if not np.isfinite(diff):
        return "n/a"
    star = "*" if (low > 0 or high < 0) else ""
    return f"{diff:+.{digits}g} [{low:+.{digits}g}, {high:+.{digits}g}]{star}"


def write_tables(frame: pd.DataFrame, out: Path, name: str) -> list[Path]:
    """``out/name.csv`` and ``out/name.md`` (gradlens plot's table writer)."""
    from gradlens.plot.report import write_table

    return write_table(frame, out, name)


def save(fig, out: Path, name: str, dpi: int = 110) -> Path:
    """A PNG at modest resolution, palette-quantised (the committed figures stay small)."""
    from gradlens.plot.style import plt

    path = Path(out) / f"{name}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    shrink_png(path)
    return path


def shrink_png(path: Path) -> None:
    """Rewrite a PNG with a 256-colour palette: a third of the size, no visible change for line plots."""
    from PIL import Image

    with Image.open(path) as image:
        quantised = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    quantised.save(path, optimize=True)


class Timer:
    """Wall time of each phase, written beside the results (runtimes in docs/results.md come from here)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}
        self._last = self.t0

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name] = round(now - self._last, 1)
        self._last = now
        print(f"[{name}] {self.phases[name]:.1f} s", flush=True)
        return self.phases[name]

    def write(self, path: Path, **extra) -> None:
        total = round(time.perf_counter() - self.t0, 1)
        Path(path).write_text(json.dumps({"total_s": total, "phases_s": self.phases, **extra}, indent=2) + "\n")


def run_counts(index: list[dict]) -> dict:
    """How many runs this invocation trained and kept, and the runs' own wall times
    (summary.json), so a re-run that only redoes the analysis does not hide the cost."""
    walls = [json.loads((Path(i["path"]) / "summary.json").read_text()).get("wall_time_s", 0.0) for i in index]
    return {
        "runs": len(index),
        "runs_trained_now": sum(not i.get("kept", False) for i in index),
        "runs_kept_from_before": sum(bool(i.get("kept", False)) for i in index),
        "sum_of_run_wall_times_s": round(float(sum(walls)), 1),
    }


def check_outputs(figures_dir: Path, names: Iterable[str]) -> None:
    """Fail loudly when a declared output was not written."""
    missing = [n for n in names if not (Path(figures_dir) / Path(n).name).is_file()]
    if missing:
        raise SystemExit(f"outputs not written: {missing}")


def finish_training_experiment(args, timer: "Timer", index: list[dict], name: str, steps: int, figures: Iterable[str]) -> None:
    """Record the runtime (unless this was an analysis-only re-run) and check every declared output."""
    counts, runtime = run_counts(index), args.figures / f"{name}_runtime.json"
    if counts["runs_trained_now"] or not runtime.exists():  # an analysis-only re-run keeps the training run's record
        timer.write(runtime, **counts, steps_per_run=steps, smoke=args.smoke)
    check_outputs(args.figures, figures)
