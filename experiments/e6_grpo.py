"""E6 -- positive vs negative samples in GRPO: rho = ||g_negative|| / ||g_positive|| and their cosine.

    python experiments/e6_grpo.py            # 2 settings x 5 seeds x 200 steps on the toy task, ~6 min on 2 shared cores
    python experiments/e6_grpo.py --smoke    # 2 settings x 2 seeds x 8 steps, seconds

What it does, all through gradlens's API:

1. ``gradlens record --loss grpo`` (``gradlens.record.grpo.record_grpo``) on the built-in
   toy task (``--env toy-grpo``: digit successor, verifier reward in [0, 1]), 8 prompts x
   8 completions per step, TRL's clipped ``grpo`` objective, AdamW lr 3e-3, 5 seeds, in
   two settings: ``default`` (no KL term, one optimizer step per generation batch, so the
   clip never binds) and ``kl+clip`` (KL coefficient 0.05 to the starting policy, two
   optimizer steps per generation batch, so the ratio moves and the clip acts).
   Every step's gradient is split exactly into the completions with positive advantage,
   those with negative advantage and (``kl+clip``: through the KL term) those with 0.
2. Per step: rho and cos(g_positive, g_negative). Per seed: the median of ln rho and the
   share of steps with rho > 1 ("negative samples dominate"), over the whole run and over
   its first and second half; the mean cosine; the final greedy reward. Across seeds: the
   mean of the per-seed medians of ln rho with a 95 % bootstrap interval over seeds.
3. A figure: rho (log axis) and the cosine over training, median over seeds with the IQR
   band, and the batch's verifier reward.

Outputs (figures/): e6_grpo.png, e6_grpo_per_step.csv (every step of every seed: the
per-seed data), e6_grpo_per_seed.{csv,md}, e6_grpo_phases.{csv,md} (the same quantities
per quarter of training, all seeds pooled), e6_grpo_headline.md, e6_grpo_runtime.json.
Runs go to experiments/runs/e6/ (not committed; a finished run is kept on a re-run).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

import common

FIGURES = [
    "figures/e6_grpo.png",
    "figures/e6_grpo_per_step.csv",
    "figures/e6_grpo_per_seed.csv",
    "figures/e6_grpo_per_seed.md",
    "figures/e6_grpo_phases.csv",
    "figures/e6_grpo_phases.md",
    "figures/e6_grpo_headline.md",
    "figures/e6_grpo_runtime.json",
]

SETTINGS = {"default": {}, "kl+clip": {"kl": 0.05, "iterations": 2}}  # name -> GRPOSettings overrides
FULL = dict(seeds=range(5), steps=200, eval_every=25)
SMOKE = dict(seeds=range(2), steps=8, eval_every=4)
COLUMNS = {  # steps.csv column -> the per-step table's name
    "step": "step", "reward": "reward", "grad_norm/positive": "norm_positive", "grad_norm/negative": "norm_negative",
    "grad/dot": "dot", "grad/cosine": "cosine", "grad/ratio": "rho", "counts/positive": "n_positive",
    "counts/negative": "n_negative", "counts/zero": "n_zero", "prompt_groups/no_signal": "groups_no_signal",
    "grad_norm/zero": "norm_zero",
}  # fmt: skip


def record_all(args, grid: dict) -> list[dict]:
    from gradlens.record.grpo import GRPOSettings, record_grpo
    from gradlens.runs import run_status

    index = []
    for name, overrides in SETTINGS.items():
        for seed in grid["seeds"]:
            path = args.out / (f"toy-grpo-s{seed}" if name == "default" else f"toy-grpo-{name.replace('+', '-')}-s{seed}")
            settings = GRPOSettings(seed=seed, steps=grid["steps"], eval_every=grid["eval_every"], **overrides)
            kept = run_status(path, settings.steps) is not None
            if not kept:
                record_grpo(settings, path, log=print, tensorboard=False, overwrite=path.exists())
            index.append({"setting": name, "seed": seed, "path": str(path), "kept": kept})
    return index


def per_step(index: list[dict]) -> pd.DataFrame:
    from gradlens.runs import load_run

    frames = []
    for item in index:
        steps = load_run(item["path"]).steps[list(COLUMNS)].rename(columns=COLUMNS)
        frames.append(steps.assign(setting=item["setting"], seed=item["seed"]))
    table = pd.concat(frames, ignore_index=True)
    return table[["setting", "seed", *COLUMNS.values()]]


def per_seed(table: pd.DataFrame, index: list[dict]) -> pd.DataFrame:
    from gradlens.runs import load_run

    rows = []
    for (setting, seed), steps in table.groupby(["setting", "seed"], sort=False):
        rho = steps["rho"].to_numpy(float)
        ok = np.isfinite(rho) & (rho > 0)  # a step where a group is empty has no rho
        half = len(steps) // 2
        evals = load_run(next(i["path"] for i in index if i["seed"] == seed and i["setting"] == setting)).evals
        rows.append({
            "setting": setting,
            "seed": int(seed),
            "steps_with_rho": int(ok.sum()),
            "median_ln_rho": float(np.median(np.log(rho[ok]))),
            "median_ln_rho_first_half": float(np.median(np.log(rho[:half][ok[:half]]))) if ok[:half].any() else math.nan,
            "median_ln_rho_second_half": float(np.median(np.log(rho[half:][ok[half:]]))) if ok[half:].any() else math.nan,
            "share_rho_above_1": float((rho[ok] > 1).mean()),
            "mean_cosine": float(np.nanmean(steps["cosine"].to_numpy(float))),
            "mean_negatives_per_step": float(steps["n_negative"].mean()),
            "mean_positives_per_step": float(steps["n_positive"].mean()),
            "greedy_reward_start": float(evals["eval/true_reward"].iloc[0]),
            "greedy_reward_final": float(evals["eval/true_reward"].iloc[-1]),
        })  # fmt: skip
    return pd.DataFrame(rows)


def phases(table: pd.DataFrame, parts: int = 4) -> pd.DataFrame:
    """Per setting and quarter of training (all seeds' steps pooled): medians of rho, cosine and the
    norms, the share of steps with rho > 1, the mean batch reward and the mean count of each sign."""
    steps = int(table["step"].max()) + 1
    edges = np.linspace(0, steps, parts + 1).round().astype(int)
    rows = []
    for setting, runs in table.groupby("setting", sort=False):
        for lo, hi in zip(edges[:-1], edges[1:]):
            part = runs[(runs["step"] >= lo) & (runs["step"] < hi)]
            rho = part["rho"][np.isfinite(part["rho"]) & (part["rho"] > 0)]
            rows.append({
                "setting": setting, "steps": f"{lo}-{hi - 1}", "median_rho": rho.median(), "share_rho_above_1": (rho > 1).mean(),
                "median_cosine": part["cosine"].median(), "median_norm_positive": part["norm_positive"].median(),
                "median_norm_negative": part["norm_negative"].median(), "median_norm_zero": part["norm_zero"].median(),
                "mean_reward": part["reward"].mean(), "mean_positive": part["n_positive"].mean(),
                "mean_negative": part["n_negative"].mean(), "mean_zero": part["n_zero"].mean(),
            })  # fmt: skip
    return pd.DataFrame(rows)


def bootstrap_mean(values: np.ndarray, seed: int = 0, draws: int = 10_000) -> tuple[float, float, float]:
    """Mean over seeds and its 95 % percentile bootstrap interval."""
    values = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(draws, len(values)), replace=True).mean(axis=1)
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def headline(seeds: pd.DataFrame) -> str:
    names = list(dict.fromkeys(seeds["setting"]))
    lines = ["| quantity (mean over seeds, 95 % bootstrap CI over seeds) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]  # fmt: skip
    for column, label in (
        ("median_ln_rho", "median ln rho over the run (> 0: negatives dominate)"),
        ("median_ln_rho_first_half", "median ln rho, first half"),
        ("median_ln_rho_second_half", "median ln rho, second half"),
        ("share_rho_above_1", "share of steps with rho > 1"),
        ("mean_cosine", "mean cos(g_positive, g_negative)"),
        ("greedy_reward_final", "final greedy verifier reward (start: 1/7)"),
    ):
        cells = []
        for name in names:
            mean, low, high = bootstrap_mean(seeds.loc[seeds["setting"] == name, column].dropna().to_numpy())
            cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rhos = [f"{math.exp(bootstrap_mean(seeds.loc[seeds['setting'] == n, 'median_ln_rho'].to_numpy())[0]):.3f}" for n in names]
    lines.append("| rho = exp(mean median ln rho) | " + " | ".join(rhos) + " |")
    return "\n".join(lines) + f"\n\n{seeds['seed'].nunique()} seeds per setting.\n"


def figure(table: pd.DataFrame, figures: Path) -> Path:
    from gradlens.plot.draw import draw_seeds
    from gradlens.plot.style import apply_style, color_for, plt

    apply_style()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for k, (setting, runs) in enumerate(table.groupby("setting", sort=False)):
        frames = [steps for _, steps in runs.groupby("seed")]
        color = color_for(k)
        draw_seeds(axes[0], frames, "rho", color=color, label=setting, positive=True)
        draw_seeds(axes[1], frames, "cosine", color=color, label=setting)
        draw_seeds(axes[2], frames, "reward", color=color, label=setting)
    axes[0].set_yscale("log")
    axes[0].axhline(1.0, color="0.4", lw=0.8, ls=":")
    axes[0].set_title("rho = |g_negative| / |g_positive| (> 1: negatives dominate)", fontsize=10)
    axes[1].axhline(0.0, color="0.4", lw=0.8, ls=":")
    axes[1].set_title("cos(g_positive, g_negative)", fontsize=10)
    axes[2].set_title("verifier reward of the sampled batch", fontsize=10)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(loc="best", fontsize=8)
    seeds = table.groupby("setting")["seed"].nunique().max()
    fig.suptitle(f"E6: GRPO on the toy task (toy-grpo), {seeds} seeds per setting: median and IQR over seeds", fontsize=10)
    fig.tight_layout()
    return common.save(fig, figures, "e6_grpo")


def main() -> None:
    args = common.parse_args(__doc__.split("\n")[0], "e6")
    common.quiet_threads()
    grid = SMOKE if args.smoke else FULL
    timer = common.Timer()
    index = record_all(args, grid)
    timer.lap("train")
    table = per_step(index)
    table.to_csv(args.figures / "e6_grpo_per_step.csv", index=False)
    seeds = per_seed(table, index)
    common.write_tables(seeds, args.figures, "e6_grpo_per_seed")
    common.write_tables(phases(table), args.figures, "e6_grpo_phases")
    (args.figures / "e6_grpo_headline.md").write_text(headline(seeds), encoding="utf-8")
    figure(table, args.figures)
    timer.lap("analysis")
    common.finish_training_experiment(args, timer, index, "e6_grpo", grid["steps"], FIGURES)


if __name__ == "__main__":
    main()
