"""How long `gradlens plot` takes on a long run: 100,000 steps with per-layer rows
for a 4-layer GPT-2-like model (27 parameter-bearing modules), i.e. 2.7 million
layer rows. Target: reading + summarising + plotting in <= 10 s.

    python benchmarks/plot_speed.py [--steps 100000] [--keep DIR]

The log is written by a fast writer that produces byte-for-byte the format of
``gradlens.runs.RunWriter`` (checked against the real writer on the first steps
before timing), because formatting 2.7 million rows row by row through the real
writer would take longer than the thing being measured.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

N_BLOCKS = 4
LAYER_NAMES = (
    ["transformer.wte", "transformer.wpe"]
    + [
        f"transformer.h.{i}.{part}"
        for i in range(N_BLOCKS)
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    ]
    + ["transformer.ln_f"]
)
CONFIG = {"loss": "dpo", "seed": 0, "env": "tiny-gpt2", "beta": 0.1, "lr": 1e-4, "optimizer": "adamw", "steps": 0}
EVAL_EVERY = 500


def synthetic_columns(n_steps: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Plausible step, layer and eval columns: rho drifts from ~1 to ~3, norms decay, noise on top."""
    from gradlens.runs import schema

    rng = np.random.default_rng(seed)
    t = np.arange(n_steps)
    chosen = np.exp(-t / n_steps) * rng.lognormal(0.0, 0.2, n_steps)
    rho = np.exp(np.log(3.0) * t / n_steps + rng.normal(0.0, 0.15, n_steps))
    rejected = chosen * rho
    cosine = np.clip(rng.normal(-0.2, 0.1, n_steps), -1, 1)
    logp_w = -20.0 - 2.0 * t / n_steps + rng.normal(0, 0.3, n_steps)
    logp_l = -20.0 - 8.0 * t / n_steps + rng.normal(0, 0.3, n_steps)
    margins = 0.1 * (logp_w - logp_l)
    steps = {
        schema.STEP: t,
        schema.LOSS: np.log1p(np.exp(-margins)),
        schema.LR: np.full(n_steps, 1e-4),
        schema.REWARDS_CHOSEN: 0.1 * (logp_w + 20.0),
        schema.REWARDS_REJECTED: 0.1 * (logp_l + 20.0),
        schema.REWARDS_MARGINS: margins,
        schema.REWARDS_ACCURACIES: np.clip(0.5 + margins, 0, 1),
        schema.LOGPS_CHOSEN: logp_w,
        schema.LOGPS_REJECTED: logp_l,
        schema.GRAD_NORM: np.sqrt(chosen**2 + rejected**2 + 2 * cosine * chosen * rejected),
        schema.GRAD_NORM_CHOSEN: chosen,
        schema.GRAD_NORM_REJECTED: rejected,
        schema.GRAD_DOT: cosine * chosen * rejected,
        schema.GRAD_COSINE: cosine,
        schema.GRAD_RATIO: rho,
        schema.LOG_PW_OVER_PL: logp_w - logp_l,
        schema.SIGMOID_NEG_U: 1 / (1 + np.exp(margins)),
        schema.WEIGHT_CHOSEN: np.ones(n_steps),
        schema.WEIGHT_REJECTED: np.ones(n_steps),
        schema.NONFINITE: np.zeros(n_steps, dtype=int),
    }
    n_layers = len(LAYER_NAMES)
    share_c = rng.dirichlet(np.ones(n_layers), size=n_steps)
    share_r = rng.dirichlet(np.ones(n_layers), size=n_steps)
    layers = {
        schema.STEP: np.repeat(t, n_layers),
        schema.LAYER: np.tile(np.array(LAYER_NAMES, dtype=object), n_steps),
        schema.CHOSEN_SQ: (share_c * (chosen**2)[:, None]).ravel(),
        schema.REJECTED_SQ: (share_r * (rejected**2)[:, None]).ravel(),
        schema.DOT: (np.sqrt(share_c * share_r) * (cosine * chosen * rejected)[:, None]).ravel(),
    }
    e = t[::EVAL_EVERY]
    evals = {
        schema.STEP: e,
        "eval/true_reward": 0.5 * np.log1p(e / 1000) + rng.normal(0, 0.02, e.size),
        "eval/kl_to_ref": 0.2 * np.log1p(e / 1000),
        "eval/pref_accuracy": 0.5 + 0.4 * (1 - np.exp(-e / 20000)),
    }
    return steps, layers, evals


def _format_column(values: np.ndarray) -> list[str]:
    # Same text as gradlens.runs.tables._format_value: str for ints and strings,
    # repr for floats (repr(nan) == "nan", repr(inf) == "inf").
    if values.dtype.kind in "iu" or values.dtype == object:
        return [str(v) for v in values.tolist()]
    return [repr(v) for v in values.tolist()]


def write_csv_fast(path: Path, columns: dict[str, np.ndarray], chunk: int = 200_000) -> None:
    names = list(columns)
    n = len(next(iter(columns.values())))
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(names) + "\n")
        for start in range(0, n, chunk):
            cols = [_format_column(columns[c][start : start + chunk]) for c in names]
            f.write("".join(",".join(row) + "\n" for row in zip(*cols)))


def write_run_fast(path: Path, n_steps: int) -> None:
    from gradlens.runs import RunWriter
    from gradlens.runs import schema

    steps, layers, evals = synthetic_columns(n_steps)
    writer = RunWriter(path, {**CONFIG, "steps": n_steps}, kind=schema.KIND_PREFERENCE)
    writer.close()
    write_csv_fast(path / schema.STEPS, steps)
    write_csv_fast(path / schema.LAYERS, layers)
    write_csv_fast(path / schema.EVALS, evals)


def write_run_real(path: Path, n_steps: int) -> None:
    """The same synthetic run through RunWriter, row by row (for the format check)."""
    from gradlens.runs import RunWriter
    from gradlens.runs import schema

    steps, layers, evals = synthetic_columns(n_steps)
    writer = RunWriter(path, {**CONFIG, "steps": n_steps}, kind=schema.KIND_PREFERENCE)
    n_layers = len(LAYER_NAMES)
    for i in range(n_steps):
        writer.log_step({k: v[i].item() for k, v in steps.items()})
        rows = slice(i * n_layers, (i + 1) * n_layers)
        writer.log_layers(i, {name: {c: layers[c][rows][j].item() for c in (schema.CHOSEN_SQ, schema.REJECTED_SQ, schema.DOT)} for j, name in enumerate(LAYER_NAMES)})
        if i % EVAL_EVERY == 0:
            writer.log_eval({k: v[i // EVAL_EVERY].item() for k, v in evals.items()})
    writer.close()


def check_format(tmp: Path) -> None:
    from gradlens.runs import schema

    fast, real = tmp / "check_fast", tmp / "check_real"
    write_run_fast(fast, 3 * EVAL_EVERY // 250)  # a few steps, one eval row
    write_run_real(real, 3 * EVAL_EVERY // 250)
    for name in (schema.STEPS, schema.LAYERS, schema.EVALS):
        if not filecmp.cmp(fast / name, real / name, shallow=False):
            raise SystemExit(f"fast writer differs from RunWriter in {name}; fix benchmarks/plot_speed.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, default=None, help="write the run and figures here and keep them")
    args = parser.parse_args()

    t0 = time.perf_counter()
    from gradlens.plot.registry import PlotOptions, get_plotter
    from gradlens.runs import schema
    from gradlens.runs import load_run

    plotter = get_plotter(schema.KIND_PREFERENCE)
    t_import = time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="gradlens-plot-speed-")) if args.keep is None else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        check_format(tmp)
        run_dir = tmp / "run"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        write_run_fast(run_dir, args.steps)
        t_build = time.perf_counter() - t0
        sizes = {name: (run_dir / name).stat().st_size / 2**20 for name in (schema.STEPS, schema.LAYERS, schema.EVALS)}

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        run = load_run(run_dir)
        run.steps
        timings["read steps.csv"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run.layers
        timings["read layers.csv"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run.evals
        timings["read evals.csv"] = time.perf_counter() - t0
        groups = {"dpo": [run]}
        options = PlotOptions(out=tmp / "figures")
        t0 = time.perf_counter()
        summary = plotter.summarize(groups, options)
        timings["summarise (metrics + layer attribution)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        paths = plotter.figures(groups, options)
        timings[f"plot ({len(paths)} png figures)"] = time.perf_counter() - t0
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    total = sum(timings.values())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"run: {args.steps} steps x {len(LAYER_NAMES)} layers = {args.steps * len(LAYER_NAMES):,} layer rows; "
          + ", ".join(f"{k} {v:.0f} MiB" for k, v in sizes.items()) + f" (built in {t_build:.1f} s)")  # fmt: skip
    print(f"import gradlens.plot + plotter: {t_import:.2f} s (not counted)")
    for name, seconds in timings.items():
        print(f"  {name:<45s} {seconds:6.2f} s")
    print(f"  {'total (read + summarise + plot)':<45s} {total:6.2f} s   target <= 10 s: {'OK' if total <= 10 else 'MISSED'}")
    print(f"summary: ratio_median={summary['ratio_median'].iloc[0]:.3f}, onset_step={summary['onset_step'].iloc[0]}")


if __name__ == "__main__":
    main()
