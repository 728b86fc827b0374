"""How every metric treats NaN and inf: left out of statistics, always counted.

A metric never averages a non-finite value away silently. Each statistic is
computed on the finite values and reported beside ``n_nonfinite``, the number
of values that were left out, so a run that blew up cannot look healthy.
Comparisons (``rho > 1``) keep ``+inf``/``-inf``, which order correctly, and
drop only NaN, which does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def as_float_array(values: Any) -> np.ndarray:
    """A 1-D float64 array from a Series, list or array (non-numbers become NaN)."""
    if isinstance(values, pd.Series):
        return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64).ravel()


def split_finite(values: Any) -> tuple[np.ndarray, int]:
    """The finite values, and how many values were NaN or +-inf."""
    x = as_float_array(values)
    mask = np.isfinite(x)
    return x[mask], int(x.size - mask.sum())


def column(frame: pd.DataFrame | None, name: str) -> np.ndarray | None:
    """Column ``name`` as float64, or None when the frame lacks it."""
    if frame is None or frame.empty or name not in frame.columns:
        return None
    return as_float_array(frame[name])


def finite_median(values: Any) -> float:
    x, _ = split_finite(values)
    return float(np.median(x)) if x.size else float("nan")


def last_finite(values: Any) -> float:
    """The last finite value (the 'final' value of a series), NaN if there is none."""
    x = as_float_array(values)
    idx = np.flatnonzero(np.isfinite(x))
    return float(x[idx[-1]]) if idx.size else float("nan")


def first_finite(values: Any) -> float:
    x = as_float_array(values)
    idx = np.flatnonzero(np.isfinite(x))
    return float(x[idx[0]]) if idx.size else float("nan")
