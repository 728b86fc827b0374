"""Comparison between groups of runs (e.g. Balanced-DPO against DPO): the
difference in each per-run metric's mean, with a percentile bootstrap
confidence interval that resamples seeds within each group."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .finite import split_finite


def bootstrap_diff_ci(
    group: Sequence[float], baseline: Sequence[float], *, n_boot: int = 4000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """mean(group) - mean(baseline) and its percentile bootstrap CI.

    Each resample draws seeds with replacement within each group. Non-finite
    values are dropped first (count them with ``split_finite``); an empty side
    gives NaN. With one seed per side the interval collapses to the point.
    """
    a, _ = split_finite(group)
    b, _ = split_finite(baseline)
    if a.size == 0 or b.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot_a = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    boot_b = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot_a - boot_b, [alpha, 1.0 - alpha])
    return float(a.mean() - b.mean()), float(low), float(high)


def compare_groups(
    per_run: pd.DataFrame,
    metrics: Sequence[str],
    *,
    baseline: str | None = None,
    group_column: str = "group",
    n_boot: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (group != baseline, metric): the baseline and group means, their
    difference, the bootstrap CI, the seed counts used and the non-finite values dropped.

    ``per_run`` has one row per run, a ``group`` column and one column per metric.
    The baseline defaults to the first group.
    """
    groups = list(dict.fromkeys(per_run[group_column]))
    if not groups:
        return pd.DataFrame()
    baseline = groups[0] if baseline is None else baseline
    if baseline not in groups:
        raise ValueError(f"baseline group {baseline!r} not among the groups {groups}")
    base = per_run[per_run[group_column] == baseline]
    rows = []
    for group in groups:
        if group == baseline:
            continue
        this = per_run[per_run[group_column] == group]
        for metric in metrics:
            if metric not in per_run.columns:
                continue
            a, bad_a = split_finite(this[metric])
            b, bad_b = split_finite(base[metric])
            diff, low, high = bootstrap_diff_ci(a, b, n_boot=n_boot, level=level, seed=seed)
            rows.append(
                {
                    "group": group,
                    "baseline": baseline,
                    "metric": metric,
                    "baseline_mean": float(b.mean()) if b.size else float("nan"),
                    "group_mean": float(a.mean()) if a.size else float("nan"),
                    "diff": diff,
                    "ci_low": low,
                    "ci_high": high,
                    "n_group": int(a.size),
                    "n_baseline": int(b.size),
                    "nonfinite_dropped": bad_a + bad_b,
                }
            )
    return pd.DataFrame(rows)
