"""Figures and the summary table for Langevin runs (kind "langevin").

Registers the plotter for run kind "langevin". A group may hold single runs
(``config.mode`` = "run") and sweeps (``config.mode`` = "sweep"); each figure uses
the runs it applies to and is skipped when there are none:

* ``langevin_kl``: exact KL(p_k || p*) against iteration (log y) with Theorem 1's
  bound (dashed) and ULA's stationary bias (dotted); k-NN estimates as points with
  their bootstrap interval, labelled as estimates.
* ``langevin_dissipation``: the exact KL decrement per step against h × relative
  Fisher information (the gradient-flow prediction), with the line y = x.
* ``langevin_iterations_vs_d`` and ``langevin_iterations_vs_inv_eps`` (sweeps):
  iterations to reach eps on log-log axes with fitted slopes, Theorem 1's k, and
  the theory's d/eps line 16 (L/m)² d/eps (Theorem 1's k without its log factor).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis.convergence import loglog_slope
from ..runs import langevin_schema as C
from ..runs import Run
from .registry import KindPlotter, PlotOptions, RunGroups, register_plotter
from .style import apply_style, color_for, group_colors, plt

TERMINAL_COLUMNS = [
    "group", "runs", "mode", "dim", "h", "steps", "kl0", "kl_final", "kl_stationary", "theorem1_k", "measured_k",
    "looseness_factor", "bound_holds", "grid_error", "slope_d_measured", "slope_d_best", "slope_inv_eps_measured",
    "slope_inv_eps_best",
]
MAX_POINTS = 4000  # a line never needs more points than a figure has pixels


def _is_sweep(run: Run) -> bool:
    return run.config.get("mode") == C.MODE_SWEEP


def _finite_mean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)] if arr.size else arr
    return float(arr.mean()) if arr.size else math.nan


# ---------------------------------------------------------------- summary


def _run_row(runs: list[Run]) -> dict:
    summaries = [r.summary or {} for r in runs]
    steps = [r.steps for r in runs]
    first = runs[0].config

    def final(col):
        return _finite_mean(s[col].dropna().iloc[-1] if col in s and s[col].notna().any() else math.nan for s in steps)

    th = [s.get("theorem1") or {} for s in summaries]
    row = {
        "mode": C.MODE_RUN, "target": first.get("target"), "dim": first.get("dim"), "h": first.get("h"),
        "steps": first.get("steps"), "eps": first.get("eps"),
        "kl0": _finite_mean(s.get("kl0") for s in summaries),
        "kl_final": final(C.KL), "kl_stationary": final(C.KL_STATIONARY), "fisher_final": final(C.FISHER),
        "w2_final": final(C.W2), "grad_u_norm_final": final(C.GRAD_U_NORM),
        "kl_estimate_final": final(C.KL_ESTIMATE),
        "measured_k": _finite_mean(s.get("measured_k") for s in summaries),
        "theorem1_k": _finite_mean(t.get("k") for t in th),
        "theorem1_kl_at_k": _finite_mean(t.get("kl_at_k") for t in th),
        "looseness_factor": _finite_mean(t.get("looseness_factor") for t in th),
        "grid_error": _finite_mean((s.get("grid") or {}).get("error_estimate") for s in summaries),
    }
    holds = [t.get("bound_holds") for t in th if t.get("bound_holds") is not None]
    row["bound_holds"] = all(holds) if holds else None
    row["complete"] = sum(r.complete for r in runs)
    return row


def _sweep_row(runs: list[Run]) -> dict:
    table = pd.concat([r.steps for r in runs], ignore_index=True)
    row = {"mode": C.MODE_SWEEP, "target": runs[0].config.get("target"), "cells": len(table)}
    for key, name in ((C.K_MEASURED, "measured"), (C.K_BEST, "best"), (C.K_THEORY, "theory")):
        if key not in table:
            continue
        row[f"slope_d_{name}"] = _finite_mean(
            loglog_slope(g[C.DIM], g[key]) for _, g in table.groupby(C.EPS))
        row[f"slope_inv_eps_{name}"] = _finite_mean(
            loglog_slope(1.0 / g[C.EPS], g[key]) for _, g in table.groupby(C.DIM))
    if C.LOOSENESS in table:
        loose = table[C.LOOSENESS].replace([np.inf, -np.inf], np.nan)
        row["looseness_min"], row["looseness_max"] = float(loose.min()), float(loose.max())
    if C.BOUND_HOLDS in table:
        held = table[C.BOUND_HOLDS].dropna()
        row["bound_holds"] = bool((held == 1).all()) if len(held) else None
    return row


def summarize(groups: RunGroups, options: PlotOptions) -> pd.DataFrame:
    """One row per group (single runs and sweeps of a group are summarised side by side)."""
    rows = []
    for label, runs in groups.items():
        row = {"group": label, "runs": len(runs)}
        singles = [r for r in runs if not _is_sweep(r)]
        sweeps = [r for r in runs if _is_sweep(r)]
        if singles:
            row.update(_run_row(singles))
        if sweeps:
            sweep = _sweep_row(sweeps)
            if singles:
                sweep.pop("mode", None)
                sweep.pop("target", None)
                sweep.pop("bound_holds", None)
                row["mode"] = "run+sweep"
            row.update(sweep)
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary.attrs["terminal_columns"] = [c for c in TERMINAL_COLUMNS if c in summary.columns]
    return summary


# ---------------------------------------------------------------- figures


def _save(fig, options: PlotOptions, name: str) -> list[Path]:
    paths = []
    for fmt in options.formats:
        path = Path(options.out) / f"{name}.{fmt}"
        fig.savefig(path)
        paths.append(path)
    plt.close(fig)
    return paths


def _thin(frame: pd.DataFrame) -> pd.DataFrame:
    if len(frame) <= MAX_POINTS:
        return frame
    idx = np.unique(np.r_[np.linspace(0, len(frame) - 1, MAX_POINTS).astype(int), len(frame) - 1])
    return frame.iloc[idx]


def _positive(frame: pd.DataFrame, *cols: str) -> pd.DataFrame:
    keep = np.ones(len(frame), dtype=bool)
    for col in cols:
        keep &= frame[col].to_numpy(dtype=float) > 0
    return frame[keep]


def _iteration_axis(ax, steps: list[np.ndarray]) -> bool:
    """A log x axis (symlog, so k = 0 stays) when the runs span two or more decades of
    iterations, else a linear one; returns whether it is logarithmic."""
    positive = np.concatenate([s[s > 0] for s in steps]) if steps else np.array([])
    last = float(positive.max()) if positive.size else 1.0
    if positive.size and positive.max() / max(positive.min(), 1.0) >= 100:
        # linscale 1: the linear stretch 0..1 is as wide as a decade, so "0" and "1" never overlap.
        ax.set_xscale("symlog", linthresh=1.0, linscale=1.0)
        ax.set_xlim(0.0, last * 1.3)  # iterations start at 0: no negative margin
        ax.set_xlabel("iteration k (log scale; linear between 0 and 1)")
        return True
    ax.set_xlim(0.0, last * 1.02)
    ax.set_xlabel("iteration k")
    return False


def fig_kl(groups: RunGroups, options: PlotOptions) -> list[Path]:
    fig = kl_figure(groups)
    return _save(fig, options, "langevin_kl") if fig is not None else []


def kl_figure(groups: RunGroups):
    """The KL figure (see the module docstring), or None when no run has a KL to draw."""
    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    knn = False
    drawn = False
    colors = group_colors(list(groups))
    iterations = []
    for label, runs in groups.items():
        color = colors[label]
        for ri, run in enumerate(r for r in runs if not _is_sweep(r)):
            steps = run.steps
            first = ri == 0
            if C.KL in steps and steps[C.KL].notna().any():
                s = _positive(_thin(steps.dropna(subset=[C.KL])), C.KL)
                ax.plot(s[C.STEP], s[C.KL], color=color, lw=1.8, label=f"{label}: exact KL" if first else None)
                iterations.append(s[C.STEP].to_numpy(float))
                drawn = True
            if C.BOUND_THEOREM1 in steps and steps[C.BOUND_THEOREM1].notna().any():
                s = _positive(_thin(steps.dropna(subset=[C.BOUND_THEOREM1])), C.BOUND_THEOREM1)
                ax.plot(s[C.STEP], s[C.BOUND_THEOREM1], color=color, lw=1.2, ls="--",
                        label="Vempala–Wibisono bound (α = m), where valid" if first else None)
            if C.KL_STATIONARY in steps and steps[C.KL_STATIONARY].notna().any():
                bias = float(steps[C.KL_STATIONARY].dropna().iloc[-1])
                if bias > 0:
                    ax.axhline(bias, color=color, lw=1.0, ls=":",
                               label="stationary bias KL(p_inf || p*)" if first else None)
            if C.KL_ESTIMATE in steps and steps[C.KL_ESTIMATE].notna().any():
                est = _positive(steps.dropna(subset=[C.KL_ESTIMATE]), C.KL_ESTIMATE)
                lo = np.clip(est[C.KL_ESTIMATE] - est[C.KL_ESTIMATE_LO], 0, None)
                hi = np.clip(est[C.KL_ESTIMATE_HI] - est[C.KL_ESTIMATE], 0, None)
                ax.errorbar(est[C.STEP], est[C.KL_ESTIMATE], yerr=[lo, hi], fmt="o", ms=3.5, color=color, alpha=0.8,
                            capsize=2, label=f"{label}: k-NN ESTIMATE (bootstrap interval)" if first else None)
                drawn = drawn or len(est) > 0
                knn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    _iteration_axis(ax, iterations)
    ax.set_ylabel("KL(p_k || p*)")
    ax.set_title("ULA: KL to the target, Vempala–Wibisono bound (α = m) and stationary bias")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if knn:  # the note is about k-NN points: only where there are some
        fig.text(0.01, -0.02, "k-NN estimates <= 0 cannot be shown on a log axis and are omitted", fontsize=8)
    return fig


def fig_dissipation(groups: RunGroups, options: PlotOptions) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    lo, hi = math.inf, 0.0
    colors = group_colors(list(groups))
    for label, runs in groups.items():
        for ri, run in enumerate(r for r in runs if not _is_sweep(r)):
            steps = run.steps
            if C.KL_DECREMENT not in steps or C.H_FISHER not in steps:
                continue
            s = _positive(_thin(steps.dropna(subset=[C.KL_DECREMENT, C.H_FISHER])), C.KL_DECREMENT, C.H_FISHER)
            if s.empty:
                continue
            ax.plot(s[C.H_FISHER], s[C.KL_DECREMENT], ".", ms=3, color=colors[label], label=label if ri == 0 else None)
            lo = min(lo, float(s[C.H_FISHER].min()), float(s[C.KL_DECREMENT].min()))
            hi = max(hi, float(s[C.H_FISHER].max()), float(s[C.KL_DECREMENT].max()))
    if not hi > 0:
        plt.close(fig)
        return []
    line = np.array([lo, hi])
    ax.plot(line, line, color="black", lw=1.0, ls="--", label="y = x (gradient flow: dKL/dt = -Fisher)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("h x relative Fisher information  E|grad log(p_k / p*)|^2")
    ax.set_ylabel("KL(p_k) - KL(p_{k+1})")
    ax.set_title("Dissipation check: KL decrement per step vs h x Fisher")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.text(0.01, -0.04, "points leave y = x near ULA's stationary law: its bias keeps the Fisher information "
             "positive while the KL stops falling", fontsize=8)
    return _save(fig, options, "langevin_dissipation")


def _sweep_tables(groups: RunGroups) -> list[tuple[str, Run, pd.DataFrame]]:
    return [(label, run, run.steps) for label, runs in groups.items() for run in runs
            if _is_sweep(run) and not run.steps.empty and C.DIM in run.steps]


def _fig_sweep(groups: RunGroups, options: PlotOptions, *, along: str) -> list[Path]:
    tables = _sweep_tables(groups)
    if not tables:
        return []
    fig, axes = plt.subplots(1, len(tables), figsize=(10.5 * len(tables), 5.0), squeeze=False)
    for ax, (label, run, table) in zip(axes[0], tables):
        m, L = run.config.get("m"), run.config.get("L")
        series_key, x_of = (C.EPS, lambda t: t[C.DIM].to_numpy(float)) if along == "d" else \
            (C.DIM, lambda t: 1.0 / t[C.EPS].to_numpy(float))
        for i, (value, part) in enumerate(table.sort_values([C.DIM, C.EPS]).groupby(series_key)):
            color = color_for(i)
            x = x_of(part)
            name = f"eps={value:g}" if series_key == C.EPS else f"d={int(value)}"
            for key, marker, ls, what in ((C.K_MEASURED, "o", "-", "measured at Theorem 1's h"),
                                          (C.K_BEST, "s", "--", "measured at the oracle best h")):
                if key not in part:
                    continue
                y = part[key].to_numpy(float)
                ok = np.isfinite(y) & (y > 0)
                if not ok.any():
                    continue
                slope = loglog_slope(x, y)
                ax.plot(x[ok], y[ok], marker=marker, ls="none", color=color, mfc=color if marker == "o" else "none")
                if ok.sum() >= 2:
                    coef = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
                    xs = np.geomspace(x[ok].min(), x[ok].max(), 20)
                    ax.plot(xs, np.exp(np.polyval(coef, np.log(xs))), ls=ls, color=color,
                            label=f"{name}, {what}: slope {slope:.2f}")
            if C.K_THEORY in part:
                ax.plot(x, part[C.K_THEORY].to_numpy(float), marker="x", ls=":", color=color, alpha=0.8,
                        label=f"{name}, Theorem 1's k: slope {loglog_slope(x, part[C.K_THEORY]):.2f}")
            if m and L:
                d = part[C.DIM].to_numpy(float)
                eps = part[C.EPS].to_numpy(float)
                order = np.argsort(x)
                ax.plot(x[order], (16.0 * (L / m) ** 2 * d / eps)[order], color=color, lw=0.9, ls="-.",
                        alpha=0.6, label=f"{name}, theory d/eps line 16 (L/m)^2 d/eps")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dimension d" if along == "d" else "1 / eps")
        ax.set_ylabel("iterations to reach KL <= eps")
        ax.set_title(label)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.suptitle("Iterations to reach eps vs " + ("d" if along == "d" else "1/eps") + " (exact KL)")
    return _save(fig, options, "langevin_iterations_vs_d" if along == "d" else "langevin_iterations_vs_inv_eps")


def figures(groups: RunGroups, options: PlotOptions) -> list[Path]:
    apply_style()
    paths: list[Path] = []
    paths += fig_kl(groups, options)
    paths += fig_dissipation(groups, options)
    paths += _fig_sweep(groups, options, along="d")
    paths += _fig_sweep(groups, options, along="eps")
    return paths


register_plotter("langevin", KindPlotter(summarize=summarize, figures=figures, default_group_by="label", split_within="mode"))
