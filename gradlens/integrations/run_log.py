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
from typing import Any, Mapping, Optional, Sequence

import torch

from ..advantages import advantage_metrics
from ..gradients import Capture
from ..losses import PreferenceLossOutput
from ..pairs import CHOSEN, REJECTED
from ..runs import RunLock, prepare_run_dir, schema
from ..runs.preference_log import PreferenceRunLog
from .stepper import StepResult

GRADIENT_COLUMNS = schema.GRADIENT_COLUMNS
# Same order as `gradlens record`, so runs from both compare column for column.
PREFERENCE_COLUMNS = schema.PREFERENCE_STEP_COLUMNS
GROUPS_COLUMNS = schema.GROUPS_STEP_COLUMNS


def gradient_columns(
    cap: Optional[Capture], pair: tuple[str, str], extra_groups: Sequence[str] = (), *, empty: Sequence[str] = ()
) -> dict[str, float]:
    """The split's columns for ``pair`` = (chosen-like group, rejected-like group); NaN without a capture.
    Groups in ``empty`` had no rows in the step: their gradient is exactly zero."""
    extra = {schema.group_norm_column(g): math.nan for g in extra_groups}
    names = schema.split_columns(pair)  # grad_norm/chosen, grad_norm/rejected for DPO's pair
    if cap is None:
        return {**{c: math.nan for c in names}, **extra}
    a, b = pair
    for name in (a, b, *extra_groups):
        if name not in cap.groups.names:
            raise ValueError(f"the batch's row groups are {list(cap.groups.names)}; gradlens logs group {name!r}")
    norm = lambda g: 0.0 if g in empty else cap.norm(g)  # noqa: E731
    na, nb = norm(a), norm(b)
    dot = 0.0 if a in empty or b in empty else cap.dot(a, b)
    cosine = dot / (na * nb) if na * nb > 0 else math.nan
    ratio = nb / na if na > 0 else (math.nan if nb == 0 or math.isnan(nb) else math.inf)
    out = dict(zip(names, (cap.norm(), na, nb, dot, cosine, ratio)))
    out.update({schema.group_norm_column(g): norm(g) for g in extra_groups})
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


def advantage_step_metrics(result: StepResult) -> dict[str, float]:
    """Counts and mean advantage per sign over the step's micro-batches (notes ``advantages``, ``prompt_ids``)."""
    notes = [m.notes for m in result.micro_batches if "advantages" in m.notes]
    prompts = [n["prompt_ids"] for n in notes if "prompt_ids" in n]
    out = advantage_metrics([n["advantages"] for n in notes], prompts if len(prompts) == len(notes) else [])
    rewards = [n["rewards"].double().reshape(-1) for n in notes if "rewards" in n]
    if rewards:
        out[schema.REWARD_MEAN] = torch.cat(rewards).mean().item()
    return out


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
        evals: bool = False,
    ):
        """``resume_at=s``: continue the run directory of a trainer resumed at step s (rows >= s are dropped)."""
        if layers_every < 1:
            raise ValueError(f"layers_every must be >= 1, got {layers_every}")
        resume = resume_at is not None and (os.path.isfile(os.path.join(path, schema.CONFIG)))
        self._lock = RunLock(path).acquire()  # one writer per run directory; released by close() or the OS
        try:
            self.path = prepare_run_dir(path, resume=resume, overwrite=overwrite and not resume)
            columns = list(columns) + [schema.group_norm_column(g) for g in extra_groups]
            self.out = PreferenceRunLog(
                self.path, config, columns=columns, resume_at=resume_at if resume else None, tensorboard=tensorboard, evals=evals
            )
        except BaseException:
            self._lock.release()
            raise
        self.resumed_from = resume_at if resume else None
        self.pair, self.extra_groups, self.layers_every = pair, tuple(extra_groups), layers_every
        self._t0 = time.perf_counter()

    def write_step(self, result: StepResult, *, lr: float, metrics: Mapping[str, float] = ()) -> dict[str, Any]:
        cap = result.capture
        row: dict[str, Any] = {schema.STEP: result.step, schema.LOSS: step_loss(result), schema.LR: lr}
        row.update({schema.group_count_column(g): float(n) for g, n in result.group_rows.items()})  # this process's rows
        row.update(metrics)
        empty = [g for g, n in result.group_rows.items() if n == 0]
        row.update(gradient_columns(cap, self.pair, self.extra_groups, empty=empty))
        finite = [row[schema.LOSS], *(row[c] for c in schema.split_columns(self.pair)[:3] if cap is not None)]
        row[schema.NONFINITE] = int(not all(math.isfinite(v) for v in finite))
        layers = None
        if cap is not None and result.step % self.layers_every == 0:
            a, b = self.pair  # layer_table's keys follow the group names; layers.csv's columns are the pair's (first, second)
            zero_a, zero_b = a in empty, b in empty
            layers = {layer: {schema.CHOSEN_SQ: 0.0 if zero_a else v[f"{a}_sq"], schema.REJECTED_SQ: 0.0 if zero_b else v[f"{b}_sq"],
                              schema.DOT: 0.0 if zero_a or zero_b else v["dot"]}
                      for layer, v in cap.layer_table(a, b).items()}  # fmt: skip
        return self.out.log_step(row, layers=layers, unattributed=cap.unattributed if cap is not None else ())

    def log_eval(self, row: Mapping[str, Any]) -> None:
        self.out.log_eval(row)

    def finish(
        self, *, status: str = schema.STATUS_COMPLETE, steps: int | None = None, message: str = "", stopped_at_step: int | None = None
    ) -> None:
        self.out.finish(
            status=status, message=message, steps=steps, wall_time_s=time.perf_counter() - self._t0,
            resumed_from_step=self.resumed_from, stopped_at_step=stopped_at_step,
        )  # fmt: skip
        self._lock.release()  # the run is written: another writer may continue it

    def close(self) -> None:
        self.out.close()
        self._lock.release()
