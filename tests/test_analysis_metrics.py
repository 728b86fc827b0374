"""gradlens.analysis on synthetic DataFrames with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradlens import analysis as A
from gradlens.runs import Run
from gradlens.runs import schema


def steps_frame(rho=None, **columns) -> pd.DataFrame:
    n = len(rho) if rho is not None else len(next(iter(columns.values())))
    frame = pd.DataFrame({schema.STEP: np.arange(n)})
    if rho is not None:
        frame[schema.GRAD_RATIO] = np.asarray(rho, dtype=float)
    for name, values in columns.items():
        frame[name.replace("__", "/")] = np.asarray(values, dtype=float)
    return frame


# ------------------------------------------------------------------ the ratio


def test_constant_ratio_three():
    stats = A.ratio_stats(steps_frame(np.full(50, 3.0)))
    assert stats["ratio_median"] == pytest.approx(3.0)
    assert stats["ratio_iqr"] == pytest.approx(0.0)
    assert stats["ratio_final"] == pytest.approx(3.0)
    assert stats["mean_log_ratio"] == pytest.approx(math.log(3.0))
    assert stats["dominated_frac"] == 1.0
    assert stats["ratio_nonfinite"] == 0
    assert A.onset_step(steps_frame(np.full(50, 3.0))) == 0


def test_ratio_from_norms_when_not_logged():
    frame = steps_frame(grad_norm__chosen=[1.0, 2.0, 0.0], grad_norm__rejected=[0.5, 4.0, 1.0])
    rho = A.ratio_series(frame)
    assert rho[:2] == pytest.approx([0.5, 2.0]) and np.isinf(rho[2])
    stats = A.ratio_stats(frame)
    assert stats["ratio_nonfinite"] == 1  # the inf is counted, not averaged
    assert stats["dominated_frac"] == pytest.approx(2 / 3)  # ...but inf > 1 still counts as dominated


def test_ratio_statistics_known_quartiles():
    rho = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    stats = A.ratio_stats(steps_frame(rho))
    assert stats["ratio_median"] == 3.0
    assert stats["ratio_q25"] == 2.0 and stats["ratio_q75"] == 4.0 and stats["ratio_iqr"] == 2.0
    assert stats["dominated_frac"] == pytest.approx(0.8)
    assert stats["mean_log_ratio"] == pytest.approx(np.mean(np.log(rho)))


def test_nonfinite_ratios_are_counted_not_averaged():
    stats = A.ratio_stats(steps_frame([3.0, 3.0, np.nan, np.inf, 3.0, np.nan]))
    assert stats["ratio_median"] == 3.0 and stats["mean_log_ratio"] == pytest.approx(math.log(3))
    assert stats["ratio_nonfinite"] == 3
    assert stats["dominated_frac"] == 1.0  # over the 4 non-NaN steps; inf is dominated
    assert stats["ratio_final"] == 3.0  # the last finite value
    all_bad = A.ratio_stats(steps_frame([np.nan, np.nan]))
    assert math.isnan(all_bad["ratio_median"]) and all_bad["ratio_nonfinite"] == 2


def test_planted_onset_is_found():
    rho = np.full(100, 0.5)
    rho[10:13] = 2.0  # an early excursion above 1 that does not last
    rho[40:] = 2.0
    assert A.onset_step(steps_frame(rho)) == 40
    assert A.onset_step(steps_frame(rho), threshold=3.0) is None


def test_onset_with_a_dip_and_with_smoothing():
    rho = np.full(100, 0.5)
    rho[40:] = 2.0
    rho[70] = 0.9  # one noisy dip after the onset
    assert A.onset_step(steps_frame(rho)) == 71
    assert A.onset_step(steps_frame(rho), window=5) == 40


def test_onset_ignores_nan_and_needs_the_end_above():
    rho = np.r_[np.full(10, 0.5), np.full(10, 2.0), [np.nan]]
    assert A.onset_step(steps_frame(rho)) == 10
    assert A.onset_step(steps_frame(np.r_[np.full(10, 2.0), [0.5]])) is None


def test_onset_uses_logged_step_numbers():
    frame = pd.DataFrame({schema.STEP: [100, 200, 300, 400], schema.GRAD_RATIO: [0.5, 0.7, 1.5, 2.0]})
    assert A.onset_step(frame) == 300


def test_cosine_stats_logged_and_derived():
    logged = A.cosine_stats(steps_frame(grad__cosine=np.full(10, -0.5)))
    assert logged["cosine_median"] == -0.5 and logged["cosine_negative_frac"] == 1.0
    derived = A.cosine_stats(steps_frame(grad__dot=[1.0, -2.0], grad_norm__chosen=[1.0, 1.0], grad_norm__rejected=[2.0, 2.0]))
    assert derived["cosine_mean"] == pytest.approx(-0.25)
    assert derived["cosine_negative_frac"] == 0.5 and derived["cosine_final"] == -1.0


# ------------------------------------------------------------------ layers


def layers_frame(n_steps=10, chosen=(0.25, 0.75), rejected=(3.0, 1.0), names=("wte", "ln_f")) -> pd.DataFrame:
    rows = []
    for t in range(n_steps):
        for name, c, r in zip(names, chosen, rejected):
            rows.append({schema.STEP: t, schema.LAYER: name, schema.CHOSEN_SQ: c, schema.REJECTED_SQ: r, schema.DOT: 0.0})
    return pd.DataFrame(rows)


def test_layer_attribution_known_shares():
    table = A.layer_attribution(layers_frame()).set_index("layer")
    assert list(table.index) == ["wte", "ln_f"]  # model order kept
    assert table["chosen_share"].tolist() == pytest.approx([0.25, 0.75])
    assert table["rejected_share"].tolist() == pytest.approx([0.75, 0.25])
    assert table["share_diff"].tolist() == pytest.approx([0.5, -0.5])
    # total ||g_c||^2 = 1, ||g_r||^2 = 4: contributions (3 - 0.25)/5 and (1 - 0.75)/5
    assert table["imbalance"].tolist() == pytest.approx([0.55, 0.05])
    assert table["imbalance"].sum() == pytest.approx((4 - 1) / (4 + 1))
    assert table["imbalance_share"].tolist() == pytest.approx([0.55 / 0.6, 0.05 / 0.6])
    assert table.loc["wte", "median_log_ratio"] == pytest.approx(0.5 * math.log(3.0 / 0.25))
    assert A.imbalance_carriers(table.reset_index(), coverage=0.8) == ["wte"]
    assert A.imbalance_carriers(table.reset_index(), coverage=0.95) == ["wte", "ln_f"]


def test_layer_attribution_counts_nonfinite_entries():
    frame = layers_frame()
    frame.loc[0, schema.CHOSEN_SQ] = np.nan
    frame.loc[1, schema.REJECTED_SQ] = np.inf
    table = A.layer_attribution(frame)
    assert table["n_nonfinite"].sum() == 2
    assert table["chosen_share"].notna().all()


def test_layer_arrays_and_heatmap_bins():
    arrays = A.layer_arrays(layers_frame(n_steps=4))
    assert arrays.chosen_sq.shape == (4, 2) and arrays.names == ["wte", "ln_f"]
    binned = A.binned_log_ratio(arrays, np.array([0.0, 2.0, 4.0, 6.0]))
    assert binned.shape == (2, 3)
    assert binned[0, 0] == pytest.approx(0.5 * math.log(12.0))
    assert np.isnan(binned[0, 2])  # an empty bin


# ------------------------------------------------------------ probabilities


def test_pw_pl_trajectory_and_stats():
    frame = steps_frame(log_pw_over_pl=[0.0, 1.0, 2.0, 800.0])
    trajectory = A.pw_pl_trajectory(frame)
    assert trajectory["pw_over_pl"].iloc[:3].tolist() == pytest.approx([1.0, math.e, math.e**2])
    assert np.isinf(trajectory["pw_over_pl"].iloc[3])  # exp overflows; the log column stays usable
    stats = A.pw_pl_stats(frame)
    assert stats["log_pw_over_pl_change"] == 800.0 and stats["log_pw_over_pl_nonfinite"] == 0


def test_likelihood_displacement():
    result = A.likelihood_displacement(steps_frame(logps__chosen=[0.0, -1.0, -2.0, -1.5]))
    assert result["fall_frac"] == pytest.approx(2 / 3)
    assert result["net_change"] == pytest.approx(-1.5)
    with_nan = A.likelihood_displacement(steps_frame(logps__chosen=[0.0, np.nan, -2.0, -3.0]))
    assert with_nan["nonfinite"] == 2 and with_nan["fall_frac"] == 1.0 and with_nan["net_change"] == -3.0


# -------------------------------------------------------------- stability


def test_spikes_find_a_planted_jump():
    rng = np.random.default_rng(0)
    x = np.linspace(1.0, 0.5, 200) + rng.normal(0, 0.01, 200)
    x[120:] += 1.0  # a level shift: one jump
    assert A.spikes(x, k=5.0).tolist() == [120]
    x[60] = 5.0  # a one-step outlier: a jump in and a jump out
    assert A.spikes(x, k=5.0).tolist() == [60, 61, 120]
    assert A.spikes(np.linspace(0, 1, 50)).size == 0  # a straight line has no spikes


def test_stability_counts_and_seed_spread():
    frame = steps_frame(loss=np.r_[np.linspace(0.7, 0.5, 50), [np.nan]], grad_norm=np.r_[np.ones(50), [np.inf]])
    result = A.stability(frame)
    assert result["loss_nonfinite"] == 1 and result["grad_norm_nonfinite"] == 1
    assert result["loss_spikes"] == 0
    spread = A.seed_spread([1.0, 2.0, 3.0, np.nan])
    assert spread["sd"] == pytest.approx(1.0) and spread["range"] == 2.0 and spread["n"] == 3 and spread["n_nonfinite"] == 1


# ------------------------------------------------------------ convergence


def test_convergence_metrics():
    evals = pd.DataFrame(
        {
            schema.STEP: [0, 10, 20, 30],
            "eval/pref_accuracy": [0.5, 0.7, 0.92, 0.95],
            "eval/kl_to_optimum": [2.0, 1.0, 0.5, 0.6],
            "eval/true_reward": [0.0, 0.5, 0.4, 0.9],
            "eval/kl_to_ref": [0.0, 1.0, 2.0, 3.0],
        }
    )
    assert A.steps_to_level(evals, 0.9) == 20
    assert A.steps_to_level(evals, 0.99) is None
    kl = A.kl_to_optimum_stats(evals)
    assert kl["kl_to_optimum_final"] == 0.6 and kl["kl_to_optimum_min"] == 0.5 and kl["kl_to_optimum_initial"] == 2.0
    frontier = A.reward_kl_frontier(evals)
    assert frontier.loc[frontier["on_frontier"], schema.STEP].tolist() == [0, 10, 30]  # step 20 is dominated
    reward = A.reward_kl_stats(evals)
    assert reward["true_reward_final"] == 0.9 and reward["kl_to_ref_final"] == 3.0
    assert reward["reward_gain_per_kl"] == pytest.approx(0.3)
    assert A.kl_to_optimum_stats(evals.drop(columns="eval/kl_to_optimum")) == {}


# ------------------------------------------------------------ comparison


def test_bootstrap_ci_covers_a_known_difference():
    rng = np.random.default_rng(1)
    group, baseline = rng.normal(2.0, 0.5, 20), rng.normal(0.0, 0.5, 20)
    diff, low, high = A.bootstrap_diff_ci(group, baseline)
    assert low < 2.0 < high and low > 0.0
    assert diff == pytest.approx(group.mean() - baseline.mean())
    same = A.bootstrap_diff_ci(rng.normal(0, 1, 20), rng.normal(0, 1, 20))
    assert same[1] < 0.0 < same[2]


def test_bootstrap_ignores_nonfinite_and_handles_empty():
    # The NaN is dropped; what is left has no spread, so the difference is known but its interval is
    # undefined (NaN, marked in the tables), not a zero-width interval that would claim certainty.
    diff, low, high = A.bootstrap_diff_ci([1.0, np.nan, 1.0], [0.0, 0.0])
    assert diff == 1.0 and math.isnan(low) and math.isnan(high)
    diff, low, high = A.bootstrap_diff_ci([1.0, np.nan, 2.0], [0.0, 0.0])
    assert diff == 1.5 and 1.0 <= low < high <= 2.0
    assert all(math.isnan(v) for v in A.bootstrap_diff_ci([np.nan], [1.0]))


def test_compare_groups_table():
    per_run = pd.DataFrame(
        {"group": ["dpo"] * 3 + ["balanced"] * 3, "ratio_final": [3.0, 3.1, 2.9, 1.0, 1.1, np.nan], "loss_final": [0.5] * 6}
    )
    table = A.compare_groups(per_run, ["ratio_final", "loss_final", "absent"], baseline="dpo")
    assert table["metric"].tolist() == ["ratio_final", "loss_final"]
    row = table.iloc[0]
    assert row["group"] == "balanced" and row["diff"] == pytest.approx(1.05 - 3.0)
    assert row["n_group"] == 2 and row["nonfinite_dropped"] == 1
    with pytest.raises(ValueError, match="baseline"):
        A.compare_groups(per_run, ["loss_final"], baseline="ipo")


# ------------------------------------------------- seeds, groups, summary


def test_row_quantiles_match_numpy():
    rng = np.random.default_rng(2)
    matrix = rng.normal(size=(200, 5))
    matrix[rng.random(matrix.shape) < 0.2] = np.nan
    matrix[3] = np.nan
    matrix[4, 1] = np.inf
    ours = A.row_quantiles(matrix, [0.25, 0.5, 0.75])
    clean = np.where(np.isfinite(matrix), matrix, np.nan)
    with pytest.warns(RuntimeWarning):
        expected = np.nanquantile(clean, [0.25, 0.5, 0.75], axis=1)
    np.testing.assert_allclose(ours, expected, equal_nan=True)


def test_seed_band_aligns_runs_on_steps():
    a = pd.DataFrame({schema.STEP: [0, 1, 2], "x": [1.0, 2.0, 3.0]})
    b = pd.DataFrame({schema.STEP: [0, 1], "x": [3.0, 4.0]})  # a killed run: fewer steps
    band = A.seed_band([a, b], "x")
    assert band[schema.STEP].tolist() == [0, 1, 2]
    assert band["median"].tolist() == [2.0, 3.0, 3.0]
    assert band["n"].tolist() == [2, 2, 1]


def fake_run(name: str, **config) -> Run:
    return Run(path=Path(name), kind=schema.KIND_PREFERENCE, config=config, versions={})


def test_group_runs_by_loss_and_dotted_keys():
    runs = [
        fake_run("a", loss="dpo", seed=0, optim={"name": "adam"}),
        fake_run("b", loss="balanced", seed=0, optim={"name": "sgd"}),
        fake_run("c", loss="dpo", seed=1, optim={"name": "adam"}),
    ]
    by_loss = A.group_runs(runs)
    assert list(by_loss) == ["balanced", "dpo"] and [r.name for r in by_loss["dpo"]] == ["a", "c"]
    by_optim = A.group_runs(runs, "optim.name")
    assert list(by_optim) == ["optim.name=adam", "optim.name=sgd"]
    assert A.config_value({"a.b": 1, "a": {"b": 2}}, "a.b") == 1  # a literal dotted key wins
    with pytest.raises(ValueError, match="no run has config key 'lr'.*loss"):
        A.group_runs(runs, "lr")


def test_run_metrics_and_aggregation():
    assert A.run_metrics(pd.DataFrame()) == {"steps": 0}
    frames = {
        "dpo": [steps_frame(np.full(20, 3.0), loss=np.full(20, 0.5)), steps_frame(np.full(20, 5.0), loss=np.full(20, 0.7))],
        "balanced": [steps_frame(np.r_[np.full(19, 1.0), [np.nan]], loss=np.full(20, 0.6))],
    }
    rows = [{"group": g, **A.run_metrics(f)} for g, fs in frames.items() for f in fs]
    summary = A.aggregate_runs(pd.DataFrame(rows)).set_index("group")
    assert summary.loc["dpo", "n_seeds"] == 2
    assert summary.loc["dpo", "ratio_median"] == pytest.approx(4.0)  # median over seeds of per-seed medians
    assert summary.loc["dpo", "loss_final_seed_sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary.loc["balanced", "ratio_nonfinite"] == 1  # counts are summed, never hidden
    assert summary.loc["balanced", "onset_runs"] == 0
