"""E3 -- Langevin KL rates (Cheng & Bartlett, 2018), with KL computed exactly.

    python experiments/e3_langevin.py            # ~5-10 min on 2 cores
    python experiments/e3_langevin.py --smoke    # small dimensions, short runs (45-60 s on these 2-core machines)

What it does, all through gradlens's API (``gradlens.langevin``):

1. KL(p_k || p*) against iteration for several step sizes h (``run_langevin``, i.e.
   ``gradlens langevin run --step H``), exact (closed form / density grid), on
   * the Gaussian, d = 10, condition number 10 (m = 1, L = 10),
   * the strongly convex product target phi(x) = x²/2 + log cosh x (m = 1, L = 2), d = 10,
   * the weakly convex product target phi(x) = log cosh x (m = 0, L = 1), d = 10,
   with the stationary bias, Cheng-Bartlett's Theorem 1 as what it states -- KL <= eps
   after its k steps at its h, a point at (k, eps) -- and Vempala-Wibisono's bound with
   alpha = m, e^{-mhk}KL_0 + 8hdL^2/m, drawn only where it is a bound (h <= m/(4L^2)).
   Each run records the KL
   decrement per step and h x the relative Fisher information: the gradient-flow
   dissipation identity dKL/dt = -Fisher, checked step by step.
2. Iterations to reach KL <= eps for d in {1, 10, 100, 1000} and eps in {0.1, 0.03, 0.01}:
   * Gaussian cond 10 and the strongly convex product: ``run_sweep`` (``gradlens
     langevin sweep``): Theorem 1's (h, k), the exact KL after those k steps, the
     exact first k with KL <= eps at Theorem 1's h, and at the best h
     (``best_h_for_eps``). The best h is an *oracle* choice: it is searched with the
     exact KL, which a user of the theorem would not have;
   * Gaussian cond 1: the same cells through the same API calls (``theorem1``,
     ``GaussianTrack``, ``best_h_for_eps``) but with the target N(1, I): with mean 0 the
     prescribed start N(0, I/m) *is* the target (KL_0 = 0, zero iterations). The shift
     makes KL_0 = d/2 = dL/(2m), the largest start KL Theorem 1's proof allows;
   * the weakly convex product: Theorem 2's (h, k) (``theorem2_for``), the exact k at
     Theorem 2's h where that is computable (k_theory <= 5e5; the KL after k_theory
     steps where k_theory <= 5e4), and at the oracle best h.
   Log-log slopes of k against d (per eps) and 1/eps (per d) are fitted where a
   series has at least 3 computable cells, then averaged.
   The cells are kept in OUT/sweep_cells.csv and reused by a re-run (``--recompute-sweep``
   recomputes them), as finished KL-vs-k runs are.
3. Figures with ``gradlens.plot.style``; the standard ``gradlens plot`` report over
   the KL-vs-k runs goes to experiments/runs/e3/plot/ (not committed).

Outputs (figures/): e3_langevin_kl_vs_k.png, e3_langevin_iterations.png,
e3_langevin_dissipation.png, e3_langevin_sweep.{csv,md} (every (target, d, eps) cell),
e3_langevin_slopes.{csv,md}, e3_langevin_runs.{csv,md} (per KL-vs-k run: bound check,
dissipation error), e3_langevin_runtime.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

import common

FIGURES = [
    "figures/e3_langevin_kl_vs_k.png",
    "figures/e3_langevin_iterations.png",
    "figures/e3_langevin_dissipation.png",
    "figures/e3_langevin_sweep.csv",
    "figures/e3_langevin_sweep.md",
    "figures/e3_langevin_slopes.csv",
    "figures/e3_langevin_slopes.md",
    "figures/e3_langevin_runs.csv",
    "figures/e3_langevin_runs.md",
    "figures/e3_langevin_runtime.json",
]

TARGETS = {  # name -> (RunSpec fields, m, L)
    "gaussian cond=10": (dict(target="gaussian", cond=10.0), 1.0, 10.0),
    "product strongly convex": (dict(target="product", phi="strongly_convex"), 1.0, 2.0),
    "product weakly convex": (dict(target="product", phi="weakly_convex"), 0.0, 1.0),
}
SWEEP_TARGETS = ("gaussian cond=1 (mean 1)", "gaussian cond=10", "product strongly convex", "product weakly convex")
EPS_RUN = 0.1  # eps whose Theorem-1 step size is one of the h values in part 1
FULL = dict(
    dim=10, dims=[1, 10, 100, 1000], eps=[0.1, 0.03, 0.01], max_work=3e10, time_units=15.0, max_rows=3000,
    h={"gaussian cond=10": [1e-3, 1e-2, 0.05, 0.1, 0.18], "product strongly convex": [1e-2, 0.1, 0.5, 0.9],
       "product weakly convex": [1e-2, 0.1, 0.5, 1.0, 1.6]},
    theorem_h=True, theorem2_budget=5e5,
)  # fmt: skip
SMOKE = dict(
    dim=3, dims=[1, 10], eps=[0.1, 0.03], max_work=2e7, time_units=4.0, max_rows=300,
    h={"gaussian cond=10": [1e-2, 0.1], "product strongly convex": [0.1, 0.5], "product weakly convex": [0.1, 1.0]},
    theorem_h=False, theorem2_budget=2e4,
)  # fmt: skip


# ---------------------------------------------------------------- part 1: KL vs k


def kl_runs(args, grid) -> list[dict]:
    """One `gradlens langevin run` per (target, h); steps cover ~time_units / max(m, 0.1) of continuous time."""
    from gradlens.langevin import theorem1
    from gradlens.langevin.runner import RunSpec, run_langevin

    index = []
    for name, (fields, m, L) in TARGETS.items():
        hs = list(grid["h"][name])
        if grid["theorem_h"] and m > 0:
            hs.insert(0, theorem1(grid["dim"], EPS_RUN, m, L).h)
        for h in hs:
            is_theorem = m > 0 and math.isclose(h, theorem1(grid["dim"], EPS_RUN, m, L).h)
            steps = theorem1(grid["dim"], EPS_RUN, m, L).k if is_theorem else int(math.ceil(grid["time_units"] / (max(m, 0.25) * h)))
            label = f"{name}, h={h:.3g}" + (" (Theorem 1)" if is_theorem else "")
            spec = RunSpec(dim=grid["dim"], step=h, eps=EPS_RUN, steps=steps, particles=0, max_rows=grid["max_rows"], label=label, **fields)
            path = args.out / "kl_vs_k" / f"{name.replace(' ', '_').replace('=', '')}-h{h:.3g}"
            summary = _finished_summary(path, steps)
            kept = summary is not None
            if not kept:
                summary = run_langevin(spec, path, overwrite=True, tensorboard=False, echo=lambda s: None)
            index.append(dict(target=name, h=h, theorem_h=is_theorem, path=path, summary=summary, kept=kept))
            print(f"{label}: {summary['steps']} steps, KL {summary['kl0']:.3g} -> {summary['kl_final']:.3g}", flush=True)
    return index


def _finished_summary(path: Path, steps: int) -> dict | None:
    """The summary of a run this script already finished with the same number of steps (else None): kept, not redone."""
    from gradlens.runs import load_run

    try:
        run = load_run(path)
        summary = run.summary
    except Exception:  # missing or unfinished: run it again
        return None
    return summary if summary and summary.get("steps") == steps else None


def run_table(index: list[dict]) -> pd.DataFrame:
    """Per run: KL at the start and end, the stationary bias, measured k to eps, whether Vempala-Wibisono's
    bound (alpha = m) holds at every logged k where it applies (h <= m/(4L²)), and how far the one-step KL
    decrement is from h x Fisher."""
    from gradlens.runs import langevin_schema as C
    from gradlens.runs import load_run

    rows = []
    for item in index:
        steps, s = load_run(item["path"]).steps, item["summary"]
        kl, bound = steps[C.KL].to_numpy(float), steps[C.BOUND_VW].to_numpy(float)  # NaN where h > m/(4L²)
        dec, hf = steps[C.KL_DECREMENT].to_numpy(float), steps[C.H_FISHER].to_numpy(float)
        # Dissipation: only where KL is well above the stationary bias (there the flow dominates).
        active = (kl > 10 * s["kl_stationary"] + 1e-12) & (hf > 0) & np.isfinite(dec)
        rel = np.abs(dec[active] - hf[active]) / hf[active]
        has_bound = np.isfinite(bound).any()
        th = s.get("theorem1") or {}
        rows.append({
            "target": item["target"], "h": item["h"], "h_is_theorem1": item["theorem_h"], "steps": s["steps"],
            "kl0": s["kl0"], "kl_final": s["kl_final"], "kl_stationary": s["kl_stationary"],
            f"k_to_eps{EPS_RUN:g}": s.get("measured_k"),
            "vw_bound_applies": bool(has_bound),
            "vw_bound_holds": bool(np.all(kl <= bound * (1 + 1e-9) + 1e-15)) if has_bound else None,
            "max_kl_over_vw_bound": float(np.nanmax(kl / bound)) if has_bound else math.nan,
            "dissipation_rel_err_median": float(np.median(rel)) if rel.size else math.nan,
            "dissipation_rel_err_max": float(np.max(rel)) if rel.size else math.nan,
            "theorem1_k": th.get("k"), "theorem1_kl_at_k": th.get("kl_at_k"),
            "grid_error": (s.get("grid") or {}).get("error_estimate"),
        })  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- part 2: iterations to eps


def sweeps(args, grid) -> pd.DataFrame:
    """Every (target, d, eps) cell, or the cells a finished run of this grid left in OUT/sweep_cells.csv."""
    cache = args.out / f"sweep_cells{'_smoke' if args.smoke else ''}.csv"
    args.sweep_cells_kept = cache.is_file() and not args.recompute_sweep
    if args.sweep_cells_kept:
        print(f"sweep cells kept from {cache} (--recompute-sweep recomputes them)", flush=True)
        return pd.read_csv(cache)
    cells = compute_sweeps(args, grid)
    cells.to_csv(cache, index=False)
    return cells


def compute_sweeps(args, grid) -> pd.DataFrame:
    """Every (target, d, eps) cell; the built-in sweep where it applies, the same API calls otherwise."""
    from gradlens.runs import langevin_schema as C
    from gradlens.langevin.runner import SweepSpec, run_sweep
    from gradlens.runs import load_run

    frames = []
    for name, spec in (("gaussian cond=10", SweepSpec(target="gaussian", cond=10.0)),
                       ("product strongly convex", SweepSpec(target="product", phi="strongly_convex"))):
        spec.dims, spec.eps, spec.max_work = grid["dims"], grid["eps"], grid["max_work"]
        path = args.out / "sweep" / name.replace(" ", "_").replace("=", "")
        run_sweep(spec, path, overwrite=True, tensorboard=False, echo=print)
        table = load_run(path).steps.drop(columns=[C.STEP])
        frames.append(table.assign(target=name, theorem="Theorem 1"))
    frames.append(pd.DataFrame(shifted_gaussian_cells(grid)).assign(target="gaussian cond=1 (mean 1)", theorem="Theorem 1"))
    frames.append(pd.DataFrame(weakly_convex_cells(grid)).assign(target="product weakly convex", theorem="Theorem 2"))
    out = pd.concat(frames, ignore_index=True)
    return out[["target", "theorem"] + [c for c in out.columns if c not in ("target", "theorem")]]


def shifted_gaussian_cells(grid) -> list[dict]:
    """N(1, I) from N(0, I): Theorem 1's (h, k), exact KL at k, exact k at Theorem 1's h and at the oracle best h."""
    from gradlens.langevin import GaussianTarget, GaussianTrack, best_h_for_eps, theorem1
    from gradlens.runs import langevin_schema as C

    rows = []
    for d in grid["dims"]:
        target = GaussianTarget.random(d, 1.0, 0, mean=np.ones(d))
        for eps in grid["eps"]:
            h, k = theorem1(d, eps, target.m, target.L)
            track = GaussianTrack(target, h)
            kl0, kl_k = track.kl([0, k])
            measured = track.first_k_below(eps)
            h_best, k_best = best_h_for_eps(target, eps, max_steps=10**6)
            rows.append({C.DIM: d, C.EPS: eps, C.KL0: kl0, C.H_THEORY: h, C.K_THEORY: k, C.KL_AT_K_THEORY: kl_k,
                         C.BOUND_HOLDS: int(kl_k <= eps), C.K_MEASURED: measured,
                         C.LOOSENESS: k / measured if measured else math.inf, C.H_BEST: h_best, C.K_BEST: k_best})
    return rows


def weakly_convex_cells(grid) -> list[dict]:
    """log cosh x in d dims: Theorem 2's (h, k); exact k at that h when k_theory is small enough; the oracle best h."""
    from gradlens.langevin import ProductTarget, best_h_for_eps, smallest_k_to_eps, theorem2_for, track_for
    from gradlens.runs import langevin_schema as C

    rows = []
    for d in grid["dims"]:
        target = ProductTarget("weakly_convex", d)
        for eps in grid["eps"]:
            th = theorem2_for(target, eps)
            kl0 = float(track_for(target, 1.0).kl([0])[0])
            measured, kl_k, holds = None, math.nan, None
            if th.k <= grid["theorem2_budget"]:  # the search stops at the first hit: far fewer steps than k
                measured = smallest_k_to_eps(target, th.h, eps, max_steps=th.k)
            if th.k <= grid["theorem2_budget"] / 10:  # KL after all k steps: the whole run on the grid
                kl_k = float(track_for(target, th.h).kl([th.k])[0])
                holds = int(kl_k <= eps)
            h_best, k_best = best_h_for_eps(target, eps, max_steps=20000, points=10, refine=8)
            rows.append({C.DIM: d, C.EPS: eps, C.KL0: kl0, C.H_THEORY: th.h, C.K_THEORY: th.k, C.KL_AT_K_THEORY: kl_k,
                         C.BOUND_HOLDS: holds, C.K_MEASURED: measured,
                         C.LOOSENESS: (th.k / measured) if measured else None, C.H_BEST: h_best, C.K_BEST: k_best})
            print(f"  weakly convex d={d} eps={eps:g}: Theorem 2 k={th.k:.3g}, measured {measured}, oracle best-h k={k_best}", flush=True)
    return rows


def _slope(x, y, min_points: int = 3) -> float:
    """Least-squares slope of log y on log x; NaN with fewer than ``min_points`` usable points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < min_points or np.unique(x[ok]).size < min_points:
        return math.nan
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def slope_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Log-log slope of iterations against d (fitted per eps, then averaged) and against 1/eps (per d)."""
    from gradlens.runs import langevin_schema as C

    rows = []
    for target in SWEEP_TARGETS:
        t = cells[cells.target == target]
        if t.empty:
            continue
        row = {"target": target, "theorem": t["theorem"].iloc[0]}
        for key, label in ((C.K_THEORY, "theory k"), (C.K_MEASURED, "k at theory h"), (C.K_BEST, "k at oracle best h")):
            vs_d = [_slope(g[C.DIM], g[key].astype(float)) for _, g in t.groupby(C.EPS)]
            vs_eps = [_slope(1.0 / g[C.EPS], g[key].astype(float)) for _, g in t.groupby(C.DIM)]
            row[f"slope vs d: {label}"] = _mean(vs_d)
            row[f"slope vs 1/eps: {label}"] = _mean(vs_eps)
        loose = pd.to_numeric(t[C.LOOSENESS], errors="coerce").replace([np.inf], np.nan)
        row["k_theory / k at theory h (min-max)"] = f"{loose.min():.3g}-{loose.max():.3g}" if loose.notna().any() else "n/a"
        ratio = t[C.K_THEORY].astype(float) / t[C.K_BEST].astype(float).where(t[C.K_BEST] > 0)
        row["k_theory / k at oracle best h (min-max)"] = f"{ratio.min():.3g}-{ratio.max():.3g}" if ratio.notna().any() else "n/a"
        held = pd.to_numeric(t[C.BOUND_HOLDS], errors="coerce").dropna()
        row["KL(k_theory) <= eps"] = f"{int(held.sum())}/{len(held)} checked" + (f" ({len(t) - len(held)} not computable)" if len(held) < len(t) else "")
        rows.append(row)
    return pd.DataFrame(rows)


def _mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


# ---------------------------------------------------------------- figures


def fig_kl_vs_k(index: list[dict], dim: int, figures: Path) -> Path:
    """Exact KL against k per h; Cheng-Bartlett's Theorem 1 as the point (k, ε) at its h; Vempala-Wibisono
    (α = m) dashed, only for the runs whose h is in its range h <= m/(4L²); stationary biases dotted."""
    from gradlens.runs import langevin_schema as C
    from gradlens.langevin import theorem1
    from gradlens.plot.style import apply_style, color_for, plt
    from gradlens.runs import load_run

    apply_style()
    names = list(TARGETS)
    fig, axes = plt.subplots(1, len(names), figsize=(5.4 * len(names), 4.8), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        _, m, L = TARGETS[name]
        vw_drawn = False
        for i, item in enumerate(x for x in index if x["target"] == name):
            steps = load_run(item["path"]).steps
            k, kl = steps[C.STEP].to_numpy(float), steps[C.KL].to_numpy(float)
            keep = (k > 0) & (kl > 0)
            color = color_for(i)
            tag = " (Thm 1's h)" if item["theorem_h"] else ""
            ax.plot(k[keep], kl[keep], color=color, lw=1.7, label=f"h={item['h']:.3g}{tag}")
            bound = steps[C.BOUND_VW].to_numpy(float)  # NaN unless h <= m/(4L²)
            if np.isfinite(bound).any():
                ax.plot(k[keep], bound[keep], color=color, lw=1.0, ls="--",
                        label=None if vw_drawn else "Vempala–Wibisono (α=m), where h ≤ m/(4L²)")
                vw_drawn = True
            if item["theorem_h"]:
                th = theorem1(dim, EPS_RUN, m, L)
                ax.plot([th.k], [EPS_RUN], marker="*", ms=14, color=color, mec="black", ls="none",
                        label=f"Cheng–Bartlett Thm 1: KL ≤ {EPS_RUN:g} after k={th.k:.3g}")
            bias = item["summary"]["kl_stationary"]
            if bias > 0:
                ax.axhline(bias, color=color, lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("iteration k")
        title = f"{name}, d={dim}" + (f"\nm={m:g}, L={L:g}: VW valid for h ≤ {m / (4 * L * L):.3g}" if m > 0 else "\nm=0: no Theorem 1, no VW with α=m")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6.5, loc="lower left")
    axes[0, 0].set_ylabel("exact KL(p_k ‖ p*)")
    fig.suptitle("E3: ULA's exact KL against iteration for several step sizes (dotted: stationary bias KL(p_∞^h ‖ p*))", fontsize=12)
    return common.save(fig, figures, "e3_langevin_kl_vs_k")


def fig_iterations(cells: pd.DataFrame, figures: Path) -> Path:
    from gradlens.runs import langevin_schema as C
    from gradlens.plot.style import apply_style, color_for, plt

    apply_style()
    targets = [t for t in SWEEP_TARGETS if (cells.target == t).any()]
    fig, axes = plt.subplots(2, len(targets), figsize=(4.4 * len(targets), 7.6), squeeze=False, layout="constrained")
    for j, target in enumerate(targets):
        t = cells[cells.target == target]
        for row, (series, xkey) in enumerate(((C.EPS, "d"), (C.DIM, "1/eps"))):
            ax = axes[row, j]
            for i, (value, part) in enumerate(t.sort_values([C.DIM, C.EPS]).groupby(series)):
                x = part[C.DIM].to_numpy(float) if xkey == "d" else 1.0 / part[C.EPS].to_numpy(float)
                color = color_for(i)
                name = f"ε={value:g}" if series == C.EPS else f"d={int(value)}"
                for key, marker, ls in ((C.K_THEORY, "x", ":"), (C.K_MEASURED, "o", "-"), (C.K_BEST, "s", "--")):
                    y = pd.to_numeric(part[key], errors="coerce").to_numpy(float)
                    ok = np.isfinite(y) & (y > 0)
                    if ok.any():
                        ax.plot(x[ok], y[ok], marker=marker, ls=ls, color=color, mfc="none" if marker == "s" else color, ms=5,
                                label=f"{name}: slope {_slope(x, y):.2f}" if key == C.K_BEST else None)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("dimension d" if xkey == "d" else "1/ε")
            if j == 0:
                ax.set_ylabel("iterations to KL ≤ ε")
            if row == 0:
                ax.set_title(f"{target}\n({t['theorem'].iloc[0]})", fontsize=10)
            ax.legend(fontsize=6.5, loc="upper left", title="oracle best-h fit", title_fontsize=6.5)
    fig.suptitle("E3: iterations to reach KL ≤ ε  —  × dotted: theorem's k · ● solid: exact k at the theorem's h · □ dashed: exact k at the oracle best h", fontsize=11)
    return common.save(fig, figures, "e3_langevin_iterations")


def fig_dissipation(index: list[dict], figures: Path) -> Path:
    """The exact one-step KL decrement against h x relative Fisher information, one panel per target
    (gradlens plot draws the same check with every run in one panel; 16 runs need panels)."""
    from gradlens.runs import langevin_schema as C
    from gradlens.plot.style import apply_style, color_for, plt
    from gradlens.runs import load_run

    apply_style()
    names = list(TARGETS)
    fig, axes = plt.subplots(1, len(names), figsize=(5.0 * len(names), 4.6), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        lo, hi = math.inf, 0.0
        for i, item in enumerate(x for x in index if x["target"] == name):
            steps = load_run(item["path"]).steps
            x, y = steps[C.H_FISHER].to_numpy(float), steps[C.KL_DECREMENT].to_numpy(float)
            ok = (x > 0) & (y > 0)
            if not ok.any():
                continue
            tag = " (Thm 1)" if item["theorem_h"] else ""
            ax.plot(x[ok], y[ok], ".", ms=2.5, color=color_for(i), label=f"h={item['h']:.3g}{tag}")
            lo, hi = min(lo, x[ok].min(), y[ok].min()), max(hi, x[ok].max(), y[ok].max())
        if hi > 0:
            ax.plot([lo, hi], [lo, hi], color="black", lw=1.0, ls="--", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("h × relative Fisher information")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper left")
    axes[0, 0].set_ylabel("exact KL(p_k) − KL(p_{k+1})")
    fig.suptitle("E3: gradient-flow dissipation, dKL/dt = −E‖∇log(p_t/p*)‖², checked per ULA step", fontsize=12)
    fig.text(0.5, -0.01, "points leave y = x where the KL reaches ULA's stationary bias (the Fisher information stays positive while the KL stops falling)",
             ha="center", va="top", fontsize=8, color="#444444")  # fmt: skip
    return common.save(fig, figures, "e3_langevin_dissipation")


def standard_report(args) -> None:
    """`gradlens plot` over every KL-vs-k run (all standard Langevin figures), for browsing; not committed."""
    from gradlens.cli import main

    if main(["plot", str(args.out / "kl_vs_k"), "--out", str(args.out / "plot"), "--smooth", "0"]) != 0:
        raise SystemExit("gradlens plot failed on the Langevin runs")


def main() -> None:
    args = common.parse_args(__doc__, "e3", extra=lambda p: p.add_argument(
        "--recompute-sweep", action="store_true", help="recompute the (d, eps) cells even when OUT/sweep_cells.csv holds them"))
    common.quiet_threads()
    grid = SMOKE if args.smoke else FULL
    timer = common.Timer()
    index = kl_runs(args, grid)
    runs = run_table(index)
    common.write_tables(runs, args.figures, "e3_langevin_runs")
    timer.lap("kl_vs_k")
    cells = sweeps(args, grid)
    common.write_tables(cells, args.figures, "e3_langevin_sweep")
    common.write_tables(slope_table(cells), args.figures, "e3_langevin_slopes")
    timer.lap("sweeps")
    fig_kl_vs_k(index, grid["dim"], args.figures)
    fig_iterations(cells, args.figures)
    fig_dissipation(index, args.figures)
    standard_report(args)
    timer.lap("figures")
    kept = sum(bool(item.get("kept")) for item in index)
    timer.write(args.figures / "e3_langevin_runtime.json", smoke=args.smoke, kl_vs_k_runs_kept_from_before=kept,
                kl_vs_k_runs=len(index), sweep_cells_kept_from_before=args.sweep_cells_kept)  # fmt: skip
    common.check_outputs(args.figures, FIGURES)
    print(f"E3 done; results in {args.figures}")


if __name__ == "__main__":
    main()
