"""`gradlens plot` on synthetic run directories: outputs, grouping, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gradlens.analysis import group_runs
from gradlens.cli import main
from gradlens.plot.preference import FIGURES
from gradlens.plot.registry import PlotOptions
from gradlens.plot.style import plt
from gradlens.runs import find_runs, load_run
from gradlens.runs import RunWriter
from gradlens.runs import schema

LAYERS = ("transformer.wte", "transformer.h.0.attn.c_attn", "transformer.ln_f")
EVAL_COLUMNS = ("eval/kl_to_optimum", "eval/ood_mass", "eval/true_reward", "eval/kl_to_ref", "eval/pref_accuracy")


def write_run(
    path: Path,
    *,
    loss: str = "dpo",
    seed: int = 0,
    steps: int = 20,
    kind: str = schema.KIND_PREFERENCE,
    layers: bool = True,
    evals: bool = True,
    nonfinite_at: int | None = None,
    **config,
) -> Path:
    """A small preference run written through the real RunWriter; DPO's rho grows, balanced stays ~1."""
    rng = np.random.default_rng(seed)
    config = {"loss": loss, "seed": seed, "env": "tabular", "beta": 0.1, "lr": 0.05, "optimizer": "adam", "steps": steps, **config}
    writer = RunWriter(path, config, kind=kind)
    logp_w, logp_l = -2.0, -2.0
    for t in range(steps):
        chosen = float(np.exp(-t / 40) * (1 + 0.1 * rng.random()))
        rho = float((1.0 + t / 10 if loss == "dpo" else 1.0) * np.exp(0.05 * rng.standard_normal()))
        rejected, cosine = chosen * rho, float(-0.2 + 0.05 * rng.standard_normal())
        logp_w, logp_l = logp_w - 0.02 + 0.01 * float(rng.standard_normal()), logp_l - 0.1
        bad = t == nonfinite_at
        writer.log_step(
            {
                schema.STEP: t, schema.LOSS: math.nan if bad else 0.69 - 0.005 * t, schema.LR: 0.05,
                schema.REWARDS_CHOSEN: 0.1 * (logp_w + 2), schema.REWARDS_REJECTED: 0.1 * (logp_l + 2), schema.REWARDS_MARGINS: 0.1 * (logp_w - logp_l),
                schema.REWARDS_ACCURACIES: 0.5, schema.LOGPS_CHOSEN: logp_w, schema.LOGPS_REJECTED: logp_l,
                schema.GRAD_NORM: math.inf if bad else math.sqrt(chosen**2 + rejected**2 + 2 * cosine * chosen * rejected),
                schema.GRAD_NORM_CHOSEN: chosen, schema.GRAD_NORM_REJECTED: rejected, schema.GRAD_DOT: cosine * chosen * rejected,
                schema.GRAD_COSINE: cosine, schema.GRAD_RATIO: math.nan if bad else rho, schema.LOG_PW_OVER_PL: logp_w - logp_l,
                schema.SIGMOID_NEG_U: 0.5, schema.WEIGHT_CHOSEN: 1.0, schema.WEIGHT_REJECTED: 1.0, schema.NONFINITE: int(bad),
            }
        )  # fmt: skip
        if layers:
            shares = np.arange(1, len(LAYERS) + 1, dtype=float) / sum(range(1, len(LAYERS) + 1))
            writer.log_layers(
                t,
                {
                    name: {schema.CHOSEN_SQ: chosen**2 * float(shares[i]), schema.REJECTED_SQ: rejected**2 * float(shares[-1 - i]), schema.DOT: 0.0}
                    for i, name in enumerate(LAYERS)
                },
            )
        if evals and t % 5 == 0:
            writer.log_eval({schema.STEP: t, **{c: float(1.0 / (1 + t) + 0.1 * i) for i, c in enumerate(EVAL_COLUMNS)}})
    writer.write_summary({"steps": steps})
    writer.close()
    return path


def plot(*argv: str) -> int:
    return main(["plot", *map(str, argv)])


def assert_valid_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= 600 and height >= 350, f"{path.name} is {width}x{height}"
    assert width <= 6000 and height <= 6000, f"{path.name} is {width}x{height}"


def test_default_paths_all_figures_and_tables(tmp_path, monkeypatch, capsys):
    for loss in ("dpo", "balanced"):
        for seed in (0, 1):
            write_run(tmp_path / "runs" / f"{loss}-s{seed}", loss=loss, seed=seed)
    monkeypatch.chdir(tmp_path)
    assert plot("--format", "png,svg") == 0
    out = capsys.readouterr().out
    figures = tmp_path / "runs" / "gradlens-plots"  # beside the runs, never ./figures
    assert not (tmp_path / "figures").exists()
    assert f"report: {Path('runs') / 'gradlens-plots' / 'report.html'}" in out
    for name, _ in FIGURES:
        assert_valid_png(figures / f"{name}.png")
        assert (figures / f"{name}.svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")
    summary = pd.read_csv(figures / "summary.csv")
    assert summary["group"].tolist() == ["balanced", "dpo"] and summary["n_seeds"].tolist() == [2, 2]
    for column in ("ratio_median", "ratio_iqr", "ratio_final", "mean_log_ratio", "dominated_frac", "onset_step",
                   "cosine_median", "log_pw_over_pl_final", "chosen_logp_fall_frac", "chosen_logp_change",
                   "loss_spikes", "grad_norm_spikes", "loss_final_seed_sd", "kl_to_optimum_final",
                   "true_reward_final", "kl_to_ref_final", "imbalance_layers"):  # fmt: skip
        assert column in summary.columns, column
    dpo = summary.set_index("group").loc["dpo"]
    assert dpo["ratio_final"] > 2.0 and dpo["dominated_frac"] > 0.9
    assert summary.set_index("group").loc["balanced", "ratio_median"] == pytest.approx(1.0, abs=0.1)
    assert "| group |" in (figures / "summary.md").read_text(encoding="utf-8")
    assert len(pd.read_csv(figures / "runs.csv")) == 4
    comparison = pd.read_csv(figures / "comparison.csv")
    ratio_row = comparison.set_index("metric").loc["ratio_final"]
    assert ratio_row["baseline"] == "dpo" and ratio_row["ci_high"] < 0  # balanced lowers the final ratio
    layers = pd.read_csv(figures / "layers.csv")
    assert set(layers["layer"]) == set(LAYERS) and len(layers) == 2 * len(LAYERS)
    assert "ratio_median" in out and "bootstrap" in out


def test_group_by_config_key_and_nonfinite_steps(tmp_path, capsys):
    write_run(tmp_path / "a", beta=0.1, seed=0, nonfinite_at=7)
    write_run(tmp_path / "b", beta=0.1, seed=1)
    write_run(tmp_path / "c", beta=0.5, seed=0, layers=False, evals=False)
    assert plot(tmp_path, "--group-by", "beta", "--out", tmp_path / "fig", "--smooth", "3") == 0
    summary = pd.read_csv(tmp_path / "fig" / "summary.csv").set_index("group")
    assert summary.index.tolist() == ["beta=0.1", "beta=0.5"]
    assert summary.loc["beta=0.1", "nonfinite_steps"] == 1
    assert summary.loc["beta=0.1", "ratio_nonfinite"] == 1
    assert summary.loc["beta=0.1", "grad_norm_nonfinite"] == 1
    assert (tmp_path / "fig" / "ratio.png").exists()


def test_truncated_last_line_plots_complete_rows_and_warns(tmp_path, capsys):
    run = write_run(tmp_path / "killed", steps=12, evals=False)
    with open(run / schema.STEPS, "a", encoding="utf-8") as f:
        f.write("12,0.63,0.05,0.0")  # the row in flight when the run was killed
    with open(run / schema.LAYERS, "a", encoding="utf-8") as f:
        f.write("12,transformer.wte,0.1")
    rc = plot(run, tmp_path / "missing-run", "--out", tmp_path / "fig")
    err = capsys.readouterr().err
    assert rc == 0  # something was plotted
    assert f"{run / schema.STEPS}: line 14 is incomplete" in err and "12 complete rows" in err
    assert f"{run / schema.LAYERS}: line" in err
    assert "missing-run: no such file or directory" in err
    assert "skipped figure 'kl_to_optimum'" in err and "evals.csv" in err
    assert pd.read_csv(tmp_path / "fig" / "runs.csv")["steps"].tolist() == [12]
    assert_valid_png(tmp_path / "fig" / "ratio.png")


def test_missing_directory(tmp_path, capsys):
    assert plot(tmp_path / "nope", "--out", tmp_path / "fig") != 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'}: no such file or directory" in err and "nothing to plot" in err
    assert not (tmp_path / "fig").exists()


def test_no_runs_directory_here(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert plot() != 0
    assert "no ./runs directory here" in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()


def test_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    assert plot(tmp_path / "notes", "--out", tmp_path / "fig") != 0
    err = capsys.readouterr().err
    assert "notes: not a gradlens run and holds no runs" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / schema.CONFIG).write_text("{not json")
    assert plot(broken, "--out", tmp_path / "fig") != 0
    assert "not valid JSON" in capsys.readouterr().err


def test_run_without_step_rows(tmp_path, capsys):
    RunWriter(tmp_path / "fresh", {"loss": "dpo", "seed": 0}, kind=schema.KIND_PREFERENCE).close()
    assert plot(tmp_path / "fresh", "--out", tmp_path / "fig") != 0
    assert "no complete step rows yet" in capsys.readouterr().err


def test_mixed_kinds_are_plotted_kind_by_kind(tmp_path, capsys):
    write_run(tmp_path / "pref", steps=3, layers=False, evals=False)
    write_run(tmp_path / "lang", steps=3, layers=False, evals=False, kind=schema.KIND_LANGEVIN)
    assert plot(tmp_path, "--out", tmp_path / "fig") == 0  # the preference run is plotted
    captured = capsys.readouterr()
    assert "each kind is plotted in its own folder" in captured.out
    assert (tmp_path / "fig" / "preference" / "report.html").is_file()
    assert "no run has config key 'label'" in captured.err  # this fake Langevin run cannot be grouped
    assert not (tmp_path / "fig" / "langevin").exists()  # and leaves no folder behind


def test_unknown_kind_group_key_and_format(tmp_path, capsys):
    write_run(tmp_path / "odd", steps=3, layers=False, evals=False, kind="mystery")
    assert plot(tmp_path / "odd", "--out", tmp_path / "fig") != 0
    assert "no plotter for runs of kind 'mystery'" in capsys.readouterr().err
    write_run(tmp_path / "runs" / "ok", steps=3, layers=False, evals=False)
    assert plot(tmp_path / "runs", "--group-by", "warmup", "--out", tmp_path / "fig") != 0
    assert "no run has config key 'warmup'; keys present: beta, env, loss" in capsys.readouterr().err
    assert plot(tmp_path / "runs", "--format", "png,gif") == 2
    assert "choose from png,svg,pdf" in capsys.readouterr().err
    assert plot(tmp_path / "runs", "--smooth", "-1") == 2


def test_every_figure_has_title_axis_labels_and_seed_counts(tmp_path):
    for loss, seeds in (("dpo", (0, 1, 2)), ("balanced", (0, 1))):
        for seed in seeds:
            write_run(tmp_path / f"{loss}-s{seed}", loss=loss, seed=seed, steps=10)
    groups = group_runs([load_run(p) for p in find_runs(tmp_path)])
    for name, draw in FIGURES:
        fig = draw(groups, PlotOptions(out=tmp_path))
        try:
            assert fig._suptitle is not None and fig._suptitle.get_text(), name
            axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
            assert all(ax.get_xlabel() for ax in axes), name
            assert axes[0].get_ylabel(), name
            texts = [t.get_text() for ax in axes if ax.get_legend() for t in ax.get_legend().get_texts()]
            texts += [ax.get_title() for ax in axes]
            assert any("dpo (3 seeds)" in t for t in texts) and any("balanced (2 seeds)" in t for t in texts), (name, texts)
            if name in ("norms", "ratio"):
                assert all(ax.get_yscale() == "log" for ax in axes) and "log scale" in axes[0].get_ylabel()
        finally:
            plt.close(fig)
