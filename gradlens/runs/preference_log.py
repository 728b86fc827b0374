"""The one writer of preference run directories.

``gradlens record`` and the trainer integrations (``GradlensCallback``,
``GradlensDPOTrainer``) both write through ``PreferenceRunLog``: the same
tables, the same TensorBoard tags and dashboard, the same ``summary.json`` keys
(``schema.SUMMARY_KEYS``). Callers hand it finished rows named by ``schema``;
it knows nothing about models, trainers or the recorder.

Counts in the summary (``steps_logged``, ``nonfinite_steps``) are read from
steps.csv itself, so a resumed run counts the rows it kept as well as the new ones.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import schema
from .run_dir import RunWriter
from .tables import CsvTable, check_header, read_table
from .tensorboard import ADVANTAGE_LAYOUT, EVAL_LAYOUT, PREFERENCE_LAYOUT, REWEIGHTING_LAYOUT, TensorBoardLogger, split_layout


class PreferenceRunLog:
    """steps/layers/evals (and rows) tables, TensorBoard and summary.json of one preference run.

    ``path`` must already be prepared (``prepare_run_dir``). ``resume_at=s``
    continues an existing directory: rows with step >= s are dropped first and
    TensorBoard hides the events it logs again. ``columns`` fixes steps.csv's
    header; a row's missing columns are written as NaN. ``tensorboard_step_offset=1``
    puts step s at TensorBoard step s + 1: the Trainer's global step (updates done), for
    runs whose TensorBoard curves sit beside a Trainer's own ``report_to`` curves.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: Mapping[str, Any],
        *,
        columns: Sequence[str] = schema.PREFERENCE_STEP_COLUMNS,
        resume_at: int | None = None,
        tensorboard: bool = True,
        evals: bool = False,
        per_row: bool = False,
        tensorboard_step_offset: int = 0,
    ):
        self.path = Path(path)
        self.tb_offset = tensorboard_step_offset
        resume = resume_at is not None
        self.columns = tuple(columns)
        if resume:  # before the first write: tables of an older gradlens cannot be continued
            check_header(self.path / schema.STEPS, self.columns)
            check_header(self.path / schema.LAYERS, schema.LAYER_COLUMNS)
        self.writer = RunWriter(self.path, config, kind=schema.KIND_PREFERENCE, resume=resume)
        self.rows = CsvTable(self.path / schema.ROWS, schema.ROW_COLUMNS) if per_row else None
        self.steps_logged = self.nonfinite_steps = 0
        if resume:
            self.writer.truncate_after(resume_at - 1)
            if self.rows is not None:
                self.rows.keep_steps_upto(resume_at - 1)
            (self.path / schema.SUMMARY).unlink(missing_ok=True)
            self._count_kept_rows()
        # The evaluation charts appear for the metrics the first evaluation row holds; runs of other
        # groups than chosen/rejected get charts titled with their groups, shown for the tags they log.
        groups = tuple(config.get(schema.CONFIG_GROUPS) or schema.DEFAULT_GROUPS)
        if groups == schema.DEFAULT_GROUPS:
            layout = PREFERENCE_LAYOUT + REWEIGHTING_LAYOUT
        else:
            layout = split_layout(*groups) + (ADVANTAGE_LAYOUT if groups == schema.ADVANTAGE_GROUPS else [])
        optional = EVAL_LAYOUT if evals else []
        self.tb = TensorBoardLogger(self.path, layout, purge_step=None if resume_at is None else resume_at + self.tb_offset, optional_layout=optional) if tensorboard else None
        self.unattributed: set[str] = set()
        self.last_row: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}

    def _count_kept_rows(self) -> None:
        kept = read_table(self.path / schema.STEPS, quiet=True)
        self.steps_logged = len(kept)
        if schema.NONFINITE in kept:
            self.nonfinite_steps = int(kept[schema.NONFINITE].fillna(0).sum())

    def log_step(
        self,
        row: Mapping[str, Any],
        *,
        layers: Mapping[str, Mapping[str, float]] | None = None,
        unattributed: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Append one steps.csv row (+ its layer table, when given); returns the row as written."""
        step = row[schema.STEP]
        row = {c: row.get(c, math.nan) for c in self.columns}
        self.writer.log_step(row)
        if self.tb is not None:
            self.tb.scalars(step + self.tb_offset, row)
        if layers is not None:
            self.writer.log_layers(step, layers)
            if self.tb is not None:
                self.tb.layer_ratios(step + self.tb_offset, layers)
        self.unattributed.update(unattributed)
        self.steps_logged += 1
        self.nonfinite_steps += int(row.get(schema.NONFINITE) or 0)
        self.last_row = row
        return row

    def log_rows(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """rows.csv: each row's own gradient norm (``schema.ROW_COLUMNS``), and one histogram per side."""
        if self.rows is None:
            raise RuntimeError("this run log was opened without per_row=True")
        self.rows.append_many(rows)
        if self.tb is not None:
            for side in sorted({r[schema.ROW_SIDE] for r in rows}):
                norms = np.asarray([r[schema.ROW_GRAD_NORM] for r in rows if r[schema.ROW_SIDE] == side], dtype=np.float64)
                self.tb.writer.add_histogram(f"per_row/grad_norm_{side}", norms, step + self.tb_offset)

    def log_eval(self, row: Mapping[str, Any]) -> None:
        self.writer.log_eval(row)
        if self.tb is not None:
            self.tb.scalars(row[schema.STEP] + self.tb_offset, row)
            self.tb.flush()
        self.last_eval = dict(row)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def finish(
        self,
        *,
        status: str = schema.STATUS_COMPLETE,
        message: str = "",
        steps: int | None,
        wall_time_s: float,
        stopped_at_step: int | None = None,
        skipped_steps: int = 0,
        resumed_from_step: int | None = None,
    ) -> dict[str, Any]:
        """Write summary.json (every key of ``schema.SUMMARY_KEYS``) and close the run log."""
        summary = {
            schema.SUMMARY_STATUS: status,
            schema.SUMMARY_MESSAGE: message,
            schema.SUMMARY_STEPS: steps,
            schema.SUMMARY_STEPS_LOGGED: self.steps_logged,
            schema.SUMMARY_STOPPED_AT: stopped_at_step,
            schema.SUMMARY_NONFINITE_STEPS: self.nonfinite_steps,
            schema.SUMMARY_SKIPPED_STEPS: skipped_steps,
            schema.SUMMARY_UNATTRIBUTED: sorted(self.unattributed),
            schema.SUMMARY_WALL_TIME: wall_time_s,
            schema.SUMMARY_RESUMED_FROM: resumed_from_step,
            schema.SUMMARY_FINAL: self.last_row,
            schema.SUMMARY_FINAL_EVAL: self.last_eval,
        }
        self.writer.write_summary(summary)
        self.close()
        return summary

    def close(self) -> None:
        self.writer.close()
        if self.rows is not None:
            self.rows.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
