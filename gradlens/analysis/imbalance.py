"""Chosen/rejected gradient imbalance from a steps table: the ratio
rho = ||g_rejected|| / ||g_chosen||, how often rejected responses dominate
(rho > 1), when domination starts, and the cosine between the two gradients.

All functions take a steps DataFrame (columns as in ``gradlens.runs.format``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..runs import schema
from .finite import as_float_array, column, last_finite, split_finite


def _steps(frame: pd.DataFrame) -> np.ndarray:
    if schema.STEP in frame.columns:
        return as_float_array(frame[schema.STEP])
    return np.arange(len(frame), dtype=np.float64)


def ratio_series(steps: pd.DataFrame) -> np.ndarray:
    """rho per step: the logged ``grad/ratio``, else ``grad_norm/rejected / grad_norm/chosen``."""
    rho = column(steps, schema.GRAD_RATIO)
    if rho is not None:
        return rho
    chosen, rejected = column(steps, schema.GRAD_NORM_CHOSEN), column(steps, schema.GRAD_NORM_REJECTED)
    if chosen is None or rejected is None:
        raise ValueError(f"steps table has neither {schema.GRAD_RATIO!r} nor both {schema.GRAD_NORM_CHOSEN!r} and {schema.GRAD_NORM_REJECTED!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return rejected / chosen  # x/0 -> inf and 0/0 -> nan, both counted as non-finite later


def dominated_fraction(steps: pd.DataFrame, threshold: float = 1.0) -> float:
    """Fraction of steps with rho > threshold. NaN steps are left out; rho = inf counts as dominated."""
    rho = ratio_series(steps)
    known = rho[~np.isnan(rho)]
    return float(np.mean(known > threshold)) if known.size else float("nan")


def onset_step(steps: pd.DataFrame, threshold: float = 1.0, *, window: int = 1) -> int | None:
    """The first step after which rho stays above ``threshold`` until the end of the run.

    ``window > 1`` first takes a centred rolling median over that many steps, so
    single noisy dips do not reset the onset. NaN steps are ignored. Returns None
    when rho ends at or below the threshold.
    """
    rho, step = ratio_series(steps), _steps(steps)
    keep = ~np.isnan(rho)
    rho, step = rho[keep], step[keep]
    if rho.size == 0:
        return None
    if window > 1:
        rho = pd.Series(rho).rolling(window, center=True, min_periods=1).median().to_numpy()
    below = np.flatnonzero(~(rho > threshold))
    if below.size == 0:
        return int(step[0])
    if below[-1] == rho.size - 1:
        return None
    return int(step[below[-1] + 1])


def ratio_stats(steps: pd.DataFrame) -> dict[str, float]:
    """Median, quartiles, IQR, final value and time-average of log rho.

    Order statistics and the mean of log rho use finite, positive rho only;
    ``n_nonfinite`` counts the steps left out (rho NaN, inf, or 0).
    """
    rho = ratio_series(steps)
    finite, n_nonfinite = split_finite(rho)
    positive = finite[finite > 0]
    n_left_out = n_nonfinite + int(finite.size - positive.size)
    if positive.size:
        q25, median, q75 = np.quantile(positive, [0.25, 0.5, 0.75])
        mean_log = float(np.mean(np.log(positive)))
    else:
        q25 = median = q75 = mean_log = float("nan")
    return {
        "ratio_median": float(median),
        "ratio_q25": float(q25),
        "ratio_q75": float(q75),
        "ratio_iqr": float(q75 - q25),
        "ratio_final": last_finite(rho),
        "mean_log_ratio": mean_log,
        "dominated_frac": dominated_fraction(steps),
        "ratio_nonfinite": n_left_out,
    }


def cosine_series(steps: pd.DataFrame) -> np.ndarray:
    """cos(g_chosen, g_rejected) per step: logged, else from the dot product and the two norms."""
    cos = column(steps, schema.GRAD_COSINE)
    if cos is not None:
        return cos
    dot, chosen, rejected = column(steps, schema.GRAD_DOT), column(steps, schema.GRAD_NORM_CHOSEN), column(steps, schema.GRAD_NORM_REJECTED)
    if dot is None or chosen is None or rejected is None:
        raise ValueError(f"steps table has no {schema.GRAD_COSINE!r} column and not enough to derive it")
    with np.errstate(divide="ignore", invalid="ignore"):
        return dot / (chosen * rejected)


def cosine_stats(steps: pd.DataFrame) -> dict[str, float]:
    """Median, mean, quartiles and final cosine, and the fraction of steps where it is negative
    (the chosen and rejected terms pull against each other)."""
    cos = cosine_series(steps)
    finite, n_nonfinite = split_finite(cos)
    if finite.size:
        q25, median, q75 = np.quantile(finite, [0.25, 0.5, 0.75])
        mean, negative = float(np.mean(finite)), float(np.mean(finite < 0))
    else:
        q25 = median = q75 = mean = negative = float("nan")
    return {
        "cosine_median": float(median),
        "cosine_q25": float(q25),
        "cosine_q75": float(q75),
        "cosine_mean": mean,
        "cosine_final": last_finite(cos),
        "cosine_negative_frac": negative,
        "cosine_nonfinite": n_nonfinite,
    }
