"""Comparison between groups of runs (e.g. Balanced-DPO against DPO): the
difference in each per-run metric's mean, a confidence interval over seeds, a
p-value and its Holm adjustment across the table.

Two intervals, chosen with ``ci``:

* ``"bootstrap"``: percentile bootstrap. Unpaired, it resamples seeds within
  each group; paired, it resamples the per-seed differences.
* ``"t"``: Student t. Unpaired, Welch's interval (unequal variances,
  Welch-Satterthwaite degrees of freedom); paired, the one-sample t interval
  of the per-seed differences.

Runs are paired by seed when both groups hold the same seeds, as the
experiments do: seed s of one method saw the same data, order and
initialisation as seed s of the other, so the per-seed difference removes
that shared noise.

What an interval cannot say, the table says: with fewer than two values on a
side (or two pairs), or values without any spread (every seed the same), there
is no spread to estimate, so the interval and p are NaN and ``ci_note`` gives
the reason; a bootstrap p-value is never below 1/(B+1); with fewer than ``ROUGH_BELOW`` it is marked
rough (both intervals under-cover with so few seeds).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .finite import as_float_array, split_finite

CI_METHODS = ("bootstrap", "t")
ROUGH_BELOW = 5
NOTE_TOO_FEW = "no interval: fewer than 2 seeds"
NOTE_ROUGH = f"rough: fewer than {ROUGH_BELOW} seeds"
NOTE_NO_SPREAD = "no interval: the seeds show no spread (identical values), so it is undefined"


def _no_spread(a: np.ndarray, b: np.ndarray | None) -> bool:
    """Every value (every paired difference) the same: the spread, and so the interval, is undefined."""
    return bool(np.ptp(a) == 0 and (b is None or np.ptp(b) == 0))


def _bootstrap_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)


def _bootstrap_p(boot: np.ndarray) -> float:
    """Two-sided p-value of "difference = 0" read off the bootstrap distribution
    (the smallest 1 - level whose percentile interval excludes 0).

    Counted as (1 + count) / (B + 1), so it is never below 1/(B+1): B resamples
    cannot show a p-value smaller than that, and 0 would claim certainty."""
    n = boot.size
    below, above = int(np.sum(boot <= 0.0)), int(np.sum(boot >= 0.0))
    return min(1.0, 2.0 * (1 + min(below, above)) / (n + 1))


def _bootstrap(a: np.ndarray, b: np.ndarray | None, n_boot: int, level: float, seed: int) -> tuple[float, float, float]:
    """(low, high, p) of mean(a) - mean(b); ``b`` None: ``a`` holds paired differences."""
    rng = np.random.default_rng(seed)
    boot = _bootstrap_means(a, n_boot, rng)
    if b is not None:
        boot = boot - _bootstrap_means(b, n_boot, rng)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(low), float(high), _bootstrap_p(boot)


def _t(a: np.ndarray, b: np.ndarray | None, level: float) -> tuple[float, float, float]:
    """(low, high, p): one-sample t on differences (b None), else Welch's t."""
    from scipy import stats

    if b is None:
        diff, se, df = a.mean(), a.std(ddof=1) / math.sqrt(a.size), a.size - 1.0
    else:
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        diff, se = a.mean() - b.mean(), math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if va + vb > 0 else a.size + b.size - 2.0
    if not se > 0.0:  # spread lost to rounding: as undefined as no spread
        return math.nan, math.nan, math.nan
    q = stats.t.ppf(0.5 + level / 2.0, df)
    p = 2.0 * stats.t.sf(abs(diff) / se, df)
    return float(diff - q * se), float(diff + q * se), float(p)


@dataclass(frozen=True)
class DiffInterval:
    """mean(group) - mean(baseline) with its interval; NaN bounds when it cannot be estimated."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_group: int
    n_baseline: int
    paired: bool
    ci_note: str


def diff_interval(
    group: Sequence[float],
    baseline: Sequence[float],
    *,
    paired: bool = False,
    ci: str = "bootstrap",
    level: float = 0.95,
    n_boot: int = 4000,
    seed: int = 0,
) -> DiffInterval:
    """The difference of means and its ``ci`` interval (see the module docstring).

    ``paired``: ``group[i]`` and ``baseline[i]`` belong together (same seed); pairs
    with a non-finite side are dropped. Unpaired, non-finite values are dropped
    per side (count them with ``split_finite``).
    """
    if ci not in CI_METHODS:
        raise ValueError(f"ci {ci!r}: choose from {', '.join(CI_METHODS)}")
    if paired:
        x, y = as_float_array(group), as_float_array(baseline)
        if x.size != y.size:
            raise ValueError(f"paired comparison needs equal lengths, got {x.size} and {y.size}")
        keep = np.isfinite(x) & np.isfinite(y)
        a, b = x[keep] - y[keep], None
        n_a = n_b = int(a.size)
        diff = float(a.mean()) if a.size else math.nan
    else:
        a, _ = split_finite(group)
        b, _ = split_finite(baseline)
        n_a, n_b = int(a.size), int(b.size)
        diff = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    n = min(n_a, n_b)
    if n < 2:
        note = NOTE_TOO_FEW if n == 1 else "no interval: no finite values"
        return DiffInterval(diff, math.nan, math.nan, math.nan, n_a, n_b, paired, note)
    if _no_spread(a, b):
        return DiffInterval(diff, math.nan, math.nan, math.nan, n_a, n_b, paired, NOTE_NO_SPREAD)
    low, high, p = _bootstrap(a, b, n_boot, level, seed) if ci == "bootstrap" else _t(a, b, level)
    return DiffInterval(diff, low, high, p, n_a, n_b, paired, NOTE_ROUGH if n < ROUGH_BELOW else "")


def bootstrap_diff_ci(
    group: Sequence[float], baseline: Sequence[float], *, n_boot: int = 4000, level: float = 0.95, seed: int = 0, paired: bool = False
) -> tuple[float, float, float]:
    """mean(group) - mean(baseline) and its percentile bootstrap CI (NaN bounds with fewer than 2 seeds)."""
    r = diff_interval(group, baseline, paired=paired, ci="bootstrap", level=level, n_boot=n_boot, seed=seed)
    return r.diff, r.ci_low, r.ci_high


def t_diff_ci(group: Sequence[float], baseline: Sequence[float], *, level: float = 0.95, paired: bool = False) -> tuple[float, float, float]:
    """mean(group) - mean(baseline) and its t interval (Welch's, or paired); NaN bounds with fewer than 2 seeds."""
    r = diff_interval(group, baseline, paired=paired, ci="t", level=level)
    return r.diff, r.ci_low, r.ci_high


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (controls the family-wise error rate); NaN stays NaN
    and is not counted in the family."""
    p = as_float_array(p_values)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _paired_by_seed(this: pd.DataFrame, base: pd.DataFrame, seed_column: str) -> bool:
    """Pair when both groups hold the same set of distinct seeds."""
    if seed_column not in this.columns:
        return False
    s_this, s_base = this[seed_column].dropna().tolist(), base[seed_column].dropna().tolist()
    return (
        len(s_this) == len(this) and len(s_base) == len(base) and len(set(s_this)) == len(s_this)
        and len(set(s_base)) == len(s_base) and set(s_this) == set(s_base)
    )  # fmt: skip


def compare_groups(
    per_run: pd.DataFrame,
    metrics: Sequence[str],
    *,
    baseline: str | None = None,
    group_column: str = "group",
    seed_column: str = "seed",
    ci: str = "bootstrap",
    n_boot: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (group != baseline, metric): the baseline and group means, their
    difference, the ``ci`` interval, whether runs were paired by seed, the seed
    counts used, the non-finite values dropped, the p-value and its Holm
    adjustment over every row of the table, and ``ci_note`` (no interval / rough).

    ``per_run`` has one row per run, a ``group`` column, optionally a ``seed``
    column, and one column per metric. The baseline defaults to the first group.
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
        paired = _paired_by_seed(this, base, seed_column)
        if paired:
            this = this.set_index(seed_column).loc[base[seed_column].tolist()].reset_index()
        for metric in metrics:
            if metric not in per_run.columns:
                continue
            a, bad_a = split_finite(this[metric])
            b, bad_b = split_finite(base[metric])
            r = diff_interval(this[metric], base[metric], paired=paired, ci=ci, level=level, n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "group": group,
                    "baseline": baseline,
                    "metric": metric,
                    "baseline_mean": float(b.mean()) if b.size else math.nan,
                    "group_mean": float(a.mean()) if a.size else math.nan,
                    **{k: v for k, v in asdict(r).items() if k != "ci_note"},
                    "nonfinite_dropped": bad_a + bad_b,
                    "ci": ci,
                    "ci_note": r.ci_note,
                }
            )
    table = pd.DataFrame(rows)
    if not table.empty:
        table.insert(table.columns.get_loc("p_value") + 1, "p_holm", holm(table["p_value"]))
    return table
