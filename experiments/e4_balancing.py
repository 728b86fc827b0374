"""E4 -- does *any* balancing help? A family of weightings and parameter-space balancing, tuned fairly.

    nice python experiments/e4_balancing.py                  # both parts (see FULL for the sizes)
    nice python experiments/e4_balancing.py --part tabular   # or --part gpt2: run the parts side by side
    nice python experiments/e4_balancing.py --part gpt2 --shard 0/2 &   # record in parallel processes,
    nice python experiments/e4_balancing.py --part gpt2 --shard 1/2     # then rerun without --shard
    python experiments/e4_balancing.py --smoke               # a few very short runs, for the tests

Methods (all registered in ``gradlens.losses.REWEIGHTINGS``, so ``gradlens record`` runs them too):

* the probability-space family a_w ∝ p_w^τ, a_l ∝ p_l^τ, a_w + a_l = 2
  (``--loss power --loss-option tau=τ``): τ = 0 is DPO, τ = 0.25, 0.5, and τ = 1 is
  Balanced-DPO (``balanced``); on tiny-gpt2 also τ = 1 with token-mean log-probs;
* parameter-space balancing ``norm_balanced``: DPO's loss, then the step's recorded
  chosen and rejected gradient pieces rescaled to equal norms (DPO's scale kept), over
  the whole model or per parameter tensor (``balance_scope=per_layer``; on the tabular
  policy, one tensor, the two are the same and only the global one is run).

Fair tuning: every method gets its own learning rate, chosen from ``lrs`` on
*tuning seeds* (different environments and data from the test seeds) by the
mean final DPO loss on the **held-out** pairs -- no ground-truth quantity is used
to choose. The chosen rate is then run on the test seeds (0..9), which all methods
share, so comparisons are paired by seed.

Measures:

* tabular (E1's setting): β·KL(π_θ‖π*) at the end of training -- the gap to the
  optimum of the KL-regularised objective E_π[r] − β KL(π‖π_ref), comparable across β;
  plus the share of π*'s mass on responses that appear in no training pair (no
  method trained on these pairs can put mass there on purpose).
* tiny-gpt2 (E2's setting): the true reward at a matched KL to π_ref (KL*: the
  smallest over methods of the median final KL, so most runs of every method reach
  it; interpolated along each run's evaluation path), and loss / gradient-norm
  spikes counted only up to the step where the run first reaches KL*.
* the step-time ratio of ``norm_balanced`` against DPO, both recorded, interleaved.

Statistics (``stats_table``): per test seed, method − DPO; mean, 95 % percentile
bootstrap and t intervals; paired t-test p-values, Holm-adjusted across each table.
A difference smaller than the metric's stated minimal effect size (MIN_EFFECT) is
reported as "negligible", not as a win or a loss.

Outputs (figures/): e4_tabular.png, e4_gpt2.png, e4_{tabular,gpt2}_stats.{csv,md},
e4_{tabular,gpt2}_tuning.{csv,md}, e4_step_time.md, e4_{tabular,gpt2}_runtime.json.
Runs go to experiments/runs/e4/ (finished runs are kept, so a re-run only re-analyses).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

import common

FIGURES = [
    "figures/e4_tabular.png",
    "figures/e4_gpt2.png",
    "figures/e4_tabular_summary.md",
    "figures/e4_gpt2_summary.md",
    "figures/e4_tabular_stats.csv",
    "figures/e4_tabular_stats.md",
    "figures/e4_tabular_stats_readable.md",
    "figures/e4_gpt2_stats.csv",
    "figures/e4_gpt2_stats.md",
    "figures/e4_gpt2_stats_readable.md",
    "figures/e4_tabular_tuning.csv",
    "figures/e4_tabular_tuning.md",
    "figures/e4_gpt2_tuning.csv",
    "figures/e4_gpt2_tuning.md",
    "figures/e4_step_time.csv",
    "figures/e4_step_time.md",
    "figures/e4_tabular_runtime.json",
    "figures/e4_gpt2_runtime.json",
]
# name -> (label, RecordConfig fields). Each name has its colour in gradlens.plot.style.METHOD_COLORS.
METHODS = {
    "dpo": ("DPO (τ=0)", dict(loss="dpo")),
    "tau0.25": ("τ=0.25", dict(loss="power", loss_options={"tau": 0.25})),
    "tau0.5": ("τ=0.5", dict(loss="power", loss_options={"tau": 0.5})),
    "balanced": ("Balanced-DPO (τ=1)", dict(loss="balanced")),
    "balanced-tm": ("τ=1, token-mean", dict(loss="balanced", balance_space="token_mean")),
    "norm": ("norm-balanced", dict(loss="norm_balanced")),
    "norm-layer": ("norm-balanced, per layer", dict(loss="norm_balanced", loss_options={"balance_scope": "per_layer"})),
}
PARTS = {
    # token-mean = sequence on one-token responses; per-layer = global on one tensor
    "tabular": dict(env="tabular", methods=("dpo", "tau0.25", "tau0.5", "balanced", "norm"), optimizer="adam"),
    "gpt2": dict(env="tiny-gpt2", methods=tuple(METHODS), optimizer="adamw"),
}
FULL = {
    "tabular": dict(betas=(0.1, 0.5), lrs=(0.003, 0.01, 0.03, 0.1), tune_seeds=(100, 101, 102), seeds=tuple(range(10)), steps=300, eval_every=10),
    "gpt2": dict(betas=(0.1,), lrs=(3e-4, 1e-3, 3e-3), tune_seeds=(100, 101), seeds=tuple(range(10)), steps=120, eval_every=10,
                 sft_steps=None, timing_reps=15),
}  # fmt: skip
SMOKE = {
    "tabular": dict(betas=(0.5,), lrs=(0.03, 0.1), tune_seeds=(100,), seeds=(0, 1), steps=20, eval_every=5),
    "gpt2": dict(betas=(0.1,), lrs=(1e-3,), tune_seeds=(100,), seeds=(0, 1), steps=4, eval_every=2, sft_steps=10, timing_reps=2),
}
# Below these the difference is reported as negligible (units of the metric).
MIN_EFFECT = {
    "beta_kl_to_optimum_final": 0.01,  # nats of the regularised objective: ~1 % of DPO's gap at β = 0.1, ~2 % at β = 0.5
    "true_reward_at_kl": 0.02,  # ~ a third of the seed SD of DPO's reward in E2
    "loss_spikes_to_kl": 1.0,  # spikes
    "grad_norm_spikes_to_kl": 1.0,
}
HIGHER_IS_BETTER = {"true_reward_at_kl"}
BOOT = 10_000


def run_dir(out: Path, part: str, beta: float, method: str, lr: float, seed: int) -> Path:
    return out / part / f"beta{beta:g}" / method / f"lr{lr:g}" / f"s{seed}"


# ---- recording -----------------------------------------------------------------------------------


class Envs:
    """One environment per seed, built only when a run of that seed is missing (the SFT warm start costs)."""

    def __init__(self, part: str, grid: dict):
        self.part, self.grid, self.cache = part, grid, {}

    def base(self, seed: int):
        from gradlens.record.config import RecordConfig, validate, with_env_defaults

        extra = {"sft_steps": self.grid["sft_steps"]} if "sft_steps" in self.grid else {}
        return validate(with_env_defaults(RecordConfig(env=PARTS[self.part]["env"], seed=seed, **extra)))

    def get(self, seed: int):
        from gradlens.record.envs import build_env

        if seed not in self.cache:
            self.cache.clear()  # one seed at a time: keep memory flat
            self.cache[seed] = build_env(self.base(seed), log=lambda m: None)
        return self.cache[seed]


def record_one(args, part: str, envs: Envs, method: str, beta: float, lr: float, seed: int) -> dict:
    from gradlens.record.config import RecordConfig

    grid = envs.grid
    base = envs.base(seed)
    cfg = RecordConfig(
        env=base.env, **METHODS[method][1], beta=beta, lr=lr, optimizer=PARTS[part]["optimizer"], seed=seed,
        steps=grid["steps"], eval_every=grid["eval_every"], layers_every=grid["steps"], checkpoint_every=0, sft_steps=base.sft_steps,
    )  # fmt: skip
    path = run_dir(args.out, part, beta, method, lr, seed)
    env = None if common.is_done(path, grid["steps"]) else envs.get(seed)
    status = common.record(cfg, path, env) if env is not None else "kept"
    if status not in ("complete", "kept"):
        print(f"warning: {path}: {status}", flush=True)
    return dict(part=part, method=method, beta=beta, lr=lr, seed=seed, path=path, kept=status == "kept")


def record_all(args, part: str, grid: dict, jobs: list[tuple]) -> list[dict]:
    """Record ``jobs`` (method, beta, lr, seed); with ``--shard K/N`` only the K-th of every N seeds, then wait for the other shards."""
    if args.finished_only:  # analyse what is there; a missing run is left out (and counted in n)
        done = [job for job in jobs if common.is_done(run_dir(args.out, part, job[1], job[0], job[2], job[3]), grid["steps"])]
        print(f"[{part}] --finished-only: {len(done)} of {len(jobs)} runs finished", flush=True)
        return [dict(part=part, method=m, beta=b, lr=lr, seed=s, path=run_dir(args.out, part, b, m, lr, s), kept=True) for m, b, lr, s in done]
    envs = Envs(part, grid)
    k, n = args.shard
    seeds = sorted({job[3] for job in jobs})
    mine = [job for job in jobs if seeds.index(job[3]) % n == k]  # whole seeds per shard: one SFT warm start each
    trained = {job for job in mine if not record_one(args, part, envs, *job)["kept"]}
    while not all(common.is_done(run_dir(args.out, part, beta, method, lr, seed), grid["steps"]) for method, beta, lr, seed in jobs):
        time.sleep(10)  # another shard is still recording its share
    return [dict(part=part, method=m, beta=b, lr=lr, seed=s, path=run_dir(args.out, part, b, m, lr, s),
                 kept=(m, b, lr, s) not in trained) for m, b, lr, s in jobs]


def tune(args, part: str, grid: dict) -> tuple[list[dict], pd.DataFrame]:
    """Every method x beta x lr on the tuning seeds; pick the lr with the lowest mean held-out DPO loss."""
    jobs = [(m, b, lr, s) for s in grid["tune_seeds"] for b in grid["betas"] for m in PARTS[part]["methods"] for lr in grid["lrs"]]
    index = record_all(args, part, grid, jobs)
    rows = []
    for item in index:
        evals = _load(item["path"]).evals
        final = float(evals["eval/dpo_loss"].iloc[-1]) if len(evals) else math.nan
        rows.append({**_keys(item), "heldout_dpo_loss": final if math.isfinite(final) else math.inf})
    frame = pd.DataFrame(rows)
    table = frame.groupby(["method", "beta", "lr"], sort=False)["heldout_dpo_loss"].mean().reset_index()
    table["chosen"] = False
    for (_, _), g in table.groupby(["method", "beta"], sort=False):
        table.loc[g["heldout_dpo_loss"].idxmin(), "chosen"] = True
    print(f"[{part}] tuning: {len(index)} runs", flush=True)
    return index, table


def test(args, part: str, grid: dict, tuning: pd.DataFrame) -> list[dict]:
    """Each method at its chosen lr on the shared test seeds."""
    chosen = {(r.method, r.beta): r.lr for r in tuning[tuning.chosen].itertuples()}
    jobs = [(m, b, chosen[(m, b)], s) for s in grid["seeds"] for b in grid["betas"] for m in PARTS[part]["methods"]]
    index = record_all(args, part, grid, jobs)
    print(f"[{part}] test: {len(index)} runs", flush=True)
    return index


def _keys(item: dict) -> dict:
    return {k: item[k] for k in ("method", "beta", "lr", "seed")}


_RUNS: dict[str, object] = {}


def _load(path):
    from gradlens.runs import load_run

    key = str(path)
    if key not in _RUNS:
        _RUNS[key] = load_run(path)
    return _RUNS[key]


# ---- measures ------------------------------------------------------------------------------------


def tabular_measures(index: list[dict], grid: dict) -> pd.DataFrame:
    """β·KL(π‖π*) at the end, KL itself, and π*'s mass outside the training pairs (per seed and β)."""
    from gradlens.record.envs import build_env

    optimum_ood: dict[tuple[int, float], float] = {}
    for seed in grid["seeds"]:
        env = build_env(Envs("tabular", grid).base(seed), log=lambda m: None)
        for beta in grid["betas"]:
            optimum_ood[(seed, beta)] = float((env.optimum(beta).exp() * env.ood).sum(-1).mean())
    rows = []
    for item in index:
        evals = _load(item["path"]).evals
        kl = float(evals["eval/kl_to_optimum"].iloc[-1])
        rows.append({
            **_keys(item), "kl_to_optimum_final": kl, "beta_kl_to_optimum_final": item["beta"] * kl,
            "beta_kl_to_optimum_initial": item["beta"] * float(evals["eval/kl_to_optimum"].iloc[0]),
            "ood_mass_final": float(evals["eval/ood_mass"].iloc[-1]), "optimum_ood_mass": optimum_ood[(item["seed"], item["beta"])],
        })  # fmt: skip
    return pd.DataFrame(rows)


def first_reach(evals: pd.DataFrame, kl: float) -> tuple[float, float]:
    """(true reward, step) where the evaluation path first reaches KL-to-ref ``kl``, interpolated; NaNs if never."""
    path_kl = evals["eval/kl_to_ref"].to_numpy(float)
    reward, steps = evals["eval/true_reward"].to_numpy(float), evals["step"].to_numpy(float)
    above = np.flatnonzero(path_kl >= kl)
    if above.size == 0:
        return math.nan, math.nan
    i = int(above[0])
    if i == 0:
        return float(reward[0]), float(steps[0])
    t = (kl - path_kl[i - 1]) / (path_kl[i] - path_kl[i - 1])
    return float(reward[i - 1] + t * (reward[i] - reward[i - 1])), float(steps[i - 1] + t * (steps[i] - steps[i - 1]))


def gpt2_measures(index: list[dict]) -> tuple[pd.DataFrame, float]:
    """Reward at the matched KL* and spikes before reaching it; KL* = min over methods of the median final KL."""
    from gradlens.analysis.stability import spikes
    from gradlens.runs import schema

    finals = pd.DataFrame([{**_keys(i), "kl_final": float(_load(i["path"]).evals["eval/kl_to_ref"].iloc[-1])} for i in index])
    target = float(finals.groupby("method")["kl_final"].median().min())
    rows = []
    for item in index:
        run = _load(item["path"])
        reward, at = first_reach(run.evals, target)
        steps = run.steps
        upto = steps[steps[schema.STEP] <= at] if math.isfinite(at) else steps.iloc[:0]
        rows.append({
            **_keys(item), "kl_to_ref_final": float(run.evals["eval/kl_to_ref"].iloc[-1]),
            "true_reward_final": float(run.evals["eval/true_reward"].iloc[-1]), "true_reward_at_kl": reward, "step_at_kl": at,
            "loss_spikes_to_kl": float(spikes(upto[schema.LOSS]).size) if len(upto) > 2 else math.nan,
            "grad_norm_spikes_to_kl": float(spikes(upto[schema.GRAD_NORM]).size) if len(upto) > 2 else math.nan,
            "nonfinite_steps": int(run.steps[schema.NONFINITE].sum()),
        })  # fmt: skip
    return pd.DataFrame(rows), target


# ---- statistics ----------------------------------------------------------------------------------


def paired_stats(diff: np.ndarray, seed: int = 0) -> dict:
    """Mean of per-seed differences, 95 % percentile bootstrap and t intervals, paired t-test p."""
    from scipy import stats

    d = diff[np.isfinite(diff)]
    n = d.size
    if n < 2:
        return dict(n=n, mean=math.nan, boot_low=math.nan, boot_high=math.nan, t_low=math.nan, t_high=math.nan, p=math.nan)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(BOOT, n))].mean(axis=1)
    se = d.std(ddof=1) / math.sqrt(n)
    half = stats.t.ppf(0.975, n - 1) * se
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if se > 0 else (0.0 if d.mean() != 0 else 1.0)
    return dict(n=n, mean=float(d.mean()), boot_low=float(np.percentile(means, 2.5)), boot_high=float(np.percentile(means, 97.5)),
                t_low=float(d.mean() - half), t_high=float(d.mean() + half), p=p)  # fmt: skip


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN stays NaN and is not counted)."""
    out = np.full_like(p, np.nan, dtype=float)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok])]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def verdict(metric: str, row: dict, alpha: float = 0.05) -> str:
    """better / worse (Holm-significant and at least MIN_EFFECT), negligible, or inconclusive."""
    delta = MIN_EFFECT[metric]
    if not math.isfinite(row["mean"]):
        return "n/a"
    inside = -delta < row["t_low"] and row["t_high"] < delta and -delta < row["boot_low"] and row["boot_high"] < delta
    if inside or (row["p_holm"] < alpha and abs(row["mean"]) < delta):
        return "negligible"
    if row["p_holm"] < alpha:
        good = row["mean"] > 0 if metric in HIGHER_IS_BETTER else row["mean"] < 0
        return "better" if good else "worse"
    return "inconclusive"


def stats_table(per_run: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Every method − DPO per beta and metric, paired by seed; Holm across the whole table."""
    rows = []
    for beta, g in per_run.groupby("beta", sort=True):
        base = g[g.method == "dpo"].set_index("seed")
        for method in [m for m in METHODS if m != "dpo" and m in set(g.method)]:
            other = g[g.method == method].set_index("seed").reindex(base.index)
            for metric in metrics:
                diff = other[metric].to_numpy(float) - base[metric].to_numpy(float)
                rows.append(dict(beta=beta, method=METHODS[method][0], metric=metric, dpo_mean=float(np.nanmean(base[metric])),
                                 method_mean=float(np.nanmean(other[metric])), lr=float(other["lr"].iloc[0]),
                                 **paired_stats(diff)))  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["p_holm"] = holm(frame["p"].to_numpy(float))
    frame["verdict"] = [verdict(r["metric"], r) for r in frame.to_dict("records")]
    frame["min_effect"] = [MIN_EFFECT[m] for m in frame.metric]
    return frame


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """The markdown version: one interval column each, 3 significant digits."""
    def ci(lo, hi):
        return f"[{lo:+.3g}, {hi:+.3g}]" if math.isfinite(lo) else "n/a"

    return pd.DataFrame({
        "β": frame.beta.map(lambda b: f"{b:g}"), "method − DPO": frame.method, "metric": frame.metric, "lr": frame.lr.map(lambda v: f"{v:g}"),
        "DPO": frame.dpo_mean.map(lambda v: f"{v:.3g}"), "method": frame.method_mean.map(lambda v: f"{v:.3g}"),
        "Δ mean": frame["mean"].map(lambda v: f"{v:+.3g}"), "bootstrap 95%": [ci(a, b) for a, b in zip(frame.boot_low, frame.boot_high)],
        "t 95%": [ci(a, b) for a, b in zip(frame.t_low, frame.t_high)], "p (Holm)": frame.p_holm.map(lambda v: f"{v:.2g}"),
        "n": frame.n, "min effect": frame.min_effect.map(lambda v: f"{v:g}"), "verdict": frame.verdict,
    })  # fmt: skip


def summary_table(per_run: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Per beta and method: the chosen lr, n, and mean ± sd over test seeds of each metric."""
    rows = []
    for (beta, method), g in per_run.groupby(["beta", "method"], sort=False):
        row = {"β": f"{beta:g}", "method": METHODS[method][0], "lr": f"{g['lr'].iloc[0]:g}", "n": len(g)}
        for metric in metrics:
            x = g[metric].to_numpy(float)
            ok = np.isfinite(x)
            row[metric] = f"{x[ok].mean():.3g} ± {x[ok].std(ddof=1):.2g}" + (f" (n={ok.sum()})" if ok.sum() < len(x) else "") if ok.sum() > 1 else "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


# ---- step time -----------------------------------------------------------------------------------


def step_time(grid: dict, figures: Path) -> pd.DataFrame:
    """Median wall time of one recorded tiny-gpt2 step: DPO vs norm_balanced (both scopes), interleaved."""
    import torch

    from gradlens.gradients import GradientRecorder
    from gradlens.losses import get_reweighting, preference_loss

    env = Envs("gpt2", grid).get(grid["seeds"][0])
    model = env.policy
    batch = env.make_batch(list(range(16)), torch.device("cpu"))
    with torch.no_grad():
        ref, _ = env.logps(model, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every repetition times the same model
    variants = {"DPO": ("dpo", {}), "norm-balanced": ("norm_balanced", {"balance_scope": "global"}),
                "norm-balanced, per layer": ("norm_balanced", {"balance_scope": "per_layer"})}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in variants}
    rec = GradientRecorder(model)
    params = dict(model.named_parameters())
    groups = {"chosen": slice(0, 16), "rejected": slice(16, 32)}
    for rep in range(grid["timing_reps"] + 2):
        for name, (loss, options) in variants.items():
            method = get_reweighting(loss)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with rec.capture(groups=groups, keep_pieces=method.rebalance is not None) as cap:
                logps, _ = env.logps(model, batch)
                preference_loss(logps[:16], logps[16:], ref[:16], ref[16:], beta=0.1, method=loss, options=options).loss.backward()
            cap.norm("chosen"), cap.norm("rejected")
            if method.rebalance:
                method.rebalance(cap, params, **options)
            optimizer.step()
            if rep >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    rec.close()
    base = float(np.median(times["DPO"]))
    frame = pd.DataFrame([dict(method=k, median_step_ms=1e3 * float(np.median(v)), ratio_to_dpo=float(np.median(v)) / base,
                               reps=len(v)) for k, v in times.items()])  # fmt: skip
    common.write_tables(frame, figures, "e4_step_time")
    return frame


# ---- figures -------------------------------------------------------------------------------------


def _colour(method: str) -> str:
    # gradlens.plot.style fixes each method's colour for every experiment (E1, E2 and E4 agree)
    from gradlens.plot.style import line_style

    return line_style(method, list(METHODS))["color"]


def fig_tabular(per_run: pd.DataFrame, index: list[dict], figures: Path) -> Path:
    """Left: β·KL(π‖π*) over training (median over test seeds); right: final β·KL per method, each seed and the mean."""
    from gradlens.plot.style import apply_style, plt

    betas = sorted(per_run.beta.unique())
    apply_style()
    fig, axes = plt.subplots(2, len(betas), figsize=(5.2 * len(betas), 7.5), squeeze=False, layout="constrained")
    for j, beta in enumerate(betas):
        ax = axes[0, j]
        for method in [m for m in METHODS if m in set(per_run.method)]:
            paths = [i["path"] for i in index if i["beta"] == beta and i["method"] == method]
            curves = [_load(p).evals for p in paths]
            steps = curves[0]["step"].to_numpy()
            values = np.vstack([beta * c["eval/kl_to_optimum"].to_numpy(float)[: len(steps)] for c in curves])
            ax.plot(steps, np.median(values, 0), color=_colour(method), label=f"{METHODS[method][0]} (n={len(curves)})")
        ax.set_yscale("log")
        ax.set_title(f"β = {beta:g}: β·KL(π_θ‖π*) during training")
        ax.set_xlabel("step")
        ax.set_ylabel("β·KL(π_θ‖π*) (nats, log)")
        ood = per_run[per_run.beta == beta].optimum_ood_mass.mean()
        ax.text(0.02, 0.02, f"π* puts {ood:.0%} of its mass on responses in no training pair", transform=ax.transAxes, fontsize=8)
        ax = axes[1, j]
        g = per_run[per_run.beta == beta]
        for k, method in enumerate([m for m in METHODS if m in set(g.method)]):
            y = g[g.method == method].beta_kl_to_optimum_final.to_numpy(float)
            ax.scatter(np.full(y.size, k) + np.linspace(-0.15, 0.15, y.size), y, s=10, color=_colour(method), alpha=0.6)
            ax.plot([k - 0.25, k + 0.25], [np.mean(y)] * 2, color=_colour(method), linewidth=2.5)
        names = [m for m in METHODS if m in set(g.method)]
        ax.set_xticks(range(len(names)), [METHODS[m][0] for m in names], rotation=20, fontsize=8)
        ax.set_ylabel("final β·KL(π_θ‖π*) (nats)")
        ax.set_title("end of training: seeds (dots) and mean (bar)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("E4 tabular: each method at its own lr (chosen on held-out pairs), test seeds", fontsize=12)
    return common.save(fig, figures, "e4_tabular")


def fig_gpt2(per_run: pd.DataFrame, index: list[dict], target: float, figures: Path) -> Path:
    """Left: reward against KL to π_ref along training (median path); right: reward at KL*, each seed and the mean."""
    from gradlens.plot.style import apply_style, plt

    apply_style()
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6), layout="constrained")
    names = [m for m in METHODS if m in set(per_run.method)]
    for method in names:
        curves = [_load(i["path"]).evals for i in index if i["method"] == method]
        n = min(len(c) for c in curves)
        kl = np.median(np.vstack([c["eval/kl_to_ref"].to_numpy(float)[:n] for c in curves]), 0)
        reward = np.median(np.vstack([c["eval/true_reward"].to_numpy(float)[:n] for c in curves]), 0)
        axes[0].plot(kl, reward, marker=".", color=_colour(method), label=f"{METHODS[method][0]} (n={len(curves)})")
    axes[0].axvline(target, color="black", linestyle=":", linewidth=1.0)
    axes[0].set_xlabel("KL(π_θ‖π_ref) (nats, Monte Carlo)")
    axes[0].set_ylabel("true reward")
    axes[0].set_title(f"median path over seeds; dotted: matched KL* = {target:.2f}")
    axes[0].legend(fontsize=8)
    for k, method in enumerate(names):
        y = per_run[per_run.method == method].true_reward_at_kl.to_numpy(float)
        y = y[np.isfinite(y)]
        axes[1].scatter(np.full(y.size, k) + np.linspace(-0.15, 0.15, max(y.size, 1))[: y.size], y, s=10, color=_colour(method), alpha=0.6)
        if y.size:
            axes[1].plot([k - 0.25, k + 0.25], [np.mean(y)] * 2, color=_colour(method), linewidth=2.5)
    axes[1].set_xticks(range(len(names)), [METHODS[m][0] for m in names], rotation=25, fontsize=8)
    axes[1].set_ylabel(f"true reward at KL* = {target:.2f}")
    axes[1].set_title("seeds (dots) and mean (bar)")
    fig.suptitle("E4 tiny-gpt2, β = 0.1: reward at equal distance from π_ref, each method at its own lr", fontsize=12)
    return common.save(fig, figures, "e4_gpt2")


# ---- main ----------------------------------------------------------------------------------------


def run_part(args, part: str, grid: dict) -> None:
    timer = common.Timer()
    tune_index, tuning = tune(args, part, grid)
    timer.lap(f"{part}: tuning")
    common.write_tables(tuning, args.figures, f"e4_{part}_tuning")
    index = test(args, part, grid, tuning)
    timer.lap(f"{part}: test")
    if args.shard[1] > 1:
        return  # the analysis runs once, in an invocation without --shard (every run is then kept)
    if part == "tabular":
        per_run = tabular_measures(index, grid)
        stats = stats_table(per_run, ("beta_kl_to_optimum_final",))
        summary = summary_table(per_run, ("beta_kl_to_optimum_final", "beta_kl_to_optimum_initial", "kl_to_optimum_final",
                                          "ood_mass_final", "optimum_ood_mass"))
        fig_tabular(per_run, index, args.figures)
        extra = {}
    else:
        per_run, target = gpt2_measures(index)
        stats = stats_table(per_run, ("true_reward_at_kl", "loss_spikes_to_kl", "grad_norm_spikes_to_kl"))
        summary = summary_table(per_run, ("true_reward_at_kl", "step_at_kl", "loss_spikes_to_kl", "grad_norm_spikes_to_kl",
                                          "true_reward_final", "kl_to_ref_final", "nonfinite_steps"))
        fig_gpt2(per_run, index, target, args.figures)
        timing = step_time(grid, args.figures)
        extra = {"matched_kl": target, "step_time_ratio": dict(zip(timing.method, timing.ratio_to_dpo.round(3)))}
    per_run.to_csv(args.out / f"{part}_per_run.csv", index=False)
    common.write_tables(stats, args.figures, f"e4_{part}_stats")
    from gradlens.plot.report import to_markdown

    (args.figures / f"e4_{part}_stats_readable.md").write_text(to_markdown(readable(stats)))
    (args.figures / f"e4_{part}_summary.md").write_text(to_markdown(summary))
    timer.lap(f"{part}: analysis")
    all_index = tune_index + index
    counts = common.run_counts(all_index)
    # total_s is this invocation's; with --shard the recording happened in other processes, and
    # sum_of_run_wall_times_s (each run's own summary.json) is what the runs cost.
    timer.write(args.figures / f"e4_{part}_runtime.json", **counts, smoke=args.smoke,
                grid={k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()}, **extra)  # fmt: skip


def _flags(parser) -> None:
    parser.add_argument("--part", choices=("all", *PARTS), default="all", help="record and analyse one part only")
    parser.add_argument(
        "--shard", default="0/1", metavar="K/N",
        help="record the K-th (0-based) of every N seeds and skip the analysis; start N processes, then rerun without --shard",
    )  # fmt: skip
    parser.add_argument("--finished-only", action="store_true", help="record nothing; analyse the runs that finished (a cut-short run)")


def main() -> None:
    args = common.parse_args(__doc__, "e4", extra=_flags)
    k, _, n = args.shard.partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise SystemExit(f"--shard {args.shard!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    args.shard = (int(k), int(n))
    common.quiet_threads()
    sizes = SMOKE if args.smoke else FULL
    parts = list(PARTS) if args.part == "all" else [args.part]
    for part in parts:
        run_part(args, part, sizes[part])
    if args.shard[1] > 1:
        return
    names = [f for f in FIGURES if any(f"e4_{part}" in f for part in parts) or ("step_time" in f and "gpt2" in parts)]
    common.check_outputs(args.figures, names)
    print(f"E4 done ({', '.join(parts)}); results in {args.figures}")


if __name__ == "__main__":
    main()
