"""E1 -- gradient imbalance in the tabular setting (the theory's setting of Ma et al., 2025).

    python experiments/e1_tabular.py            # full grid: 360 runs, ~10 min on 2 cores
    python experiments/e1_tabular.py --smoke    # 12 short runs, a few seconds

What it does, all through gradlens's API:

1. ``gradlens record --env tabular`` (``record_run``) for DPO, Balanced-DPO and
   AdaDPO x beta in {0.1, 0.5, 1} x {SGD lr 10, 50; Adam lr 0.01, 0.1} x 10 seeds,
   400 steps, evaluations every 10 steps. A seed fixes the environment (reward
   table, reference policy, the 64 training pairs) and the data order, so the three
   methods see identical data for a given seed and are compared seed by seed.
2. ``gradlens.analysis.run_metrics`` per run: rho_t = ||g_rejected|| / ||g_chosen||,
   KL(pi_theta || pi*) (pi* ∝ pi_ref exp(r / beta) is known exactly), final true
   reward, OOD mass, spikes; plus the steps until KL falls to 80 % of its start
   (``analysis.steps_to_level``) and the minimum KL along the run.
3. Paired bootstrap CIs (``analysis.bootstrap_diff_ci`` on per-seed differences)
   of each method minus DPO, per setting.
4. Figures with ``gradlens.plot`` (``draw.draw_seeds``: median over seeds, IQR band)
   and the full ``gradlens plot`` report of one representative setting under
   experiments/runs/e1/plot-adam-lr0.01-beta0.5/ (not committed).

Outputs (figures/): e1_tabular_trajectories.png, e1_tabular_grid.png,
e1_tabular_summary.{csv,md} (one row per setting and method),
e1_tabular_comparison.{csv,md} (method - DPO with CIs), e1_tabular_headline.md
(the table in docs/results.md), e1_tabular_runtime.json.

Runs go to experiments/runs/e1/ (recreated only when missing or incomplete, so an
interrupted full run continues where it stopped).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

import common

FIGURES = [
    "figures/e1_tabular_trajectories.png",
    "figures/e1_tabular_grid.png",
    "figures/e1_tabular_summary.csv",
    "figures/e1_tabular_summary.md",
    "figures/e1_tabular_comparison.csv",
    "figures/e1_tabular_comparison.md",
    "figures/e1_tabular_headline.md",
    "figures/e1_tabular_runtime.json",
]

LOSSES = ("dpo", "balanced", "adadpo")
NAMES = {"dpo": "DPO", "balanced": "Balanced-DPO", "adadpo": "AdaDPO"}
FULL = dict(seeds=range(10), betas=(0.1, 0.5, 1.0), optimizers={"sgd": (10.0, 50.0), "adam": (0.01, 0.1)}, steps=400, eval_every=10)
SMOKE = dict(seeds=range(2), betas=(0.5,), optimizers={"sgd": (10.0,), "adam": (0.01,)}, steps=40, eval_every=10)
REPRESENTATIVE = ("adam", 0.01)  # optimizer and lr of the trajectory figure (all betas)
KL_LEVEL = 0.8  # "steps to reach a KL level": KL(pi || pi*) <= 0.8 x its value at the reference policy
HEADLINE_METRICS = (("kl_to_optimum_final", "final KL"), ("kl_to_optimum_min", "min KL"), ("true_reward_final", "reward"))
SUMMARY_MEAN = {"kl_to_optimum_final": "kl_final_mean", "kl_to_optimum_min": "kl_min_mean", "true_reward_final": "true_reward_final_mean"}
COMPARED = (
    "kl_to_optimum_final", "kl_to_optimum_min", "true_reward_final", "ood_mass_final", "ratio_median", "steps_to_kl_level",
    "kl_to_ref_final", "loss_spikes", "grad_norm_spikes",
)  # fmt: skip


def run_dir(out: Path, opt: str, lr: float, beta: float, loss: str, seed: int) -> Path:
    return out / f"{opt}-lr{lr:g}" / f"beta{beta:g}" / loss / f"s{seed}"


def record_grid(args, grid) -> list[dict]:
    """Every run of the grid; one environment per seed, shared by all its runs."""
    from gradlens.record.config import RecordConfig, validate, with_env_defaults
    from gradlens.record.envs import build_env

    settings = [(opt, lr, beta, loss) for opt, lrs in grid["optimizers"].items() for lr in lrs for beta in grid["betas"] for loss in LOSSES]
    index = []
    for seed in grid["seeds"]:
        env = build_env(validate(with_env_defaults(RecordConfig(env="tabular", seed=seed))), log=lambda m: None)
        for opt, lr, beta, loss in settings:
            cfg = RecordConfig(
                env="tabular", loss=loss, beta=beta, lr=lr, optimizer=opt, seed=seed,
                steps=grid["steps"], eval_every=grid["eval_every"], layers_every=grid["eval_every"], checkpoint_every=0,
            )  # fmt: skip
            path = run_dir(args.out, opt, lr, beta, loss, seed)
            status = common.record(cfg, path, env)
            if status not in ("complete", "kept"):
                print(f"warning: {path}: {status}")
            index.append(dict(optimizer=opt, lr=lr, beta=beta, loss=loss, seed=seed, path=path, kept=status == "kept"))
        print(f"seed {seed}: {len(settings)} runs", flush=True)
    return index


def per_run_metrics(index: list[dict]) -> pd.DataFrame:
    """gradlens.analysis metrics of every run, plus steps to the KL level."""
    from gradlens.analysis import run_metrics, steps_to_level
    from gradlens.analysis.convergence import KL_TO_OPTIMUM
    from gradlens.runs import load_run

    rows = []
    for item in index:
        run = load_run(item["path"])
        evals = run.evals
        metrics = run_metrics(run.steps, evals)
        # steps_to_level looks for value >= level; KL must fall, so negate it.
        level = KL_LEVEL * metrics["kl_to_optimum_initial"]
        reached = steps_to_level(evals.assign(neg_kl=-evals[KL_TO_OPTIMUM]), -level, "neg_kl")
        metrics["steps_to_kl_level"] = np.nan if reached is None else float(reached)
        rows.append({**{k: v for k, v in item.items() if k not in ("path", "kept")}, "path": str(item["path"]), **metrics})
    return pd.DataFrame(rows)


def summary_table(per_run: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (opt, lr, beta, loss), g in per_run.groupby(["optimizer", "lr", "beta", "loss"], sort=False):
        reached = g["steps_to_kl_level"].notna()
        rows.append({
            "optimizer": opt, "lr": lr, "beta": beta, "method": NAMES[loss], "n_seeds": len(g),
            "kl_initial_mean": g["kl_to_optimum_initial"].mean(),
            "kl_final_mean": g["kl_to_optimum_final"].mean(), "kl_final_sd": g["kl_to_optimum_final"].std(),
            "kl_min_mean": g["kl_to_optimum_min"].mean(), "kl_min_sd": g["kl_to_optimum_min"].std(),
            "true_reward_final_mean": g["true_reward_final"].mean(), "true_reward_final_sd": g["true_reward_final"].std(),
            "ood_mass_final_mean": g["ood_mass_final"].mean(), "ood_mass_final_sd": g["ood_mass_final"].std(),
            "kl_to_ref_final_mean": g["kl_to_ref_final"].mean(),
            "ratio_median_median": g["ratio_median"].median(), "dominated_frac_mean": g["dominated_frac"].mean(),
            "steps_to_kl_level_median": g.loc[reached, "steps_to_kl_level"].median() if reached.any() else np.nan,
            "kl_level_reached": f"{int(reached.sum())}/{len(g)}",
            "loss_spikes_mean": g["loss_spikes"].mean(), "nonfinite_steps": int(g["nonfinite_steps"].sum()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def comparison_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Each method minus DPO, seed by seed, with a 95 % bootstrap CI over seeds."""
    rows = []
    for (opt, lr, beta), g in per_run.groupby(["optimizer", "lr", "beta"], sort=False):
        base = g[g["loss"] == "dpo"].set_index("seed")
        for loss in LOSSES[1:]:
            other = g[g["loss"] == loss].set_index("seed").reindex(base.index)
            for metric in COMPARED:
                diff, low, high = common.paired_ci(other[metric], base[metric])
                ok = np.isfinite(other[metric].to_numpy(float) - base[metric].to_numpy(float))
                rows.append(dict(
                    optimizer=opt, lr=lr, beta=beta, method=NAMES[loss], metric=metric,
                    dpo_mean=base.loc[ok, metric].mean(), method_mean=other.loc[ok, metric].mean(),
                    diff=diff, ci_low=low, ci_high=high, n_pairs=int(ok.sum()),
                    method_better=_better(metric, low, high),
                ))  # fmt: skip
    return pd.DataFrame(rows)


def _better(metric: str, low: float, high: float) -> str:
    """'yes' / 'no' when the CI excludes 0 in the good / bad direction, '~' otherwise."""
    if not (np.isfinite(low) and np.isfinite(high)) or metric in ("ratio_median", "kl_to_ref_final", "ood_mass_final", "grad_norm_spikes"):
        return ""
    lower_is_better = metric != "true_reward_final"
    if low > 0:
        return "no" if lower_is_better else "yes"
    if high < 0:
        return "yes" if lower_is_better else "no"
    return "~"


def headline(comparison: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """The docs/results.md table: per setting, DPO's mean and each method's paired difference [95 % CI]."""
    rows = []
    for (opt, lr, beta), g in comparison.groupby(["optimizer", "lr", "beta"], sort=False):
        s = summary[(summary.optimizer == opt) & (summary.lr == lr) & (summary.beta == beta)].set_index("method")
        row = {"optimizer": opt, "lr": f"{lr:g}", "β": f"{beta:g}"}
        for metric, label in HEADLINE_METRICS:
            mean, sd = s.loc["DPO", SUMMARY_MEAN[metric]], s.loc["DPO", SUMMARY_MEAN[metric].replace("_mean", "_sd")]
            row[f"DPO {label}"] = f"{mean:.3g} ± {sd:.2g}"
            for method, short in (("Balanced-DPO", "Bal"), ("AdaDPO", "Ada")):
                c = g[(g.method == method) & (g.metric == metric)].iloc[0]
                row[f"Δ{label} {short}"] = common.fmt_ci(c["diff"], c["ci_low"], c["ci_high"], 2)
        rows.append(row)
    return pd.DataFrame(rows)


def fig_trajectories(per_run: pd.DataFrame, grid, figures: Path) -> Path:
    """rho_t, KL(pi || pi*) and OOD mass over training for the representative optimizer/lr, one column per beta."""
    from gradlens.plot.draw import add_legend, draw_seeds, legend_label, ratio_axis, step_axis
    from gradlens.plot.style import apply_style, line_style, plt
    from gradlens.runs import schema
    from gradlens.runs import load_run

    opt, lr = REPRESENTATIVE
    betas = list(grid["betas"])
    apply_style()
    fig, axes = plt.subplots(3, len(betas), figsize=(4.6 * len(betas), 9.0), squeeze=False, layout="constrained")
    for j, beta in enumerate(betas):
        for loss in LOSSES:
            sel = per_run[(per_run.optimizer == opt) & (per_run.lr == lr) & (per_run.beta == beta) & (per_run.loss == loss)]
            runs = [load_run(p) for p in sel["path"]]
            label = legend_label(NAMES[loss], len(runs))
            kw = dict(color=line_style(loss, LOSSES)["color"], label=label)
            draw_seeds(axes[0, j], [r.steps for r in runs], schema.GRAD_RATIO, positive=True, smooth=5, **kw)
            draw_seeds(axes[1, j], [r.evals for r in runs], "eval/kl_to_optimum", positive=True, **kw)
            draw_seeds(axes[2, j], [r.evals for r in runs], "eval/ood_mass", **kw)
        ratio_axis(axes[0, j])
        axes[0, j].axhline(1.0, color="black", linestyle=":", linewidth=1.0)
        axes[0, j].set_title(f"β = {beta:g}")
        for ax in axes[:, j]:
            step_axis(ax)
    axes[0, 0].set_ylabel("ρ_t = ‖g_rej‖ / ‖g_cho‖ (log)")
    axes[1, 0].set_ylabel("KL(π_θ ‖ π*) (nats)")
    axes[2, 0].set_ylabel("OOD mass")
    add_legend(axes[1, 0], fontsize=8)
    fig.suptitle(f"E1 tabular, {opt} lr={lr:g}: imbalance, distance to π*, OOD mass ({len(grid['seeds'])} seeds)", fontsize=12)
    fig.text(0.5, -0.01, "line: median over seeds · band: interquartile range · faint lines: seeds · ρ smoothed over 5 steps for drawing",
             ha="center", va="top", fontsize=8, color="#444444")  # fmt: skip
    return common.save(fig, figures, "e1_tabular_trajectories")


def fig_grid(comparison: pd.DataFrame, grid, figures: Path) -> Path:
    """Paired differences from DPO (final KL to pi*, final true reward) with 95 % CIs, every setting."""
    from gradlens.plot.style import apply_style, line_style, plt

    settings = [(opt, lr) for opt, lrs in grid["optimizers"].items() for lr in lrs]
    metrics = (("kl_to_optimum_final", "Δ final KL(π_θ‖π*) vs DPO"), ("kl_to_optimum_min", "Δ min KL(π_θ‖π*) vs DPO"), ("true_reward_final", "Δ final true reward vs DPO"))
    betas = list(grid["betas"])
    apply_style()
    fig, axes = plt.subplots(len(metrics), len(settings), figsize=(3.6 * len(settings), 2.9 * len(metrics)), squeeze=False, layout="constrained", sharex=True)
    for j, (opt, lr) in enumerate(settings):
        for i, (metric, label) in enumerate(metrics):
            ax = axes[i, j]
            for k, (loss, method) in enumerate((("balanced", "Balanced-DPO"), ("adadpo", "AdaDPO"))):
                sel = comparison[(comparison.optimizer == opt) & (comparison.lr == lr) & (comparison.metric == metric) & (comparison.method == method)]
                sel = sel.set_index("beta").reindex(betas)
                x = np.arange(len(betas)) + (k - 0.5) * 0.22
                y = sel["diff"].to_numpy(float)
                err = np.vstack([y - sel["ci_low"].to_numpy(float), sel["ci_high"].to_numpy(float) - y])
                ax.errorbar(x, y, yerr=err, fmt="o", color=line_style(loss, LOSSES)["color"], capsize=3, markersize=5, label=method)
            ax.axhline(0.0, color="black", linewidth=1.0)
            ax.set_xticks(range(len(betas)), [f"β={b:g}" for b in betas])
            ax.set_xlim(-0.5, len(betas) - 0.5)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
            if i == 0:
                ax.set_title(f"{opt}, lr={lr:g}")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("E1: each method minus DPO, paired by seed (mean, 95% bootstrap CI over seeds)", fontsize=12)
    fig.text(0.5, -0.01, "below 0 is better for KL, above 0 is better for reward", ha="center", va="top", fontsize=8, color="#444444")
    return common.save(fig, figures, "e1_tabular_grid")


def standard_report(args, grid) -> None:
    """`gradlens plot` on one setting (all its figures and tables), for browsing; not committed."""
    from gradlens.cli import main

    opt, lr = REPRESENTATIVE
    beta = 0.5 if 0.5 in grid["betas"] else grid["betas"][0]
    paths = [str(args.out / f"{opt}-lr{lr:g}" / f"beta{beta:g}" / loss) for loss in LOSSES]
    if main(["plot", *paths, "--out", str(args.out / f"plot-{opt}-lr{lr:g}-beta{beta:g}"), "--smooth", "0"]) != 0:
        raise SystemExit("gradlens plot failed on the representative setting")


def main() -> None:
    args = common.parse_args(__doc__, "e1")
    common.quiet_threads()
    grid = SMOKE if args.smoke else FULL
    timer = common.Timer()
    index = record_grid(args, grid)
    timer.lap("record")
    per_run = per_run_metrics(index)
    per_run.to_csv(args.out / "per_run.csv", index=False)
    summary = summary_table(per_run)
    comparison = comparison_table(per_run)
    common.write_tables(summary, args.figures, "e1_tabular_summary")
    common.write_tables(comparison, args.figures, "e1_tabular_comparison")
    from gradlens.plot.report import to_markdown

    (args.figures / "e1_tabular_headline.md").write_text(to_markdown(headline(comparison, summary)))
    timer.lap("analysis")
    fig_trajectories(per_run, grid, args.figures)
    fig_grid(comparison, grid, args.figures)
    standard_report(args, grid)
    timer.lap("figures")
    common.finish_training_experiment(args, timer, index, "e1_tabular", grid["steps"], FIGURES)
    print(f"E1 done: {len(index)} runs; results in {args.figures}")


if __name__ == "__main__":
    main()
