"""`gradlens langevin` writes run directories (steps, config, TensorBoard, summary) that `gradlens plot` renders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradlens.cli import main as cli
from gradlens.runs import langevin_schema as C
from gradlens.plot.registry import PlotOptions, get_plotter
from gradlens.runs import load_run


def _tensorboard_tags(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"]), acc


def test_gaussian_run_writes_run_directory_and_tensorboard(tmp_path):
    out = tmp_path / "g"
    assert cli(["langevin", "--target", "gaussian", "--dim", "5", "--cond", "4", "--step", "0.05", "--steps", "200",
                "--eps", "0.05", "--particles", "300", "--out", str(out)]) == 0
    run = load_run(out)
    assert run.kind == "langevin" and run.config["mode"] == C.MODE_RUN and run.complete
    steps = run.steps
    assert list(steps.columns) == C.STEP_COLUMNS
    assert list(steps[C.STEP]) == list(range(201))
    assert np.all(np.isfinite(steps[[C.KL, C.FISHER, C.W2, C.GRAD_U_NORM, C.KL_STATIONARY]].to_numpy()))
    assert np.allclose(steps[C.KL_DECREMENT][:-1], steps[C.KL].to_numpy()[:-1] - steps[C.KL].to_numpy()[1:])
    assert np.allclose(steps[C.H_FISHER], 0.05 * steps[C.FISHER])
    assert steps[C.KL_ESTIMATE].isna().all()  # exact target: no estimate unless asked
    # h = 0.05 > m/(4L²) = 1/64: the curve e^{-mhk}KL_0 + 8hdL²/m is not a bound there and is not written
    assert steps[C.BOUND_THEOREM1].isna().all() and steps[C.BOUND_VW].isna().all()
    summary = run.summary
    assert summary["exact"] == "closed form" and summary["measured_k"] == int(np.flatnonzero(steps[C.KL] <= 0.05)[0])
    assert summary["theorem1"]["bound_holds"] is True and summary["theorem1"]["looseness_factor"] > 1
    tags, acc = _tensorboard_tags(out)
    assert {C.KL, C.KL_STATIONARY, C.FISHER, C.H_FISHER, C.W2, C.GRAD_U_NORM} <= tags and C.BOUND_THEOREM1 not in tags
    assert len(acc.Scalars(C.KL)) == 201
    assert acc.Scalars(C.KL)[3].value == pytest.approx(steps[C.KL][3], rel=1e-6)
    # the same target through the particles: mean |grad U| is plausible for N(0, Σ) near stationarity
    assert 0 < steps[C.GRAD_U_NORM].iloc[-1] < 10


def test_user_run_labels_its_knn_estimate(tmp_path, monkeypatch):
    (tmp_path / "lg_cli_pot.py").write_text(
        "import numpy as np\n"
        "def U(x):\n    return 0.5 * np.sum(x * x, 1) + np.sum(np.log(np.cosh(x)), 1), x + np.tanh(x)\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "u"
    assert cli(["langevin", "--target", "user", "--potential", "lg_cli_pot:U", "--dim", "2", "--L", "2",
                "--step", "0.05", "--steps", "60", "--particles", "400", "--knn-every", "20",
                "--reference-steps", "200", "--out", str(out), "--no-tensorboard"]) == 0
    run = load_run(out)
    steps = run.steps
    assert steps[C.KL].isna().all()  # no exact KL for a user potential
    est = steps.dropna(subset=[C.KL_ESTIMATE])
    assert list(est[C.STEP]) == [0, 20, 40, 60]
    assert (est[C.KL_ESTIMATE_LO] <= est[C.KL_ESTIMATE]).all() and (est[C.KL_ESTIMATE] <= est[C.KL_ESTIMATE_HI]).all()
    assert est[C.KL_ESTIMATE].iloc[0] > est[C.KL_ESTIMATE].iloc[-1]  # the cloud moves towards p*
    info = run.summary["kl_estimate"]
    assert "ESTIMATE" in info["note"] and "k-NN" in info["method"] and info["reference"].startswith("MALA")
    assert run.config["exact"].startswith("none")


def test_long_runs_log_a_subset_of_steps(tmp_path):
    out = tmp_path / "long"
    assert cli(["langevin", "--dim", "50", "--eps", "0.1", "--max-rows", "400", "--out", str(out),
                "--no-tensorboard"]) == 0
    run = load_run(out)
    k = run.summary["theorem1"]["k"]
    assert run.config["steps"] == k and run.config["particles"] == 0  # too long for particles: skipped
    steps = run.steps
    assert len(steps) <= 402 and steps[C.STEP].iloc[0] == 0 and steps[C.STEP].iloc[-1] == k
    assert steps[C.KL].iloc[-1] <= 0.1


def test_product_run_reports_grid_error(tmp_path):
    out = tmp_path / "p"
    assert cli(["langevin", "--target", "product", "--phi", "weakly_convex", "--dim", "3", "--step", "0.05",
                "--steps", "100", "--particles", "100", "--out", str(out), "--no-tensorboard"]) == 0
    summary = load_run(out).summary
    assert summary["exact"] == "density grid"
    assert 0 <= summary["grid"]["error_estimate"] < 1e-6
    assert "theorem1" not in summary  # m = 0: no Theorem 1


def test_sweep_and_plotter_figures(tmp_path, capsys):
    sweep = tmp_path / "runs" / "sweep"
    assert cli(["langevin", "sweep", "--dims", "1,10,100", "--eps", "0.1,0.03", "--out", str(sweep)]) == 0
    single = tmp_path / "runs" / "single"
    assert cli(["langevin", "--dim", "4", "--step", "0.02", "--steps", "300", "--particles", "0",
                "--out", str(single), "--no-tensorboard"]) == 0
    run = load_run(sweep)
    assert run.config["mode"] == C.MODE_SWEEP and len(run.steps) == 6
    tags, _ = _tensorboard_tags(sweep)
    assert any(t.startswith("sweep/k_measured/") for t in tags)
    plotter = get_plotter("langevin")
    groups = {"sweep": [run], "single": [load_run(single)]}
    figs = tmp_path / "figs"
    figs.mkdir()
    options = PlotOptions(out=figs, formats=["png"], group_by="label")
    table = plotter.summarize(groups, options)
    assert isinstance(table, pd.DataFrame) and len(table) == 2
    row = table.set_index("group").loc["sweep"]
    assert 1.0 < row["slope_d_measured"] < 1.5 and 0.3 < row["slope_d_best"] < 0.9
    assert bool(row["bound_holds"])
    paths = plotter.figures(groups, options)
    names = sorted(p.name for p in paths)
    assert names == ["langevin_dissipation.png", "langevin_iterations_vs_d.png",
                     "langevin_iterations_vs_inv_eps.png", "langevin_kl.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    # and end to end through `gradlens plot`
    capsys.readouterr()
    assert cli(["plot", str(single), "--out", str(tmp_path / "plot_out")]) == 0
    printed = capsys.readouterr().out
    assert "langevin run(s)" in printed and (tmp_path / "plot_out" / "langevin_kl.png").is_file()
    assert (tmp_path / "plot_out" / "langevin_dissipation.png").is_file()


def test_vw_curve_written_only_where_it_is_a_bound(tmp_path):
    """h <= m/(4L²): the curve e^{-mhk}KL_0 + 8hdL²/m is written and lies above the exact KL."""
    from gradlens.langevin.runner import RunSpec, run_langevin

    spec = RunSpec(target="gaussian", dim=3, cond=2.0, step=0.05, steps=60, particles=0)  # m = 1, L = 2: limit 1/16
    run_langevin(spec, tmp_path / "valid", tensorboard=False, echo=lambda s: None)
    steps = load_run(tmp_path / "valid").steps
    assert steps[C.BOUND_VW].notna().all() and (steps[C.BOUND_VW] >= steps[C.KL]).all()
    assert np.array_equal(steps[C.BOUND_THEOREM1].to_numpy(), steps[C.BOUND_VW].to_numpy())


def test_config_file_in_yaml_toml_or_json(tmp_path):
    """`langevin --config` reads YAML like `record --config`; the three formats give the same run."""
    import json

    settings = {"target": "gaussian", "dim": 3, "cond": 4, "step": 0.05, "steps": 30, "eps": [0.05], "particles": 50}
    files = {
        "yaml": "target: gaussian\ndim: 3\ncond: 4\nstep: 0.05\nsteps: 30\neps: [0.05]\nparticles: 50\n",
        "toml": 'target = "gaussian"\ndim = 3\ncond = 4\nstep = 0.05\nsteps = 30\neps = [0.05]\nparticles = 50\n',
        "json": json.dumps(settings),
    }
    configs = {}
    for suffix, text in files.items():
        path = tmp_path / f"job.{suffix}"
        path.write_text(text, encoding="utf-8")
        assert cli(["langevin", "--config", str(path), "--out", str(tmp_path / suffix), "--quiet", "--no-tensorboard"]) == 0
        configs[suffix] = {k: v for k, v in load_run(tmp_path / suffix).config.items() if k not in ("out", "config")}
    assert configs["yaml"] == configs["toml"] == configs["json"]
    assert configs["yaml"]["steps"] == 30 and configs["yaml"]["dim"] == 3
