"""Figures and the summary table for preference runs (DPO, Balanced-DPO, AdaDPO) and for the
other runs split into two named groups (GRPO's positive/negative advantage, KTO's
desirable/undesirable).

Registers the plotter for run kind "preference". Every figure shows one line
per group (the median over its seeds) in that group's colour (the same in every
figure), with the interquartile band and the seeds as faint lines when the group
has two or more seeds; the first of a run's two split groups (chosen) is solid and the
second (rejected) dashed, and the labels name the runs' own groups
(``analysis.groups.split_pair``); each caption says what is drawn. A figure whose
columns no run has is skipped with a note.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..analysis.convergence import KL_TO_OPTIMUM, KL_TO_REF, OOD_MASS, TRUE_REWARD
from ..analysis.groups import split_pair
from ..analysis.imbalance import ratio_series
from ..analysis.layers import LayerArrays, binned_log_ratio
from ..analysis.seeds import row_quantiles, seed_matrix
from ..analysis.summary import run_layer_arrays, summarize_groups
from ..runs import Run
from ..runs import schema
from .draw import (
    add_legend, draw_index, draw_seeds, finish, legend_label, panel_grid, ratio_axis, save_figure, seeds_caption, single_axis,
    step_axis,
)  # fmt: skip
from .registry import KindPlotter, PlotOptions, RunGroups, register_plotter
from .style import SIDE_LINESTYLES, group_colors, plt

HEATMAP_BINS = 400
HEATMAP_CMAP = "RdBu_r"  # diverging ColorBrewer map, safe for colour-blind readers


class SkipFigure(Exception):
    """A figure cannot be drawn from these runs (its columns are absent)."""


def _skip_if_empty(fig, drawn: bool, what: str) -> None:
    if not drawn:
        plt.close(fig)
        raise SkipFigure(f"no finite values of {what} in any run")


# ---------------------------------------------------------------- data access

# Pivoted layer tables, shared by the summary and the heatmap of one call.
# Keyed by the file's identity so a re-recorded run is never served stale.
_LAYER_CACHE: dict[tuple, LayerArrays | None] = {}


def _layers_of(run: Run) -> LayerArrays | None:
    path = run.path / schema.LAYERS
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return None
    if key not in _LAYER_CACHE:
        if len(_LAYER_CACHE) > 32:
            _LAYER_CACHE.clear()
        _LAYER_CACHE[key] = run_layer_arrays(run)
    return _LAYER_CACHE[key]


def _frames(runs: list[Run], table: str = "steps") -> list[pd.DataFrame]:
    return [getattr(run, table) for run in runs]


def _has_column(groups: RunGroups, column: str, table: str = "steps") -> bool:
    return any(column in frame.columns for runs in groups.values() for frame in _frames(runs, table))


def _require(groups: RunGroups, *columns: str, table: str = "steps") -> None:
    missing = [c for c in columns if not _has_column(groups, c, table)]
    if missing:
        file = {"steps": schema.STEPS, "evals": schema.EVALS, "layers": schema.LAYERS}[table]
        raise SkipFigure(f"no run has column(s) {', '.join(missing)} in {file}")


def _pair(runs: list[Run]) -> tuple[str, str]:
    """The split groups of one plotted group's runs (never mixed: ``keep_pairs_apart``)."""
    return split_pair(runs[0]) if runs else schema.DEFAULT_GROUPS


def _names(groups: RunGroups) -> tuple[str, str, bool]:
    """(first, second, shared): the split groups' names when every plotted group has the same pair,
    else the generic "first" and "second" (the legend then names each group's pair)."""
    pairs = list(dict.fromkeys(_pair(runs) for runs in groups.values()))
    return (*pairs[0], True) if len(pairs) == 1 else ("first", "second", False)


def _pair_label(label: str, runs: list[Run], shared: bool) -> str:
    """A legend label; when the figure mixes pairs, it says which ratio this group's line is."""
    text = legend_label(label, len(runs))
    if shared:
        return text
    first, second = _pair(runs)
    return f"{text}: {second} / {first}"


def _colors(groups: RunGroups) -> dict[str, str]:
    return group_colors(list(groups))


def _caption(groups: RunGroups, options: PlotOptions, table: str = "steps") -> str:
    """The seeds caption for a figure of ``table`` columns (evals are never smoothed)."""
    counts = [sum(1 for f in _frames(runs, table) if not f.empty) for runs in groups.values()]
    return seeds_caption(counts, options.smooth if table == "steps" else 1)


# -------------------------------------------------------------------- figures


def _one_column_per_group(
    groups: RunGroups, options: PlotOptions, column: str, *, log: bool = False, label: Callable[[str, list[Run]], str] | None = None
):
    """A single axis with one median line + band per group for the steps column ``column``."""
    _require(groups, column)
    fig, ax = single_axis()
    colors = _colors(groups)
    drawn = False
    name = label or (lambda group, runs: legend_label(group, len(runs)))
    for group, runs in groups.items():
        drawn |= draw_seeds(
            ax, _frames(runs), column, color=colors[group], label=name(group, runs), smooth=options.smooth, positive=log
        )
    _skip_if_empty(fig, drawn, column)
    if log:
        ax.set_yscale("log")
    step_axis(ax)
    return fig, ax


def _chosen_rejected_panels(groups: RunGroups, options: PlotOptions, columns: Callable[[list[Run]], tuple[str, str]], *, log: bool, what: str):
    """One panel per group with its two series: ``columns(runs)`` = (first group's, second group's) column."""
    _require_any(groups, columns)
    fig, axes = panel_grid(len(groups))
    colors = _colors(groups)
    drawn = False
    for ax, (label, runs) in zip(axes, groups.items()):
        frames, name = _frames(runs), legend_label(label, len(runs))
        # The group's colour; the first group solid, the second dashed (the same convention in every figure).
        for column, part, side in zip(columns(runs), _pair(runs), ("chosen", "rejected")):
            drawn |= draw_seeds(
                ax, frames, column, color=colors[label], label=f"{part} {what}", smooth=options.smooth, positive=log,
                linestyle=SIDE_LINESTYLES[side],
            )  # fmt: skip
        if log:
            ratio_axis(ax)  # plain tick labels (0.5, 1, 2), never 6×10⁻¹
        ax.set_title(name)
        step_axis(ax)
        add_legend(ax)
    _skip_if_empty(fig, drawn, " / ".join(columns(next(iter(groups.values())))) if groups else "columns")
    return fig, axes


def _require_any(groups: RunGroups, columns: Callable[[list[Run]], tuple[str, str]]) -> None:
    """Skip the figure unless some group's runs have both of that group's columns."""
    if not any(all(_has_column({label: runs}, c) for c in columns(runs)) for label, runs in groups.items()):
        wanted = sorted({c for runs in groups.values() for c in columns(runs)})
        raise SkipFigure(f"no run has column(s) {', '.join(wanted)} in {schema.STEPS}")


def _norm_columns(runs: list[Run]) -> tuple[str, str]:
    first, second = _pair(runs)
    return schema.group_norm_column(first), schema.group_norm_column(second)


def fig_norms(groups: RunGroups, options: PlotOptions):
    fig, axes = _chosen_rejected_panels(groups, options, _norm_columns, log=True, what="‖g‖")
    axes[0].set_ylabel("gradient norm (log scale)")
    first, second, shared = _names(groups)
    whose = "" if shared else " of each run's split"
    finish(fig, f"Gradient norms of the {first} (solid) and {second} (dashed) rows{whose}", _caption(groups, options))
    return fig


def _ratio_frame(steps: pd.DataFrame) -> pd.DataFrame:
    """``step`` and rho: logged, or derived from the two norms for (chosen/rejected) runs that lack the column."""
    if schema.GRAD_RATIO in steps.columns or steps.empty:
        return steps
    if schema.GRAD_NORM_CHOSEN not in steps.columns or schema.GRAD_NORM_REJECTED not in steps.columns:
        return pd.DataFrame()
    return pd.DataFrame({schema.STEP: steps[schema.STEP], schema.GRAD_RATIO: ratio_series(steps)})


def fig_ratio(groups: RunGroups, options: PlotOptions):
    if not (_has_column(groups, schema.GRAD_RATIO) or _has_column(groups, schema.GRAD_NORM_CHOSEN)):
        raise SkipFigure(f"no run has column {schema.GRAD_RATIO} in {schema.STEPS}")
    first, second, shared = _names(groups)
    fig, ax = single_axis()
    colors = _colors(groups)
    drawn = False
    for label, runs in groups.items():
        frames = [_ratio_frame(f) for f in _frames(runs)]
        drawn |= draw_seeds(ax, frames, schema.GRAD_RATIO, color=colors[label], label=_pair_label(label, runs, shared), smooth=options.smooth, positive=True)
    _skip_if_empty(fig, drawn, schema.GRAD_RATIO)
    ratio_axis(ax)
    step_axis(ax)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1.2, label="ρ = 1 (equal norms)")
    ax.set_ylabel(f"ρ = ‖g_{second}‖ / ‖g_{first}‖ (log scale)")
    add_legend(ax)
    title = f"Gradient ratio ρ (above 1: the {second} term dominates)" if shared else "Gradient ratio ρ of each run's two groups (legend: second / first)"
    finish(fig, title, _caption(groups, options))
    return fig


def fig_cosine(groups: RunGroups, options: PlotOptions):
    first, second, shared = _names(groups)
    fig, ax = _one_column_per_group(groups, options, schema.GRAD_COSINE, label=lambda label, runs: _pair_label(label, runs, shared))
    ax.axhline(0.0, color="black", linestyle=":", linewidth=1.0)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel(f"cos(g_{first}, g_{second})")
    add_legend(ax)
    finish(fig, f"Cosine between the {first} and {second} gradients", _caption(groups, options))
    return fig


def fig_logps(groups: RunGroups, options: PlotOptions):
    fig, axes = _chosen_rejected_panels(groups, options, lambda runs: (schema.LOGPS_CHOSEN, schema.LOGPS_REJECTED), log=False, what="log p")
    axes[0].set_ylabel("sequence log-probability (nats)")
    finish(fig, "Log-probabilities of chosen (solid) and rejected (dashed) responses", _caption(groups, options))
    return fig


def fig_pw_over_pl(groups: RunGroups, options: PlotOptions):
    fig, ax = _one_column_per_group(groups, options, schema.LOG_PW_OVER_PL)
    ax.axhline(0.0, color="black", linestyle=":", linewidth=1.0, label="p_w = p_l")
    ax.set_ylabel("mean ln(p_w / p_l) (nats)")
    add_legend(ax)
    finish(fig, "Log probability ratio ln(p_w / p_l) (p_w / p_l: the factor between the two sensitivities)", _caption(groups, options))
    return fig


def fig_rewards(groups: RunGroups, options: PlotOptions):
    columns = [c for c in (schema.REWARDS_CHOSEN, schema.REWARDS_REJECTED, schema.REWARDS_MARGINS) if _has_column(groups, c)]
    if not columns:
        raise SkipFigure(f"no run has rewards/* columns in {schema.STEPS}")
    fig, axes = panel_grid(len(columns), width=4.6, sharey=False)
    colors = _colors(groups)
    drawn = False
    for ax, column in zip(axes, columns):
        for label, runs in groups.items():
            drawn |= draw_seeds(ax, _frames(runs), column, color=colors[label], label=legend_label(label, len(runs)), smooth=options.smooth)
        ax.axhline(0.0, color="black", linestyle=":", linewidth=1.0)
        ax.set_title(column)
        step_axis(ax)
    _skip_if_empty(fig, drawn, "rewards/*")
    axes[0].set_ylabel("implicit reward β(ℓ − ℓ_ref) (nats)")
    add_legend(axes[0])
    finish(fig, "Implicit rewards and margins", _caption(groups, options))
    return fig


def fig_loss(groups: RunGroups, options: PlotOptions):
    fig, ax = _one_column_per_group(groups, options, schema.LOSS)
    ax.set_ylabel("DPO loss (nats)")
    add_legend(ax)
    finish(fig, "Training loss (the DPO value, for every method)", _caption(groups, options))
    return fig


def fig_kl_to_optimum(groups: RunGroups, options: PlotOptions):
    _require(groups, KL_TO_OPTIMUM, table="evals")
    with_ood = _has_column(groups, OOD_MASS, "evals")
    fig, axes = panel_grid(2 if with_ood else 1, width=6.0, sharey=False)
    colors = _colors(groups)
    drawn = False
    for label, runs in groups.items():
        evals = [e for e in _frames(runs, "evals") if KL_TO_OPTIMUM in e.columns]
        name = legend_label(label, len(evals))
        drawn |= draw_seeds(axes[0], evals, KL_TO_OPTIMUM, color=colors[label], label=name, positive=True)
        if with_ood:
            draw_seeds(axes[1], evals, OOD_MASS, color=colors[label], label=name)
    _skip_if_empty(fig, drawn, KL_TO_OPTIMUM)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(π_θ ‖ π*) (nats, log scale)")
    axes[0].set_title("distance to the population optimum")
    if with_ood:
        axes[1].set_ylabel("probability mass (fraction)")
        axes[1].set_title("mass on responses seen in no pair")
    for ax in axes:
        step_axis(ax)
    add_legend(axes[0])
    finish(fig, "Convergence to π* ∝ π_ref·exp(r/β) (tabular)", _caption(groups, options, "evals"))
    return fig


def fig_reward_kl_frontier(groups: RunGroups, options: PlotOptions):
    _require(groups, TRUE_REWARD, KL_TO_REF, table="evals")
    fig, ax = single_axis()
    colors = _colors(groups)
    drawn = False
    for label, runs in groups.items():
        evals = [e for e in _frames(runs, "evals") if TRUE_REWARD in e.columns and KL_TO_REF in e.columns]
        if not evals:
            continue
        color = colors[label]
        _, kl = seed_matrix(evals, KL_TO_REF)
        _, reward = seed_matrix(evals, TRUE_REWARD)
        if kl.shape[1] > 1:
            for j in range(kl.shape[1]):
                ax.plot(kl[:, j], reward[:, j], color=color, alpha=0.25, linewidth=0.7, marker=".", markersize=3)
        kq25, kmed, kq75 = row_quantiles(kl, [0.25, 0.5, 0.75])
        rq25, rmed, rq75 = row_quantiles(reward, [0.25, 0.5, 0.75])
        idx = draw_index(kmed.size, 200)
        drawn |= bool(np.isfinite(kmed).any() and np.isfinite(rmed).any())
        ax.errorbar(
            kmed[idx], rmed[idx],
            xerr=[kmed[idx] - kq25[idx], kq75[idx] - kmed[idx]],
            yerr=[rmed[idx] - rq25[idx], rq75[idx] - rmed[idx]],
            color=color, marker="o", markersize=4, linewidth=1.8, elinewidth=0.8, alpha=0.9,
            label=legend_label(label, len(evals)),
        )  # fmt: skip
        ax.plot(kmed[idx][-1:], rmed[idx][-1:], color=color, marker="*", markersize=12, linestyle="none")
    _skip_if_empty(fig, drawn, f"{TRUE_REWARD} and {KL_TO_REF}")
    ax.set_xlabel("KL(π_θ ‖ π_ref) (nats)")
    ax.set_ylabel("true reward of samples (mean)")
    add_legend(ax)
    several = any(sum(1 for e in _frames(runs, "evals") if not e.empty) > 1 for runs in groups.values())
    caption = (
        "points: median over seeds per evaluation · bars: interquartile range over seeds · faint lines: individual seeds"
        if several else "points: each evaluation of the single run of each group"
    )  # fmt: skip
    finish(fig, "Reward–KL frontier (star: last evaluation)", caption)
    return fig


def fig_layer_heatmap(groups: RunGroups, options: PlotOptions):
    arrays = {label: [a for a in (_layers_of(r) for r in runs) if a is not None and a.steps.size] for label, runs in groups.items()}
    arrays = {label: a for label, a in arrays.items() if a}
    if not arrays:
        raise SkipFigure(f"no run has per-layer rows in {schema.LAYERS}")
    all_steps = np.concatenate([a.steps for group in arrays.values() for a in group])
    first, last = float(all_steps.min()), float(all_steps.max())
    n_bins = int(min(HEATMAP_BINS, np.unique(all_steps).size))
    edges = np.linspace(first, last + 1.0, n_bins + 1)  # steps are integers: +1 keeps the last in its bin
    names = list(dict.fromkeys(name for group in arrays.values() for a in group for name in a.names))
    index = {name: i for i, name in enumerate(names)}
    matrices = {}
    for label, group in arrays.items():
        stack = np.full((len(group), len(names), n_bins), np.nan)
        for s, a in enumerate(group):
            stack[s, [index[n] for n in a.names]] = binned_log_ratio(a, edges)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
            matrices[label] = np.nanmedian(stack, axis=0)
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices.values()])
    limit = float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0
    limit = max(limit, 1e-3)
    fig, axes = panel_grid(len(matrices), width=8.0 if len(matrices) == 1 else 5.8, height=max(3.0, 0.2 * len(names) + 1.6), sharey=True)
    cmap = plt.get_cmap(HEATMAP_CMAP).with_extremes(bad="#d9d9d9")
    image = None
    for ax, (label, matrix) in zip(axes, matrices.items()):
        image = ax.imshow(
            matrix, aspect="auto", cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest",
            extent=(edges[0], edges[-1], len(names) - 0.5, -0.5),
        )  # fmt: skip
        ax.set_title(legend_label(label, len(arrays[label])))
        step_axis(ax)
        ax.grid(False)
    every = max(1, int(np.ceil(len(names) / 60)))
    axes[0].set_yticks(range(0, len(names), every), [names[i] for i in range(0, len(names), every)], fontsize=7 if len(names) > 15 else 9)
    axes[0].set_ylabel("layer (module path)")
    bar = fig.colorbar(image, ax=axes, shrink=0.9)
    low, high, _ = _names(groups)
    bar.set_label(f"ln ρ = ln(‖g_{high}‖ / ‖g_{low}‖)  (> 0: {high} dominates)")
    several = any(len(group) > 1 for group in arrays.values())
    what = "median over seeds of each bin's mean ln ρ" if several else "each bin's mean ln ρ (one run per group)"
    finish(fig, "Per-layer gradient ratio ln ρ", f"{what} · grey: no finite value · colour scale clipped at the 99th percentile of |ln ρ|")
    return fig


# The summary columns printed to the terminal; the CSV and Markdown files have all.
TERMINAL_COLUMNS = [
    "group", "ratio_of", "n_seeds", "steps", "nonfinite_steps", "ratio_nonfinite",
    "ratio_median", "ratio_iqr", "ratio_final", "mean_log_ratio", "dominated_frac", "onset_step", "onset_runs",
    "cosine_median", "log_pw_over_pl_final", "chosen_logp_fall_frac", "chosen_logp_change", "rejected_logp_change",
    "loss_final", "loss_final_seed_sd", "loss_spikes", "grad_norm_spikes",
    "kl_to_optimum_final", "true_reward_final", "kl_to_ref_final", "pref_accuracy_final", "train_pair_accuracy_final", "imbalance_layers",
]  # fmt: skip

FIGURES: list[tuple[str, Callable]] = [
    ("norms", fig_norms),
    ("ratio", fig_ratio),
    ("layer_heatmap", fig_layer_heatmap),
    ("logps", fig_logps),
    ("pw_over_pl", fig_pw_over_pl),
    ("rewards", fig_rewards),
    ("kl_to_optimum", fig_kl_to_optimum),
    ("reward_kl_frontier", fig_reward_kl_frontier),
    ("cosine", fig_cosine),
    ("loss", fig_loss),
]


def figures(groups: RunGroups, options: PlotOptions) -> list[Path]:
    """Write every figure these runs have data for; note the ones skipped on stderr."""
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, draw in FIGURES:
        try:
            fig = draw(groups, options)
        except SkipFigure as reason:
            print(f"gradlens plot: note: skipped figure '{name}': {reason}", file=sys.stderr)
            continue
        paths.extend(save_figure(fig, out, name, options.formats))
    return paths


def summarize(groups: RunGroups, options: PlotOptions) -> pd.DataFrame:
    """One row per group. The per-run table, per-layer attribution and the group
    comparison travel in ``summary.attrs["tables"]`` for the command to write."""
    result = summarize_groups(groups, layers_of=_layers_of, ci=options.ci)
    summary = result.summary
    summary.attrs["tables"] = {"runs": result.per_run, "layers": result.layers, "comparison": result.comparison}
    summary.attrs["terminal_columns"] = [c for c in TERMINAL_COLUMNS if c in summary.columns]
    return summary


register_plotter(schema.KIND_PREFERENCE, KindPlotter(summarize=summarize, figures=figures, default_group_by="loss"))
