"""Aggregation across seeds at every step: line up the runs of a group on their
step numbers and take the median and quartiles per step.

Quantiles are computed with one sort of the (steps x seeds) matrix instead of
``np.nanquantile(axis=1)``, which loops in Python over 10^5 rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..runs import schema
from .finite import as_float_array


def seed_matrix(frames: Sequence[pd.DataFrame], column_name: str, step_column: str = schema.STEP) -> tuple[np.ndarray, np.ndarray]:
    """(steps, matrix): the union of step numbers and a (steps x runs) matrix of
    ``column_name``; NaN where a run has no row for a step or lacks the column."""
    per_run = []
    for frame in frames:
        if frame is None or frame.empty or column_name not in frame.columns:
            per_run.append((np.array([]), np.array([])))
            continue
        per_run.append((as_float_array(frame[step_column]), as_float_array(frame[column_name])))
    first = per_run[0][0] if per_run else np.array([])
    if all(s.size == first.size and np.array_equal(s, first) for s, _ in per_run):
        # Fast path: every seed logged the same steps (the usual case).
        return first, np.column_stack([v for _, v in per_run]) if per_run else np.empty((0, 0))
    steps = np.unique(np.concatenate([s for s, _ in per_run]))
    matrix = np.full((steps.size, len(per_run)), np.nan)
    for j, (s, v) in enumerate(per_run):
        if s.size:
            matrix[np.searchsorted(steps, s), j] = v
    return steps, matrix


def row_quantiles(matrix: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles of each row over its finite entries (linear interpolation, numpy's default).

    Returns (len(qs), rows); a row with no finite entry gives NaN.
    """
    clean = np.where(np.isfinite(matrix), matrix, np.nan)
    ordered = np.sort(clean, axis=1)  # NaN sorts last
    count = np.sum(~np.isnan(clean), axis=1)
    rows = np.arange(matrix.shape[0])
    out = np.full((len(qs), matrix.shape[0]), np.nan)
    has = count > 0
    for i, q in enumerate(qs):
        position = q * np.maximum(count - 1, 0)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, np.maximum(count - 1, 0))
        frac = position - low
        values = ordered[rows, low] * (1 - frac) + ordered[rows, high] * frac
        out[i] = np.where(has, values, np.nan)
    return out


def seed_band(frames: Sequence[pd.DataFrame], column_name: str) -> pd.DataFrame:
    """Per step: the median, 25th and 75th percentiles across runs, and how many runs had a finite value."""
    steps, matrix = seed_matrix(frames, column_name)
    q25, median, q75 = row_quantiles(matrix, [0.25, 0.5, 0.75])
    return pd.DataFrame({schema.STEP: steps, "median": median, "q25": q25, "q75": q75, "n": np.isfinite(matrix).sum(axis=1)})
