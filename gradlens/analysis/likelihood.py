"""What happens to the probabilities themselves: the trajectory of p_w/p_l
(logged as the mean log(p_w/p_l) = mean(l_w - l_l)) and likelihood
displacement, i.e. the chosen log-probability falling while the margin grows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..runs import schema
from .finite import as_float_array, column, first_finite, last_finite


def pw_pl_trajectory(steps: pd.DataFrame) -> pd.DataFrame:
    """Columns ``step``, ``log_pw_over_pl`` and ``pw_over_pl``.

    The ratio itself is exp of the log and overflows to inf for confident
    policies; use the log column for statistics.
    """
    log_ratio = column(steps, schema.LOG_PW_OVER_PL)
    if log_ratio is None:
        raise ValueError(f"steps table has no {schema.LOG_PW_OVER_PL!r} column")
    with np.errstate(over="ignore"):
        ratio = np.exp(log_ratio)
    return pd.DataFrame({schema.STEP: as_float_array(steps[schema.STEP]), schema.LOG_PW_OVER_PL: log_ratio, "pw_over_pl": ratio})


def pw_pl_stats(steps: pd.DataFrame) -> dict[str, float]:
    """First and last finite mean log(p_w/p_l), their difference, and the non-finite count."""
    log_ratio = column(steps, schema.LOG_PW_OVER_PL)
    if log_ratio is None:
        raise ValueError(f"steps table has no {schema.LOG_PW_OVER_PL!r} column")
    initial, final = first_finite(log_ratio), last_finite(log_ratio)
    return {
        "log_pw_over_pl_initial": initial,
        "log_pw_over_pl_final": final,
        "log_pw_over_pl_change": final - initial,
        "log_pw_over_pl_nonfinite": int((~np.isfinite(log_ratio)).sum()),
    }


def likelihood_displacement(steps: pd.DataFrame, column_name: str = schema.LOGPS_CHOSEN) -> dict[str, float]:
    """How a log-probability moves: the fraction of steps in which it falls and its net change.

    A step "falls" when logps(t) < logps(t-1). Differences touching a non-finite
    value are left out and counted. With ``logps/chosen`` (the default) a high
    fall fraction and a negative net change are likelihood displacement.
    """
    values = column(steps, column_name)
    if values is None:
        raise ValueError(f"steps table has no {column_name!r} column")
    diffs = np.diff(values)
    finite = diffs[np.isfinite(diffs)]
    return {
        "fall_frac": float(np.mean(finite < 0)) if finite.size else float("nan"),
        "net_change": last_finite(values) - first_finite(values),
        "nonfinite": int(diffs.size - finite.size),
    }
