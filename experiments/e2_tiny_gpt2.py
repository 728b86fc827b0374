"""E2 -- DPO against Balanced-DPO on a tiny GPT-2 with a ground-truth reward.

    python experiments/e2_tiny_gpt2.py            # 10 seeds x 3 betas x 3 methods = 90 runs, ~10 min on 2 cores
    python experiments/e2_tiny_gpt2.py --smoke    # 3 very short runs on a barely warm-started model

What it does, all through gradlens's API:

1. ``gradlens record --env tiny-gpt2`` (``record_run``): a 2-layer GPT-2 built from a
   config, SFT warm-started on a synthetic bigram language (300 steps), then DPO,
   Balanced-DPO (gradlens's definition, weights from sequence log-probs) and
   Balanced-DPO with ``balance_space="token_mean"`` (weights from per-token mean
   log-probs), AdamW lr 1e-3, batch 16, 200 steps, for beta in {0.05, 0.1, 0.5} and
   seeds 0-9. A seed fixes the language, the warm start, the 512 training pairs and
   their order, so the methods of one seed start from the same model and see the same
   batches. Evaluations
   every 20 steps: the true reward of 64 sampled completions, the Monte-Carlo
   KL(pi_theta || pi_ref) on those samples, held-out log-probs and accuracy.
   Per-layer chosen/rejected norms every 5 steps.
2. ``gradlens.analysis.summarize_groups`` per beta: rho, likelihood displacement
   (chosen log-prob change and the fraction of steps it falls), stability (spikes,
   non-finite steps, collapses: held-out chosen log-prob down by > 50 nats), reward and
   KL; paired bootstrap CIs (each Balanced-DPO variant - DPO, per seed).
3. Figures with ``gradlens.plot``: the reward-KL frontier and the chosen/rejected
   log-prob trajectories (``draw.draw_seeds``, ``analysis.seed_matrix``), and the
   standard ``gradlens plot`` report (DPO vs Balanced-DPO) for each beta under
   experiments/runs/e2/plot-beta*/; its per-layer heatmap and rho figure for
   beta = 0.1 are copied to figures/.

Outputs (figures/): e2_tiny_gpt2_frontier.png, e2_tiny_gpt2_logps.png,
e2_tiny_gpt2_layer_heatmap.png, e2_tiny_gpt2_ratio.png, e2_tiny_gpt2_summary.{csv,md},
e2_tiny_gpt2_comparison.{csv,md}, e2_tiny_gpt2_layers.{csv,md}, e2_tiny_gpt2_headline.md,
e2_tiny_gpt2_runtime.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

import common

FIGURES = [
    "figures/e2_tiny_gpt2_frontier.png",
    "figures/e2_tiny_gpt2_logps.png",
    "figures/e2_tiny_gpt2_layer_heatmap.png",
    "figures/e2_tiny_gpt2_ratio.png",
    "figures/e2_tiny_gpt2_summary.csv",
    "figures/e2_tiny_gpt2_summary.md",
    "figures/e2_tiny_gpt2_comparison.csv",
    "figures/e2_tiny_gpt2_comparison.md",
    "figures/e2_tiny_gpt2_layers.csv",
    "figures/e2_tiny_gpt2_layers.md",
    "figures/e2_tiny_gpt2_headline.md",
    "figures/e2_tiny_gpt2_runtime.json",
]

# method -> RecordConfig fields; "balanced-tm": Balanced-DPO with weights from per-token mean log-probs.
METHODS = {
    "dpo": dict(loss="dpo"),
    "balanced": dict(loss="balanced"),
    "balanced-tm": dict(loss="balanced", balance_space="token_mean"),
}
NAMES = {"dpo": "DPO", "balanced": "Balanced-DPO", "balanced-tm": "Balanced-DPO (token-mean)"}
LOGP_FLOOR = -45.0  # y-axis floor of the log-prob figure
COLLAPSE_NATS = -50.0  # a run "collapsed" when its held-out chosen log-prob fell by more than this
FULL = dict(seeds=range(10), betas=(0.05, 0.1, 0.5), steps=200, eval_every=20, layers_every=5, sft_steps=None)
SMOKE = dict(seeds=range(1), betas=(0.1,), steps=8, eval_every=4, layers_every=2, sft_steps=20)
HEATMAP_BETA = 0.1  # the beta whose per-layer heatmap and rho figure are committed
COMPARED = (
    "true_reward_final", "kl_to_ref_final", "reward_gain_per_kl", "pref_accuracy_final",
    "heldout_chosen_change", "heldout_rejected_change", "heldout_chosen_fall_frac",
    "chosen_logp_change", "rejected_logp_change", "chosen_logp_fall_frac", "ratio_median", "cosine_median",
    "loss_spikes", "grad_norm_spikes", "nonfinite_steps",
)  # fmt: skip
MATCHED_KL = "true_reward_at_same_kl"  # final reward minus DPO's reward at the same KL to the reference
HEADLINE = (
    ("true_reward_final", "true reward"), ("kl_to_ref_final", "KL to ref"), ("pref_accuracy_final", "held-out acc."),
    ("heldout_chosen_change", "Δ log p(chosen), held-out"), ("heldout_rejected_change", "Δ log p(rejected), held-out"),
    ("ratio_median", "median ρ"),
)  # fmt: skip


def run_dir(out: Path, beta: float, method: str, seed: int) -> Path:
    return out / f"beta{beta:g}" / method / f"s{seed}"


def record_grid(args, grid) -> list[dict]:
    """Every run; one environment (synthetic language + SFT warm start) per seed."""
    from gradlens.record.config import RecordConfig, validate, with_env_defaults
    from gradlens.record.envs import build_env

    index = []
    for seed in grid["seeds"]:
        base = validate(with_env_defaults(RecordConfig(env="tiny-gpt2", seed=seed, sft_steps=grid["sft_steps"])))
        env = None
        for beta in grid["betas"]:
            for method, fields in METHODS.items():
                path = run_dir(args.out, beta, method, seed)
                cfg = RecordConfig(
                    env="tiny-gpt2", **fields, beta=beta, seed=seed, steps=grid["steps"], sft_steps=base.sft_steps,
                    eval_every=grid["eval_every"], layers_every=grid["layers_every"], checkpoint_every=0,
                )  # fmt: skip
                if env is None and not common.is_done(path, grid["steps"]):
                    env = build_env(base, log=print)  # the SFT warm start is paid only if a run of this seed is missing
                status = common.record(cfg, path, env)
                if status not in ("complete", "kept"):
                    print(f"warning: {path}: {status}")
                index.append(dict(beta=beta, method=method, seed=seed, path=path, kept=status == "kept"))
                print(f"seed {seed} beta {beta:g} {method}: {status}", flush=True)
    return index


def summarize(index: list[dict]):
    """gradlens.analysis.summarize_groups per beta; returns (per-run table, per-layer table)."""
    from gradlens.analysis import likelihood_displacement, summarize_groups
    from gradlens.runs import load_run

    per_run, layers = [], []
    for beta in sorted({i["beta"] for i in index}):
        groups = {NAMES[m]: [load_run(i["path"]) for i in index if i["beta"] == beta and i["method"] == m] for m in METHODS}
        result = summarize_groups(groups, baseline="DPO")
        # Likelihood displacement on the fixed held-out pairs (the training-batch log-probs
        # change with the batch); same gradlens function, evals table instead of steps.
        heldout = []
        for runs in groups.values():
            for run in runs:
                chosen = likelihood_displacement(run.evals, "eval/logps/chosen")
                rejected = likelihood_displacement(run.evals, "eval/logps/rejected")
                heldout.append(dict(heldout_chosen_change=chosen["net_change"], heldout_chosen_fall_frac=chosen["fall_frac"],
                                    heldout_rejected_change=rejected["net_change"],
                                    collapsed=float(chosen["net_change"] < COLLAPSE_NATS)))
        result.per_run[list(heldout[0])] = pd.DataFrame(heldout).to_numpy()
        # Frontier comparison at equal KL: DPO's true reward (same seed) where its
        # evaluation path first reaches this run's final KL to the reference.
        dpo = {run.config["seed"]: run.evals for run in groups["DPO"]}
        result.per_run["dpo_reward_at_same_kl"] = [
            reward_along_path(dpo[seed], kl) for seed, kl in zip(result.per_run["seed"], result.per_run["kl_to_ref_final"])
        ]
        per_run.append(result.per_run.assign(beta=beta))
        if not result.layers.empty:
            layers.append(result.layers.assign(beta=beta))
    return pd.concat(per_run, ignore_index=True), (pd.concat(layers, ignore_index=True) if layers else pd.DataFrame())


def reward_along_path(evals: pd.DataFrame, kl: float) -> float:
    """True reward where the evaluation path (in step order) first reaches KL ``kl``,
    linearly interpolated between evaluations; NaN when the path never gets there."""
    path_kl = evals["eval/kl_to_ref"].to_numpy(float)
    reward = evals["eval/true_reward"].to_numpy(float)
    if not np.isfinite(kl):
        return float("nan")
    if kl <= path_kl[0]:
        return float(reward[0])
    above = np.flatnonzero(path_kl >= kl)
    if above.size == 0:
        return float("nan")
    i = int(above[0])
    t = (kl - path_kl[i - 1]) / (path_kl[i] - path_kl[i - 1])
    return float(reward[i - 1] + t * (reward[i] - reward[i - 1]))


def summary_table(per_run: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (beta, method), g in per_run.groupby(["beta", "group"], sort=False):
        row = {"beta": beta, "method": method, "n_seeds": len(g), "collapsed_runs": f"{int(g['collapsed'].sum())}/{len(g)}"}
        for metric in COMPARED:
            if metric in g.columns:
                row[f"{metric}_mean"] = g[metric].mean()
                row[f"{metric}_sd"] = g[metric].std()
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Each Balanced-DPO variant minus DPO, seed by seed, with a 95 % bootstrap CI over seeds."""
    rows = []
    for beta, g in per_run.groupby("beta", sort=True):
        base = g[g.group == "DPO"].set_index("seed")
        for method in list(NAMES.values())[1:]:
            other = g[g.group == method].set_index("seed").reindex(base.index)
            for metric in COMPARED:
                if metric not in g.columns:
                    continue
                diff, low, high = common.paired_ci(other[metric], base[metric])
                ok = np.isfinite(other[metric].to_numpy(float) - base[metric].to_numpy(float))
                rows.append(dict(beta=beta, method=method, metric=metric, dpo_mean=base[metric].mean(), method_mean=other[metric].mean(),
                                 diff=diff, ci_low=low, ci_high=high, n_pairs=int(ok.sum())))
            # Reward at equal KL: this run's final reward against DPO's reward on its own
            # path at the same KL (seed by seed).
            diff, low, high = common.paired_ci(other["true_reward_final"], other["dpo_reward_at_same_kl"])
            ok = np.isfinite(other["true_reward_final"].to_numpy(float) - other["dpo_reward_at_same_kl"].to_numpy(float))
            rows.append(dict(beta=beta, method=method, metric=MATCHED_KL, dpo_mean=other["dpo_reward_at_same_kl"].mean(),
                             method_mean=other["true_reward_final"].mean(), diff=diff, ci_low=low, ci_high=high, n_pairs=int(ok.sum())))
    return pd.DataFrame(rows)


def headline(summary: pd.DataFrame, comparison: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for beta, g in summary.groupby("beta", sort=True):
        s = g.set_index("method")
        for method in NAMES.values():
            row = {"β": f"{beta:g}", "method": method}
            for metric, label in HEADLINE:
                row[label] = f"{s.loc[method, metric + '_mean']:.3g} ± {s.loc[method, metric + '_sd']:.2g}"
            row["reward − DPO's at same KL"] = ""
            row["collapsed"] = s.loc[method, "collapsed_runs"]
            rows.append(row)
        for method, short in ((NAMES["balanced"], "Bal"), (NAMES["balanced-tm"], "Bal-tm")):
            row = {"β": f"{beta:g}", "method": f"Δ {short} − DPO [95% CI]"}
            for metric, label in HEADLINE:
                c = comparison[(comparison.beta == beta) & (comparison.method == method) & (comparison.metric == metric)].iloc[0]
                row[label] = common.fmt_ci(c["diff"], c["ci_low"], c["ci_high"], 2)
            c = comparison[(comparison.beta == beta) & (comparison.method == method) & (comparison.metric == MATCHED_KL)].iloc[0]
            row["reward − DPO's at same KL"] = common.fmt_ci(c["diff"], c["ci_low"], c["ci_high"], 2) + f" (n={c['n_pairs']})"
            row["collapsed"] = ""
            rows.append(row)
    return pd.DataFrame(rows)


def _runs(index, beta, method):
    from gradlens.runs import load_run

    return [load_run(i["path"]) for i in index if i["beta"] == beta and i["method"] == method]


def fig_frontier(index: list[dict], figures: Path) -> Path:
    """True reward against KL(pi || pi_ref) along training, one panel per beta."""
    from gradlens.analysis import row_quantiles, seed_matrix
    from gradlens.plot.draw import legend_label
    from gradlens.plot.style import apply_style, line_style, plt

    betas = sorted({i["beta"] for i in index})
    apply_style()
    fig, axes = plt.subplots(1, len(betas), figsize=(4.8 * len(betas), 4.2), squeeze=False, layout="constrained", sharey=True)
    for ax, beta in zip(axes[0], betas):
        for method in METHODS:
            evals = [r.evals for r in _runs(index, beta, method)]
            _, kl = seed_matrix(evals, "eval/kl_to_ref")
            _, reward = seed_matrix(evals, "eval/true_reward")
            color = line_style(method, METHODS)["color"]
            for j in range(kl.shape[1]):
                ax.plot(kl[:, j], reward[:, j], color=color, alpha=0.2, linewidth=0.7)
            kmed = row_quantiles(kl, [0.5])[0]
            rq = row_quantiles(reward, [0.25, 0.5, 0.75])
            ax.errorbar(kmed, rq[1], yerr=[rq[1] - rq[0], rq[2] - rq[1]], color=color, marker="o", markersize=3.5,
                        linewidth=1.6, elinewidth=0.7, label=legend_label(NAMES[method], kl.shape[1]))  # fmt: skip
            ax.plot(kmed[-1:], rq[1][-1:], color=color, marker="*", markersize=12, linestyle="none")
        ax.set_title(f"β = {beta:g}")
        ax.set_xlabel("KL(π_θ ‖ π_ref) (nats, Monte-Carlo)")
    axes[0, 0].set_ylabel("true reward of samples")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle("E2 tiny-gpt2: true reward vs KL to the reference along training (star: last evaluation)", fontsize=12)
    fig.text(0.5, -0.01, "points: median over seeds per evaluation (every 20 steps) · bars: reward IQR · faint: seeds",
             ha="center", va="top", fontsize=8, color="#444444")  # fmt: skip
    return common.save(fig, figures, "e2_tiny_gpt2_frontier")


def fig_logps(index: list[dict], figures: Path) -> Path:
    """Held-out log-probs of chosen and rejected responses along training (likelihood displacement)."""
    from gradlens.plot.draw import add_legend, draw_seeds, step_axis
    from gradlens.plot.style import apply_style, line_style, plt

    betas = sorted({i["beta"] for i in index})
    apply_style()
    fig, axes = plt.subplots(1, len(betas), figsize=(4.8 * len(betas), 4.2), squeeze=False, layout="constrained", sharey=True)
    for ax, beta in zip(axes[0], betas):
        notes = []
        for method in METHODS:
            frames = [r.evals for r in _runs(index, beta, method)]
            fell = sum(f["eval/logps/chosen"].iloc[-1] - f["eval/logps/chosen"].iloc[0] < COLLAPSE_NATS for f in frames)
            if fell:
                notes.append(f"{NAMES[method]}: {fell}/{len(frames)} seeds collapse\n(chosen log p down > {-COLLAPSE_NATS:g} nats)")
            for part in ("chosen", "rejected"):  # one colour per method; solid chosen, dashed rejected
                style = line_style(method, METHODS, side=part)
                draw_seeds(ax, frames, f"eval/logps/{part}", color=style["color"], label=f"{NAMES[method]}: {part}", linestyle=style["linestyle"])
        ax.set_title(f"β = {beta:g}")
        step_axis(ax)
        if ax.get_ylim()[0] < LOGP_FLOOR:  # collapsed seeds would squash every other line
            ax.set_ylim(bottom=LOGP_FLOOR)
        if notes:
            ax.text(0.97, 0.5, "\n".join(notes), transform=ax.transAxes, ha="right", va="center", fontsize=8,
                    bbox=dict(facecolor="white", alpha=0.85, edgecolor="#999999"))
    axes[0, 0].set_ylabel("mean log π_θ(y|x) on 128 held-out pairs (nats)")
    add_legend(axes[0, 0], fontsize=8)
    fig.suptitle("E2 tiny-gpt2: held-out log-probabilities (colour: method; solid: chosen, dashed: rejected)", fontsize=11)
    fig.text(0.5, -0.01, f"line: median over seeds · band: IQR · faint: seeds · every 20 steps on fixed held-out pairs · y clipped at {LOGP_FLOOR:g} (collapsed seeds go below)",
             ha="center", va="top", fontsize=8, color="#444444")  # fmt: skip
    return common.save(fig, figures, "e2_tiny_gpt2_logps")


def standard_reports(args, index, figures: Path) -> None:
    """`gradlens plot` per beta (all standard figures, not committed); two of beta=0.1's are copied."""
    from gradlens.cli import main

    betas = sorted({i["beta"] for i in index})
    for beta in betas:
        out = args.out / f"plot-beta{beta:g}"
        paths = [str(args.out / f"beta{beta:g}" / method) for method in ("dpo", "balanced")]
        if main(["plot", *paths, "--out", str(out), "--smooth", "5"]) != 0:
            raise SystemExit(f"gradlens plot failed for beta={beta:g}")
    chosen = HEATMAP_BETA if HEATMAP_BETA in betas else betas[0]
    for name in ("layer_heatmap", "ratio"):
        shutil.copyfile(args.out / f"plot-beta{chosen:g}" / f"{name}.png", figures / f"e2_tiny_gpt2_{name}.png")
        common.shrink_png(figures / f"e2_tiny_gpt2_{name}.png")


def main() -> None:
    args = common.parse_args(__doc__, "e2")
    common.quiet_threads()
    grid = SMOKE if args.smoke else FULL
    timer = common.Timer()
    index = record_grid(args, grid)
    timer.lap("record")
    per_run, layers = summarize(index)
    per_run.to_csv(args.out / "per_run.csv", index=False)
    summary = summary_table(per_run)
    comparison = comparison_table(per_run)
    common.write_tables(summary, args.figures, "e2_tiny_gpt2_summary")
    common.write_tables(comparison, args.figures, "e2_tiny_gpt2_comparison")
    common.write_tables(layers, args.figures, "e2_tiny_gpt2_layers")
    from gradlens.plot.report import to_markdown

    (args.figures / "e2_tiny_gpt2_headline.md").write_text(to_markdown(headline(summary, comparison)))
    timer.lap("analysis")
    fig_frontier(index, args.figures)
    fig_logps(index, args.figures)
    standard_reports(args, index, args.figures)
    timer.lap("figures")
    common.finish_training_experiment(args, timer, index, "e2_tiny_gpt2", grid["steps"], FIGURES)
    print(f"E2 done: {len(index)} runs; results in {args.figures}")


if __name__ == "__main__":
    main()
