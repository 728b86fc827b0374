"""One table row per run and per group: every metric of this package computed
from a run's steps, layers and evals tables, then aggregated across seeds.

Per group, a metric is the median over its runs (over the runs where it is
finite); counts of non-finite values are summed instead, so they are never
hidden; ``*_seed_sd`` columns give the spread across seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..runs import Run
from ..runs import schema
from .convergence import accuracy_stats, kl_to_optimum_stats, reward_kl_stats
from .finite import column, finite_median, last_finite
from .groups import split_pair
from .imbalance import cosine_stats, onset_step, ratio_stats
from .layers import LayerArrays, imbalance_carriers, layer_arrays, layer_attribution
from .likelihood import likelihood_displacement, pw_pl_stats
from .stability import seed_spread, stability

# Per-run metrics whose spread across seeds goes into the group summary.
SPREAD_METRICS = ("loss_final", "ratio_final", "kl_to_optimum_final", "true_reward_final")
# Per-run metrics compared between groups (those present in the table).
COMPARED_METRICS = (
    "ratio_median",
    "ratio_final",
    "mean_log_ratio",
    "dominated_frac",
    "onset_step",
    "cosine_median",
    "log_pw_over_pl_final",
    "chosen_logp_change",
    "chosen_logp_fall_frac",
    "loss_final",
    "kl_to_optimum_final",
    "true_reward_final",
    "kl_to_ref_final",
    "pref_accuracy_final",
    "train_pair_accuracy_final",
)


def _has(frame: pd.DataFrame, *names: str) -> bool:
    return not frame.empty and all(n in frame.columns for n in names)


def run_metrics(
    steps: pd.DataFrame,
    evals: pd.DataFrame | None = None,
    *,
    onset_threshold: float = 1.0,
    spike_k: float = 5.0,
    accuracy_level: float = 0.9,
) -> dict[str, float]:
    """Every scalar metric of one run; metrics whose columns are absent are left out."""
    out: dict[str, float] = {"steps": int(len(steps))}
    if steps.empty:
        return out
    out["last_step"] = last_finite(steps[schema.STEP]) if schema.STEP in steps.columns else float(len(steps) - 1)
    if schema.NONFINITE in steps.columns:
        out["nonfinite_steps"] = int(np.nansum(column(steps, schema.NONFINITE) != 0))
    if _has(steps, schema.GRAD_RATIO) or _has(steps, schema.GRAD_NORM_CHOSEN, schema.GRAD_NORM_REJECTED):
        out.update(ratio_stats(steps))
        onset = onset_step(steps, onset_threshold)
        out["onset_step"] = float("nan") if onset is None else float(onset)
    if _has(steps, schema.GRAD_COSINE) or _has(steps, schema.GRAD_DOT, schema.GRAD_NORM_CHOSEN, schema.GRAD_NORM_REJECTED):
        out.update(cosine_stats(steps))
    if _has(steps, schema.LOG_PW_OVER_PL):
        out.update(pw_pl_stats(steps))
    if _has(steps, schema.LOGPS_CHOSEN):
        chosen = likelihood_displacement(steps, schema.LOGPS_CHOSEN)
        out.update(chosen_logp_fall_frac=chosen["fall_frac"], chosen_logp_change=chosen["net_change"])
    if _has(steps, schema.LOGPS_REJECTED):
        out["rejected_logp_change"] = likelihood_displacement(steps, schema.LOGPS_REJECTED)["net_change"]
    if _has(steps, schema.LOSS):
        # The last logged loss, finite or not: a run whose loss went to inf ends at inf.
        loss = column(steps, schema.LOSS)
        out["loss_final"] = float(loss[-1])
        out["loss_nonfinite"] = int((~np.isfinite(loss)).sum())
    out.update(stability(steps, spike_k))
    if evals is not None and not evals.empty and schema.STEP in evals.columns:
        out.update(kl_to_optimum_stats(evals))
        out.update(reward_kl_stats(evals))
        out.update(accuracy_stats(evals, accuracy_level))
    return out


def _is_count(name: str) -> bool:
    return name.endswith("_nonfinite") or name == "nonfinite_steps"


def aggregate_runs(per_run: pd.DataFrame, group_column: str = "group") -> pd.DataFrame:
    """One row per group from a per-run metrics table (see module docstring)."""
    rows = []
    metric_columns = [c for c in per_run.columns if c not in (group_column, "run", "seed", "path") and pd.api.types.is_numeric_dtype(per_run[c])]
    for group, frame in per_run.groupby(group_column, sort=False):
        row: dict[str, object] = {group_column: group, "n_seeds": int(len(frame))}
        for name in metric_columns:
            row[name] = float(np.nansum(frame[name].to_numpy(dtype=float))) if _is_count(name) else finite_median(frame[name])
        if "onset_step" in frame.columns:
            row["onset_runs"] = int(np.isfinite(frame["onset_step"].to_numpy(dtype=float)).sum())
        for name in SPREAD_METRICS:
            if name in frame.columns:
                row[f"{name}_seed_sd"] = seed_spread(frame[name])["sd"]
        rows.append(row)
    return pd.DataFrame(rows)


def group_layer_attribution(arrays_by_run: Mapping[str, Sequence[LayerArrays]]) -> pd.DataFrame:
    """Per group and layer: the attribution columns averaged over the group's runs,
    and ``carrier`` marking the layers that carry 80 % of the imbalance."""
    frames = []
    for group, arrays in arrays_by_run.items():
        tables = [layer_attribution(a) for a in arrays]
        if not tables:
            continue
        order = list(dict.fromkeys(name for t in tables for name in t["layer"]))
        mean = pd.concat(tables).groupby("layer", sort=False).agg(
            {
                "chosen_share": "mean",
                "rejected_share": "mean",
                "share_diff": "mean",
                "imbalance": "mean",
                "median_log_ratio": "median",
                "n_nonfinite": "sum",
            }
        )
        mean = mean.reindex(order).reset_index()
        total = mean["imbalance"].sum(skipna=True)
        mean.insert(5, "imbalance_share", mean["imbalance"] / total if total != 0 else np.nan)
        carriers = set(imbalance_carriers(mean))
        mean["carrier"] = mean["layer"].isin(carriers)
        mean.insert(0, "group", group)
        mean.insert(1, "n_seeds", len(tables))
        frames.append(mean)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@dataclass
class GroupSummary:
    summary: pd.DataFrame    # one row per group
    per_run: pd.DataFrame    # one row per run
    layers: pd.DataFrame     # one row per (group, layer); empty without layer tables
    comparison: pd.DataFrame  # one row per (group vs baseline, metric); empty with one group


def summarize_groups(
    groups: Mapping[str, Sequence[Run]],
    *,
    baseline: str | None = None,
    onset_threshold: float = 1.0,
    spike_k: float = 5.0,
    accuracy_level: float = 0.9,
    layers_of: Callable[[Run], LayerArrays | None] | None = None,
    ci: str = "bootstrap",
) -> GroupSummary:
    """Metrics for every run, aggregated per group, the per-layer attribution per
    group and the comparison of each group with ``baseline`` (default: ``dpo`` when
    present, else the first group). ``layers_of`` returns a run's pivoted layer
    table (default ``run_layer_arrays``); pass a memoised one to share it with figures.
    ``ci``: the comparison's interval, "bootstrap" or "t" (see ``compare.py``)."""
    from .compare import compare_groups

    rows, arrays_by_group = [], {}
    for group, runs in groups.items():
        arrays_by_group[group] = []
        for run in runs:
            metrics = run_metrics(
                run.steps, run.evals, onset_threshold=onset_threshold, spike_k=spike_k, accuracy_level=accuracy_level
            )
            rows.append({"group": group, "run": run.name, "seed": run.config.get("seed"), "path": str(run.path), **metrics})
            arrays = (layers_of or run_layer_arrays)(run)
            if arrays is not None:
                arrays_by_group[group].append(arrays)
    per_run = pd.DataFrame(rows)
    summary = aggregate_runs(per_run)
    layers = group_layer_attribution(arrays_by_group)
    if not layers.empty:
        top = layers[layers["carrier"]].groupby("group", sort=False)["layer"].apply(lambda s: ", ".join(s.head(3)))
        summary["imbalance_layers"] = summary["group"].map(top).fillna("")
    # Which ratio each group's rho is (second group / first group): a DPO group's rejected/chosen
    # and a GRPO group's negative/positive are different quantities and are never compared.
    pairs = {group: split_pair(runs[0]) for group, runs in groups.items() if runs}
    ratio_of = lambda g: "{1}/{0}".format(*pairs.get(g, schema.DEFAULT_GROUPS))  # noqa: E731
    if not summary.empty:
        summary.insert(1, "ratio_of", summary["group"].map(ratio_of))
    if not layers.empty:  # chosen_share / rejected_share are the first / the second group's
        layers.insert(1, "ratio_of", layers["group"].map(ratio_of))
    names = list(groups)
    if baseline is None:
        baseline = "dpo" if "dpo" in names else (names[0] if names else None)
    comparable = [g for g in names if pairs.get(g) == pairs.get(baseline)]
    comparison = pd.DataFrame()
    if len(comparable) > 1:
        compared = per_run[per_run["group"].isin(comparable)]
        comparison = compare_groups(compared, [m for m in COMPARED_METRICS if m in per_run.columns], baseline=baseline, ci=ci)
    return GroupSummary(summary=summary, per_run=per_run, layers=layers, comparison=comparison)


def run_layer_arrays(run: Run) -> LayerArrays | None:
    """The run's layers table pivoted to arrays; None when it has no layer rows."""
    table = run.layers
    return layer_arrays(table) if _has(table, schema.STEP, schema.LAYER, schema.CHOSEN_SQ, schema.REJECTED_SQ) else None
