"""Metrics on run tables (pandas DataFrames): gradient imbalance, per-layer
attribution, likelihood displacement, stability, convergence, and comparisons
between groups of runs with bootstrap intervals over seeds.

Reads runs only; never imports training code. NaN and inf are never averaged
away: statistics use finite values and report how many were left out.

    from gradlens.runs import load_run
    from gradlens import analysis
    run = load_run("runs/dpo-seed0")
    analysis.ratio_stats(run.steps)          # median, IQR, final, mean log rho, ...
    analysis.onset_step(run.steps, 1.0)      # first step after which rho stays > 1
    analysis.layer_attribution(run.layers)   # which layers carry the imbalance
"""

from .compare import CI_METHODS, DiffInterval, bootstrap_diff_ci, compare_groups, diff_interval, holm, t_diff_ci
from .convergence import accuracy_stats, kl_to_optimum_stats, loglog_slope, reward_kl_frontier, reward_kl_stats, steps_to_level
from .finite import split_finite
from .groups import Grouping, config_value, describe_differences, differing_settings, group_label, group_runs, split_by_settings
from .imbalance import cosine_series, cosine_stats, dominated_fraction, onset_step, ratio_series, ratio_stats
from .layers import LayerArrays, binned_log_ratio, imbalance_carriers, layer_arrays, layer_attribution
from .likelihood import likelihood_displacement, pw_pl_stats, pw_pl_trajectory
from .seeds import row_quantiles, seed_band, seed_matrix
from .stability import seed_spread, spikes, stability
from .summary import GroupSummary, aggregate_runs, run_metrics, summarize_groups

__all__ = [
    "CI_METHODS",
    "DiffInterval",
    "GroupSummary",
    "Grouping",
    "LayerArrays",
    "accuracy_stats",
    "loglog_slope",
    "aggregate_runs",
    "binned_log_ratio",
    "bootstrap_diff_ci",
    "compare_groups",
    "config_value",
    "cosine_series",
    "cosine_stats",
    "describe_differences",
    "diff_interval",
    "differing_settings",
    "dominated_fraction",
    "group_label",
    "group_runs",
    "holm",
    "imbalance_carriers",
    "kl_to_optimum_stats",
    "layer_arrays",
    "layer_attribution",
    "likelihood_displacement",
    "onset_step",
    "pw_pl_stats",
    "pw_pl_trajectory",
    "ratio_series",
    "ratio_stats",
    "reward_kl_frontier",
    "reward_kl_stats",
    "row_quantiles",
    "run_metrics",
    "seed_band",
    "seed_matrix",
    "seed_spread",
    "spikes",
    "split_by_settings",
    "split_finite",
    "stability",
    "steps_to_level",
    "summarize_groups",
    "t_diff_ci",
]
