"""The comparison intervals do what they claim: coverage by simulation on known
distributions, agreement with scipy, the n < 2 and n < 5 rules, pairing by
seed, and Holm's adjustment.

Coverage tolerance: with R replicates the Monte-Carlo standard error of a
coverage near 0.95 is sqrt(0.95 * 0.05 / R) (0.0049 at R = 2000). The t
interval is exact for normal data, so its coverage must be within 0.015
(3 SE) of 0.95. The percentile bootstrap under-covers with small samples
and skewed data; at n = 30 per group it must lie in [0.925, 0.965] on normal
data and in [0.895, 0.965] on exponential data. A 90 % interval (coverage
0.886 and 0.863 there) fails both checks.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gradlens import analysis as A

REPLICATES = 2000


def _coverage(interval, draw, true_diff: float, replicates: int = REPLICATES) -> float:
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(replicates):
        a, b = draw(rng)
        _, low, high = interval(a, b, i)
        hits += low <= true_diff <= high
    return hits / replicates


@pytest.mark.parametrize("paired", [False, True])
def test_t_interval_covers_95_percent_on_normal_data(paired):
    n = 6 if paired else 8
    draw = (lambda rng: (rng.normal(1.0, 1.0, n), rng.normal(0.0, 2.0, n))) if not paired else (
        lambda rng: (lambda base: (base + rng.normal(0.5, 0.3, n), base))(rng.normal(0.0, 3.0, n))
    )
    true_diff = 0.5 if paired else 1.0
    coverage = _coverage(lambda a, b, i: A.t_diff_ci(a, b, paired=paired), draw, true_diff)
    assert abs(coverage - 0.95) < 0.015, coverage


@pytest.mark.parametrize(
    "distribution, lowest",
    [("normal", 0.925), ("exponential", 0.895)],  # skewed data: the percentile bootstrap is known to run low
)
def test_bootstrap_interval_covers_about_95_percent(distribution, lowest):
    n = 30
    if distribution == "normal":
        draw, true_diff = (lambda rng: (rng.normal(2.0, 1.0, n), rng.normal(0.0, 1.5, n))), 2.0
    else:  # skewed: means 2 and 1
        draw, true_diff = (lambda rng: (rng.exponential(2.0, n), rng.exponential(1.0, n))), 1.0
    coverage = _coverage(lambda a, b, i: A.bootstrap_diff_ci(a, b, n_boot=500, seed=i), draw, true_diff, 1000)
    # 1000 replicates: SE 0.0069 (measured: normal 0.942, exponential 0.917).
    assert lowest <= coverage <= 0.965, coverage
    narrower = _coverage(lambda a, b, i: A.bootstrap_diff_ci(a, b, n_boot=500, seed=i, level=0.90), draw, true_diff, 1000)
    assert narrower < lowest - 0.02, narrower  # the check above tells a 90 % interval (0.886, 0.863) from a 95 % one


def test_t_interval_equals_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 7), rng.normal(0.0, 2.0, 5)
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    r = A.diff_interval(a, b, ci="t")
    assert (r.ci_low, r.ci_high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert r.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-10)
    c = rng.normal(0.3, 1.0, 7)
    paired = stats.ttest_rel(c, a).confidence_interval(0.95)
    rp = A.diff_interval(c, a, ci="t", paired=True)
    assert (rp.ci_low, rp.ci_high) == pytest.approx((paired.low, paired.high), rel=1e-12)


def test_bootstrap_interval_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 12), rng.normal(0.0, 1.0, 10)
    ours = A.diff_interval(a, b, ci="bootstrap", n_boot=40000)
    ref = stats.bootstrap(
        (a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), paired=False, vectorized=True,
        n_resamples=40000, method="percentile", random_state=2,
    ).confidence_interval  # fmt: skip
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    # Both are Monte-Carlo estimates of the same quantiles: they agree to a few percent of the SE.
    assert ours.ci_low == pytest.approx(ref.low, abs=0.03 * se)
    assert ours.ci_high == pytest.approx(ref.high, abs=0.03 * se)
    d = a[:10] - b
    ours_p = A.diff_interval(a[:10], b, ci="bootstrap", paired=True, n_boot=40000)
    ref_p = stats.bootstrap((d,), np.mean, n_resamples=40000, method="percentile", random_state=3).confidence_interval
    assert (ours_p.ci_low, ours_p.ci_high) == pytest.approx((ref_p.low, ref_p.high), abs=0.03 * d.std(ddof=1) / math.sqrt(10))


def test_one_seed_gives_no_interval_and_says_why():
    for ci in A.CI_METHODS:
        r = A.diff_interval([-0.2658], [0.0], ci=ci)
        assert r.diff == pytest.approx(-0.2658)
        assert math.isnan(r.ci_low) and math.isnan(r.ci_high) and math.isnan(r.p_value)
        assert r.ci_note == "no interval: fewer than 2 seeds"
    rough = A.diff_interval([1.0, 1.2, 0.9], [0.0, 0.1, -0.1])
    assert rough.ci_note.startswith("rough") and np.isfinite(rough.ci_low)
    assert A.diff_interval(np.arange(5.0), np.arange(5.0) + 1).ci_note == ""


def test_compare_groups_pairs_by_seed_and_says_so():
    rng = np.random.default_rng(3)
    shared = rng.normal(0.0, 5.0, 6)  # large per-seed noise both groups share
    per_run = pd.DataFrame(
        {
            "group": ["dpo"] * 6 + ["balanced"] * 6,
            "seed": list(range(6)) + list(range(5, -1, -1)),  # same seeds, another order
            "m": np.r_[shared, shared[::-1] + 1.0 + rng.normal(0, 0.05, 6)],
        }
    )
    row = A.compare_groups(per_run, ["m"], baseline="dpo").iloc[0]
    assert row["paired"] and row["n_group"] == 6
    assert 0.8 < row["ci_low"] < 1.0 < row["ci_high"] < 1.2  # pairing removes the shared noise
    unpaired = A.compare_groups(per_run.assign(seed=list(range(12))), ["m"], baseline="dpo").iloc[0]
    assert not unpaired["paired"] and unpaired["ci_high"] - unpaired["ci_low"] > 5
    t_row = A.compare_groups(per_run, ["m"], baseline="dpo", ci="t").iloc[0]
    assert t_row["ci"] == "t" and 0.8 < t_row["ci_low"] < 1.0 < t_row["ci_high"] < 1.2


def test_holm_adjustment():
    # Hand-computed: sorted p 0.01, 0.02, 0.03, 0.5 -> 4*0.01, 3*0.02, max(2*0.03, .06), max(0.5, .06)
    adjusted = A.holm([0.03, 0.01, np.nan, 0.5, 0.02])
    np.testing.assert_allclose(adjusted, [0.06, 0.04, np.nan, 0.5, 0.06])
    per_run = pd.DataFrame({"group": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "x": [0, 1, 2, 5, 6, 7.5], "y": [1, 2, 3, 1, 2, 3.1]})
    table = A.compare_groups(per_run, ["x", "y"], baseline="a", ci="t")
    assert "p_holm" in table.columns and (table["p_holm"] >= table["p_value"]).all()
    np.testing.assert_allclose(table["p_holm"], A.holm(table["p_value"]))
