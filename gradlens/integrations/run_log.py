"""Turn finished trainer steps into rows of the gradlens run directory.

The rows go to ``gradlens.runs.preference_log.PreferenceRunLog``, the same writer
``gradlens record`` uses, under the names of ``gradlens.runs.schema``. Every
optimizer step gets a steps.csv row; on steps that were not recorded
(``record_every > 1``) the gradient columns are NaN. ``trainer_logs`` is the same
row as the Trainer's own log stream sees it.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping, Sequence

import torch

from ..advantages import advantage_metrics
from ..pairs import CHOSEN, REJECTED
from ..runs import check_continuable_by, lock_run_dir, release_run_dir, schema
from ..runs.preference_log import PreferenceRunLog
from ..runs.step_row import layer_rows, pair_columns, step_row
from .stepper import StepResult

GRADIENT_COLUMNS = schema.GRADIENT_COLUMNS
# Same order as `gradlens record`, so runs from both compare column for column.
PREFERENCE_COLUMNS = schema.PREFERENCE_STEP_COLUMNS
GROUPS_COLUMNS = schema.GROUPS_STEP_COLUMNS


def step_loss(result: StepResult) -> float:
    """The loss the step's gradient is of: the sum of the micro-batches' GA-scaled losses."""
    losses = [m.loss for m in result.micro_batches if m.loss is not None]
    return float(sum(loss.double().sum() for loss in losses)) if losses else math.nan


def preference_metrics(result: StepResult) -> dict[str, float]:
    """Pair-weighted means over the step's micro-batches (notes ``pairs``, ``chosen_logps``, ``rejected_logps``)."""
    noted = [m.notes for m in result.micro_batches if "pairs" in m.notes]
    if not noted:
        return {}
    chosen_logps = torch.cat([n["chosen_logps"].reshape(-1) for n in noted])
    rejected_logps = torch.cat([n["rejected_logps"].reshape(-1) for n in noted])
    return pair_columns([n["pairs"] for n in noted], chosen_logps, rejected_logps)


def advantage_step_metrics(result: StepResult) -> dict[str, float]:
    """Counts and mean advantage per sign over the step's micro-batches (notes ``advantages``, ``prompt_ids``)."""
    notes = [m.notes for m in result.micro_batches if "advantages" in m.notes]
    prompts = [n["prompt_ids"] for n in notes if "prompt_ids" in n]
    return advantage_metrics([n["advantages"] for n in notes], prompts if len(prompts) == len(notes) else [])


def score_metrics(result: StepResult) -> dict[str, float]:
    """A reward model's scores of the chosen and rejected sides (notes ``scores_chosen``, ``scores_rejected``)."""
    notes = [m.notes for m in result.micro_batches if "scores_chosen" in m.notes]
    if not notes:
        return {}
    chosen = torch.cat([n["scores_chosen"].double().reshape(-1) for n in notes])
    rejected = torch.cat([n["scores_rejected"].double().reshape(-1) for n in notes])
    return {
        schema.REWARDS_CHOSEN: chosen.mean().item(),
        schema.REWARDS_REJECTED: rejected.mean().item(),
        schema.REWARDS_MARGINS: (chosen - rejected).mean().item(),
        schema.REWARDS_ACCURACIES: (chosen > rejected).double().mean().item(),
    }


def step_metrics(result: StepResult) -> dict[str, float]:
    """The step row's metrics from what its micro-batches noted: preference pairs, advantages, scores."""
    return {**preference_metrics(result), **advantage_step_metrics(result), **score_metrics(result)}


def trainer_logs(row: Mapping[str, Any], *, recorded: bool = True) -> dict[str, float]:
    """A steps.csv row under the names of the Trainer's log stream (``schema.TRAINER_NAMES``: ``lr`` is
    ``learning_rate`` there). On a step that was not recorded, the gradient columns are left out: they
    are NaN because nothing was measured, not because a gradient was non-finite."""
    split = set(GRADIENT_COLUMNS) | {c for c in row if c.startswith(schema.GRAD_NORM + "/")}
    return {
        schema.TRAINER_NAMES.get(c, c): float(v)
        for c, v in row.items()
        if c != schema.STEP and (recorded or c not in split)
    }


class RunLog:
    """One run directory (+ TensorBoard) fed by finished trainer steps. Only rank 0 creates one."""

    def __init__(
        self,
        path: str | os.PathLike,
        config: Mapping[str, Any],
        *,
        columns: Sequence[str],
        pair: tuple[str, str] = (CHOSEN, REJECTED),
        extra_groups: Sequence[str] = (),
        layers_every: int = 1,
        tensorboard: bool = True,
        overwrite: bool = False,
        resume_at: int | None = None,
    ):
        """``resume_at=s``: continue the run directory of a trainer resumed at step s (rows >= s are dropped)."""
        if layers_every < 1:
            raise ValueError(f"layers_every must be >= 1, got {layers_every}")
        resume = resume_at is not None and (os.path.isfile(os.path.join(path, schema.CONFIG)))
        if resume:  # before the lock, and before any row is cut: only this integration's own runs
            check_continuable_by(path, env=config.get("env"), loss=config.get("loss"))
        # One writer per run directory; released by finish(), close() or the OS.
        self._lock, self.path = lock_run_dir(path, resume=resume, overwrite=overwrite and not resume)
        try:
            columns = list(columns) + [schema.group_norm_column(g) for g in extra_groups]
            # TensorBoard at the Trainer's global step (updates done: steps.csv's step + 1), so gradlens's
            # curves line up with the Trainer's own report_to curves in the same TensorBoard.
            self.out = PreferenceRunLog(self.path, config, columns=columns, resume_at=resume_at if resume else None,
                                        tensorboard=tensorboard, tensorboard_step_offset=1)  # fmt: skip
        except BaseException:
            release_run_dir(self._lock)
            raise
        self.resumed_from = resume_at if resume else None
        self.pair, self.extra_groups, self.layers_every = pair, tuple(extra_groups), layers_every
        self._t0 = time.perf_counter()

    def write_step(self, result: StepResult, *, lr: float, metrics: Mapping[str, float] = ()) -> dict[str, Any]:
        cap = result.capture
        # Rows of each group in the step (this process's), then the trainer's metrics (gathered where it gathers).
        counts = {schema.group_count_column(g): float(n) for g, n in result.group_rows.items()}
        empty = [g for g, n in result.group_rows.items() if n == 0]  # exactly zero gradient, whatever the rounding
        row = step_row(
            result.step, loss=step_loss(result), lr=lr, pairs={**counts, **metrics}, capture=cap, pair=self.pair,
            extra_groups=self.extra_groups, empty=empty,
        )  # fmt: skip
        layers = layer_rows(cap, self.pair, empty=empty) if cap is not None and result.step % self.layers_every == 0 else None
        return self.out.log_step(row, layers=layers, unattributed=cap.unattributed if cap is not None else ())

    def finish(self, *, status: str = schema.STATUS_COMPLETE, steps: int | None = None, message: str = "") -> None:
        self.out.finish(
            status=status, message=message, steps=steps, wall_time_s=time.perf_counter() - self._t0, resumed_from_step=self.resumed_from
        )
        self._lock.release()  # the run is written: another writer may continue it

    def close(self) -> None:
        self.out.close()
        self._lock.release()
