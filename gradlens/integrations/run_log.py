"""Turn finished trainer steps into the gradlens run directory and TensorBoard.

Rows use the column names of ``gradlens.runs.format`` (the contract read by
``gradlens plot``). Every optimizer step gets a steps.csv row; on steps that were
not recorded (``record_every > 1``) the gradient columns are NaN.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..losses import PreferenceLossOutput
from ..gradients import Capture
from ..runs import RunWriter, schema, prepare_run_dir
from ..runs.tensorboard import PREFERENCE_LAYOUT, REWEIGHTING_LAYOUT, TensorBoardLogger
from .stepper import StepResult

GRADIENT_COLUMNS = (schema.GRAD_NORM, schema.GRAD_NORM_CHOSEN, schema.GRAD_NORM_REJECTED, schema.GRAD_DOT, schema.GRAD_COSINE, schema.GRAD_RATIO)
# Same order as `gradlens record`, so runs from both compare column for column.
PREFERENCE_COLUMNS = schema.PREFERENCE_STEP_COLUMNS
GROUPS_COLUMNS = (schema.STEP, schema.LOSS, schema.LR, *GRADIENT_COLUMNS, schema.NONFINITE)

TRAINER_LAYOUT = PREFERENCE_LAYOUT + REWEIGHTING_LAYOUT


def gradient_columns(cap: Optional[Capture], pair: tuple[str, str], extra_groups: Sequence[str] = ()) -> dict[str, float]:
    """The split's columns for ``pair`` = (chosen-like group, rejected-like group); NaN without a capture."""
    extra = {f"{schema.GRAD_NORM}/{g}": math.nan for g in extra_groups}
    if cap is None:
        return {**{c: math.nan for c in GRADIENT_COLUMNS}, **extra}
    a, b = pair
    for name in (a, b, *extra_groups):
        if name not in cap.groups.names:
            raise ValueError(f"the batch's row groups are {list(cap.groups.names)}; gradlens logs group {name!r}")
    gc, gr = cap.norm(a), cap.norm(b)
    out = {
        schema.GRAD_NORM: cap.norm(), schema.GRAD_NORM_CHOSEN: gc, schema.GRAD_NORM_REJECTED: gr,
        schema.GRAD_DOT: cap.dot(a, b), schema.GRAD_COSINE: cap.cosine(a, b), schema.GRAD_RATIO: cap.ratio(b, a),
    }  # fmt: skip
    out.update({f"{schema.GRAD_NORM}/{g}": cap.norm(g) for g in extra_groups})
    return out


def step_loss(result: StepResult) -> float:
    """The loss the step's gradient is of: the sum of the micro-batches' GA-scaled losses."""
    losses = [m.loss for m in result.micro_batches if m.loss is not None]
    return float(sum(loss.double().sum() for loss in losses)) if losses else math.nan


def preference_metrics(result: StepResult) -> dict[str, float]:
    """Pair-weighted means over the step's micro-batches (notes ``pairs``, ``chosen_logps``, ``rejected_logps``)."""
    outputs: list[PreferenceLossOutput] = [m.notes["pairs"] for m in result.micro_batches if "pairs" in m.notes]
    if not outputs:
        return {}
    cat = lambda name: torch.cat([getattr(o, name).reshape(-1).double() for o in outputs])  # noqa: E731
    chosen, rejected = cat("chosen_rewards"), cat("rejected_rewards")
    logps_c = torch.cat([m.notes["chosen_logps"].double() for m in result.micro_batches if "pairs" in m.notes])
    logps_r = torch.cat([m.notes["rejected_logps"].double() for m in result.micro_batches if "pairs" in m.notes])
    return {
        schema.REWARDS_CHOSEN: chosen.mean().item(),
        schema.REWARDS_REJECTED: rejected.mean().item(),
        schema.REWARDS_MARGINS: (chosen - rejected).mean().item(),
        schema.REWARDS_ACCURACIES: (chosen > rejected).double().mean().item(),
        schema.LOGPS_CHOSEN: logps_c.mean().item(),
        schema.LOGPS_REJECTED: logps_r.mean().item(),
        schema.LOG_PW_OVER_PL: cat("log_pw_over_pl").mean().item(),
        schema.SIGMOID_NEG_U: cat("sigmoid_neg_u").mean().item(),
        schema.WEIGHT_CHOSEN: cat("weight_chosen").mean().item(),
        schema.WEIGHT_REJECTED: cat("weight_rejected").mean().item(),
    }


class RunLog:
    """One run directory (+ TensorBoard) fed by finished trainer steps. Only rank 0 creates one."""

    def __init__(
        self,
        path: str | os.PathLike,
        config: Mapping[str, Any],
        *,
        columns: Sequence[str],
        pair: tuple[str, str] = ("chosen", "rejected"),
        extra_groups: Sequence[str] = (),
        layers_every: int = 1,
        tensorboard: bool = True,
        overwrite: bool = False,
        resume_at: int | None = None,
    ):
        """``resume_at=s``: continue the run directory of a trainer resumed at step s (rows >= s are dropped)."""
        if layers_every < 1:
            raise ValueError(f"layers_every must be >= 1, got {layers_every}")
        resume = resume_at is not None and (Path(path) / schema.CONFIG).is_file()
        self.path = prepare_run_dir(path, resume=resume, overwrite=overwrite and not resume)
        self.writer = RunWriter(self.path, config, kind=schema.KIND_PREFERENCE, resume=resume)
        if resume:
            self.writer.truncate_after(resume_at - 1)
            (self.path / schema.SUMMARY).unlink(missing_ok=True)
        purge = resume_at if resume else None
        self.tb = TensorBoardLogger(self.path, TRAINER_LAYOUT, purge_step=purge) if tensorboard else None
        self.columns = list(columns) + [f"{schema.GRAD_NORM}/{g}" for g in extra_groups]
        self.pair, self.extra_groups, self.layers_every = pair, tuple(extra_groups), layers_every
        self.steps_logged = 0
        self.nonfinite_steps = 0
        self.unattributed: dict[str, float] = {}
        self.last_row: dict[str, Any] = {}
        self._t0 = time.perf_counter()

    def write_step(self, result: StepResult, *, lr: float, metrics: Mapping[str, float] = ()) -> dict[str, Any]:
        cap = result.capture
        row: dict[str, Any] = {schema.STEP: result.step, schema.LOSS: step_loss(result), schema.LR: lr, **dict(metrics)}
        row.update(gradient_columns(cap, self.pair, self.extra_groups))
        finite = [row[schema.LOSS], *(row[c] for c in GRADIENT_COLUMNS[:3] if cap is not None)]
        row[schema.NONFINITE] = int(not all(math.isfinite(v) for v in finite))
        row = {c: row.get(c, math.nan) for c in self.columns}
        self.writer.log_step(row)
        if self.tb is not None:
            self.tb.scalars(result.step, row)
        if cap is not None:
            self.unattributed.update(cap.unattributed)
            if result.step % self.layers_every == 0:
                layers = cap.layer_table(*self.pair)
                self.writer.log_layers(result.step, layers)
                if self.tb is not None:
                    self.tb.layer_ratios(result.step, layers)
        self.steps_logged += 1
        self.nonfinite_steps += row[schema.NONFINITE]
        self.last_row = row
        return row

    def finish(self, *, status: str = "complete", steps: int | None = None, message: str = "") -> None:
        self.writer.write_summary({
            "status": status,
            "message": message,
            "steps": steps,
            "steps_logged": self.steps_logged,
            "nonfinite_steps": self.nonfinite_steps,
            "unattributed_parameters": sorted(self.unattributed),
            "wall_time_s": time.perf_counter() - self._t0,
            "final": self.last_row,
        })  # fmt: skip
        self.close()

    def close(self) -> None:
        self.writer.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
