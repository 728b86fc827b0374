"""Where each run of a `gradlens record` job goes, decided before anything is written.

* ``--out DIR`` with one loss: the run directory is DIR.
* ``--out DIR`` with several losses: DIR is a parent; runs go to DIR/ENV-LOSS-sSEED.
* No ``--out``: runs/ENV-LOSS-sSEED. When one of a job's directories already
  exists, a fresh suffix is picked for the whole job (runs/ENV-LOSS-sSEED-2, -3, ...),
  so re-running the default job never touches an earlier run. ``--overwrite``
  replaces the unsuffixed directories; ``--resume`` continues the most recent
  (highest-suffixed) set.
* An explicit directory that exists is never modified without ``--resume`` or
  ``--overwrite``; the check covers every run of the job before the first starts.
  ``--overwrite`` replaces only gradlens runs (``runs.check_overwritable``).
* ``--overwrite`` sets the old run aside (``.NAME.gradlens-replaced``) and deletes it
  once the new run has logged a row; the next job on NAME puts back a run that an
  interrupted ``--overwrite`` left aside.
* A directory is "started" once it holds more than a writer leaves in its first
  instant (the lock, ``config.json.tmp``): one that is not is treated as new, and
  ``--resume`` of a job starts the runs that never started once any run of the
  job exists (a job killed during its first run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..runs import (
    check_name_lengths, check_no_links, check_not_inside_a_run, check_overwritable, is_run_dir, restore_replaced, run_contents, schema,
)
from .config import RecordConfig

if TYPE_CHECKING:
    from .resume import ResumePoint

DEFAULT_ROOT = Path("runs")

NEW, RESUME, OVERWRITE, DONE = "new", "resume", "overwrite", "complete"


@dataclass(frozen=True)
class PlannedRun:
    cfg: RecordConfig
    path: Path
    action: str  # NEW / RESUME / OVERWRITE / DONE
    note: str = ""
    resume: "ResumePoint | None" = None  # RESUME: what it continues from (checked, nothing written)


def run_name(cfg: RecordConfig) -> str:
    return f"{cfg.env}-{cfg.loss}-s{cfg.seed}"


def _occupied(path: Path) -> bool:
    """Exists and is not a never-started run directory."""
    return path.exists() and (not path.is_dir() or run_contents(path).started)


def _check_creatable(path: Path) -> None:
    """``path`` is a directory, or could be made one: its nearest existing ancestor is a directory."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory")
    check_name_lengths(path)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{path}: cannot be created, because {parent} is a file, not a directory")
            return


def _begun(path: Path) -> bool:
    """A writer got as far as its lock or config.json.tmp, then died."""
    return path.is_dir() and bool(run_contents(path).ours)


def _suffixed(path: Path, k: int) -> Path:
    return path if k == 1 else path.with_name(f"{path.name}-{k}")


def _explicit_paths(configs: list[RecordConfig], out: Path) -> list[Path]:
    if len(configs) == 1:
        return [out]
    return [out / run_name(c) for c in configs]


def plan_runs(configs: list[RecordConfig], *, resume: bool, overwrite: bool) -> list[PlannedRun]:
    """Directories and actions for each config; raises ValueError before any write."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    out = configs[0].out
    if out is not None:
        paths = _explicit_paths(configs, Path(out))
        base = None
    else:
        base = [DEFAULT_ROOT / run_name(c) for c in configs]
        paths = _default_paths(base, resume=resume, overwrite=overwrite)
    plans = []
    # --resume of a job: the runs that never started are started, once any run of the job exists.
    job_started = any(is_run_dir(p) for p in paths)
    for cfg, path in zip(configs, paths):
        _check_creatable(path)
        check_not_inside_a_run(path)
        if not overwrite:
            restore_replaced(path)  # a run an interrupted --overwrite set aside goes back first
        if resume:
            if is_run_dir(path):
                check_no_links(path)
                plans.append(PlannedRun(cfg, path, RESUME))
            elif (out is None or job_started or _begun(path)) and not _occupied(path):
                plans.append(PlannedRun(cfg, path, NEW, f"{path}: not started before; starting it"))
            elif _occupied(path):
                raise ValueError(f"{path}: not a gradlens run directory (no {schema.CONFIG}); it was left unchanged")
            else:
                raise ValueError(f"{path}: nothing to resume (no such run); drop --resume to start a new run")
        elif _occupied(path):
            if not overwrite:
                raise ValueError(
                    f"{path}: run directory already exists and is not empty; pass --resume to continue it "
                    "or --overwrite to replace it (it was left unchanged)"
                )
            check_overwritable(path)  # a gradlens run holding nothing else, or refuse now
            plans.append(PlannedRun(cfg, path, OVERWRITE))
        else:
            note = ""
            if base is not None and path not in base:
                note = f"{base[paths.index(path)]} exists, so this job writes {path} (--overwrite replaces the first)"
            plans.append(PlannedRun(cfg, path, NEW, note))
    if len({p.path.resolve() for p in plans}) != len(plans):
        raise ValueError("two runs of this job would write the same directory; give each loss its own --out")
    return plans


def _used_suffixes(path: Path) -> set[int]:
    """Suffixes k of occupied siblings named like ``path`` (k = 1 is ``path`` itself)."""
    if not path.parent.is_dir():
        return set()
    used = set()
    for child in path.parent.iterdir():
        if child.name == path.name:
            k = 1
        elif child.name.startswith(path.name + "-") and child.name[len(path.name) + 1 :].isdigit():
            k = int(child.name[len(path.name) + 1 :])
        else:
            continue
        if k >= 1 and _occupied(child):
            used.add(k)
    return used


def _default_paths(base: list[Path], *, resume: bool, overwrite: bool) -> list[Path]:
    if overwrite:
        return base
    used = set().union(*(_used_suffixes(p) for p in base))
    if resume:
        if not used:
            raise ValueError(f"nothing to resume: no {' or '.join(str(p) for p in base)} (or suffixed copies) exist")
        k = max(used)  # the most recent job
    else:
        k = max(used, default=0) + 1  # fresh names, never an earlier run's
    return [_suffixed(p, k) for p in base]
