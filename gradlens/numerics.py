"""Small numeric fits shared by the producers (langevin) and the readers (analysis, plot).

numpy only; imports nothing from gradlens, so every package reaches it downwards.
"""

from __future__ import annotations

import math

import numpy as np


def loglog_slope(x, y) -> float:
    """Least-squares slope of log y against log x over the finite, positive points (NaN if < 2 distinct x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2 or np.unique(x[ok]).size < 2:
        return math.nan
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])
