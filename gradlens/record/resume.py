"""`gradlens record --resume`: every check first, then the first write.

Resuming continues a run from its last checkpoint ``step_N``: rows with step
>= N are dropped and logged again, so the step sequence has neither gaps nor
duplicates. All of it lives here, in the order it happens:

1. ``plan_resume``: read the saved config, refuse changed settings (only
   ``RESUMABLE_CHANGES`` may differ), read and check every checkpoint file
   (state.json, the weights' header, the optimizer state) and every table's
   step column, and refuse when logged rows would be lost: rows reach past a
   checkpoint that is gone. Nothing is written.
2. ``check_weights_fit``: once the environment is built, the checkpoint's
   tensors must fit the model (names and shapes). Nothing is written.
3. ``restore``: load the weights and optimizer state into the fresh model.
4. ``begin`` (the writer lock is held by then): note the resume in
   config.json and remove checkpoint directories a kill left half-pruned. The
   first write; ``PreferenceRunLog(resume_at=N)`` then cuts the tables back to
   the checkpoint (checked in step 1) and drops summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..runs import schema
from ..runs.run_dir import RunWriter, check_continuable_by, read_json, run_status
from ..runs.tables import check_header, table_steps
from . import checkpoint as ckpt
from .config import RecordConfig, config_from_saved, validate

# Fields a resumed run may change; everything else must match the saved run.
RESUMABLE_CHANGES = frozenset({"steps", "device", "eval_every", "checkpoint_every", "layers_every", "skip_nonfinite"})
# Fields that name where the run is rather than what it does.
_LOCATION = frozenset({"out"})


@dataclass(frozen=True)
class ResumePoint:
    """What a resumed run continues from; built by ``plan_resume`` before anything is written."""

    cfg: RecordConfig
    checkpoint: ckpt.Checkpoint | None
    state: dict = field(default_factory=dict)        # the checkpoint's state.json
    optimizer_state: dict | None = field(default=None, repr=False)

    @property
    def start(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0


def saved_config(run_dir: Path) -> RecordConfig:
    """The config a run was recorded with, from its config.json (errors name the file)."""
    path = Path(run_dir) / schema.CONFIG
    check_continuable_by(run_dir, env=None)  # a trainer integration's run is not continued here
    header = read_json(path)
    saved = header.get("config") if isinstance(header, dict) else None
    if not isinstance(saved, dict) or header.get("kind") != schema.KIND_PREFERENCE:
        raise ValueError(f"{path}: not the config of a `gradlens record` run (needs kind {schema.KIND_PREFERENCE!r} and a 'config' object)")
    return config_from_saved(saved, str(path))


def apply_resume_overrides(saved: RecordConfig, requested: Mapping[str, Any], where: str) -> RecordConfig:
    """A resumed run keeps its config; only RESUMABLE_CHANGES may differ (the loss never)."""
    changes = {}
    for name, value in requested.items():
        if name in _LOCATION or value == getattr(saved, name):
            continue
        if name not in RESUMABLE_CHANGES:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{where}: cannot change {flag} when resuming (the run was recorded with {getattr(saved, name)!r}, "
                f"you asked for {value!r}); only {', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE_CHANGES))} may change"
            )
        changes[name] = value
    return validate(replace(saved, **changes))


def resumed_config(run_dir: Path, requested: Mapping[str, Any]) -> RecordConfig:
    """The saved config with the requested (allowed) changes; ``requested['loss']`` is one loss name."""
    return apply_resume_overrides(saved_config(run_dir), requested, str(run_dir))


def _first_checkpoint(cfg: RecordConfig, run_dir: Path) -> int:
    """The earliest step at which this run wrote a checkpoint, from its history.

    Its settings save one every ``checkpoint_every`` steps and one at the end, so the
    first is at min(checkpoint_every, steps); ``--checkpoint-every`` may have changed on an
    earlier resume, but a resume from step s > 0 (config.json's ``resumes``) shows that a
    checkpoint existed at s.
    """
    first = min(cfg.checkpoint_every or cfg.steps, cfg.steps)
    header = read_json(run_dir / schema.CONFIG)
    for entry in header.get("resumes", []) if isinstance(header, dict) and isinstance(header.get("resumes"), list) else []:
        step = entry.get("from_step") if isinstance(entry, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            first = min(first, step)
    return first


def plan_resume(run_dir: Path, cfg: RecordConfig, saved: RecordConfig) -> ResumePoint:
    """Check everything a resume will read or rewrite; raise ValueError, write nothing."""
    run_dir = Path(run_dir)
    root = ckpt.checkpoints_dir(run_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: is not a directory, so this run's checkpoints are gone; it was left unchanged")
    last = ckpt.latest_checkpoint(run_dir)
    if last is not None and last.step > cfg.steps:
        raise ValueError(f"{run_dir}: --steps {cfg.steps} is below the last checkpoint (step {last.step}); a run cannot be shortened")
    for name, columns in ((schema.STEPS, schema.PREFERENCE_STEP_COLUMNS), (schema.LAYERS, schema.LAYER_COLUMNS),
                          (schema.ROWS, schema.ROW_COLUMNS)):
        check_header(run_dir / name, columns)  # a table of an older gradlens: refused before anything is cut
    logged = {name: table_steps(run_dir / name) for name in (schema.STEPS, schema.LAYERS, schema.EVALS, schema.ROWS) if (run_dir / name).exists()}
    rows = logged.get(schema.STEPS, [])
    # Step s's row is logged only after checkpoint step_s (if any) was in place: rows past
    # the first checkpoint with no checkpoint left mean the checkpoints were lost.
    first = _first_checkpoint(saved, run_dir)
    finished = run_status(run_dir) == schema.STATUS_COMPLETE  # a complete run wrote its last checkpoint
    if last is None and rows and (max(rows) >= first or finished):
        past = f"past the first checkpoint (step {first})" if max(rows) >= first else "of a finished run, which ends with a checkpoint"
        raise ValueError(
            f"{run_dir}: {schema.STEPS} holds {len(rows)} logged steps (up to step {max(rows)}), {past}, but {root} has no "
            "checkpoint to continue from; resuming would discard every logged row, so nothing was changed. Restore the "
            "checkpoints, or pass --overwrite to record the run again"
        )
    _check_same_data(run_dir, cfg)
    reference = ckpt.reference_path(run_dir)
    if reference.exists():
        ckpt.check_weights_file(reference)
    if last is None:
        return ResumePoint(cfg, None)
    return ResumePoint(cfg, last, ckpt.read_state(last), ckpt.read_optimizer_state(last))


def _check_same_data(run_dir: Path, cfg: RecordConfig) -> None:
    """The data files hold what they held when the run was recorded (config.json's fingerprints)."""
    from .data import FINGERPRINT_KEY, changed_data

    header = read_json(run_dir / schema.CONFIG)
    saved = (header.get("config") or {}).get(FINGERPRINT_KEY) if isinstance(header, dict) else None
    if not isinstance(saved, dict):  # recorded before fingerprints were kept: nothing to compare
        return
    changed = changed_data({k: v for k, v in saved.items() if isinstance(v, str)}, {"data": cfg.data, "eval_data": cfg.eval_data})
    if changed:
        raise ValueError(f"{changed[0]}; resuming would continue the run on other pairs, so nothing was changed. Restore "
                         f"the file, or record a new run (--overwrite, or a new --out)")


def check_weights_fit(point: ResumePoint, model) -> None:
    """The checkpoint's tensors fit ``model`` (the environment's policy)."""
    if point.checkpoint is not None:
        ckpt.check_weights(point.checkpoint, model)


def begin(run_dir: Path, point: ResumePoint, config: dict) -> None:
    """The first write of a resumed run (the caller holds the writer lock)."""
    RunWriter.note_resume(run_dir, config, from_step=point.start)
    ckpt.prune_checkpoints(Path(run_dir))


def restore(point: ResumePoint, model, optimizer, device) -> tuple[int, dict]:
    """Load the checkpoint into ``model``/``optimizer``: (first step to run, saved state)."""
    if point.checkpoint is None:
        return 0, {}
    ckpt.restore(point.checkpoint, point.optimizer_state, model, optimizer, device)
    return point.start, point.state
