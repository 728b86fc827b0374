"""Training stability: spikes in a series (jumps larger than k median absolute
deviations of its first differences) and the spread of a metric across seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..runs import schema
from .finite import as_float_array, column, split_finite


def spikes(values, k: float = 5.0) -> np.ndarray:
    """Indices t (into ``values``) where the jump values[t] - values[t-1] is a spike.

    A jump d is a spike when |d - median(d)| > k * MAD, MAD = median(|d - median(d)|),
    over the finite first differences (the raw MAD, no 1.4826 factor). A jump
    into or out of a non-finite value is not a spike; count those separately.
    Deviations under 1e-9 of the series' largest magnitude are rounding, never
    spikes (a straight line has MAD 0 up to rounding).
    """
    x = as_float_array(values)
    d = np.diff(x)
    finite = np.isfinite(d)
    if not finite.any():
        return np.array([], dtype=int)
    centre = np.median(d[finite])
    mad = np.median(np.abs(d[finite] - centre))
    rounding = 1e-9 * np.max(np.abs(x[np.isfinite(x)]))
    with np.errstate(invalid="ignore"):
        is_spike = finite & (np.abs(d - centre) > max(k * mad, rounding))
    return np.flatnonzero(is_spike) + 1


def stability(steps: pd.DataFrame, k: float = 5.0) -> dict[str, float]:
    """Spike counts for the loss and the total grad norm, and their non-finite counts."""
    out: dict[str, float] = {}
    for name, key in ((schema.LOSS, "loss"), (schema.GRAD_NORM, "grad_norm")):
        values = column(steps, name)
        if values is None:
            continue
        out[f"{key}_spikes"] = int(spikes(values, k).size)
        out[f"{key}_nonfinite"] = int((~np.isfinite(values)).sum())
    return out


def seed_spread(values) -> dict[str, float]:
    """Spread of one per-seed metric: sample SD (ddof=1), IQR, range, and how many seeds were finite."""
    x, n_nonfinite = split_finite(values)
    if x.size == 0:
        return {"sd": float("nan"), "iqr": float("nan"), "range": float("nan"), "n": 0, "n_nonfinite": n_nonfinite}
    q25, q75 = np.quantile(x, [0.25, 0.75])
    return {
        "sd": float(np.std(x, ddof=1)) if x.size > 1 else float("nan"),
        "iqr": float(q75 - q25),
        "range": float(x.max() - x.min()),
        "n": int(x.size),
        "n_nonfinite": n_nonfinite,
    }
