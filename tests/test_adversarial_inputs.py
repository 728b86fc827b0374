"""Adversarial inputs outside the run directory: settings files, `gradlens plot` and
`gradlens langevin`. Each case asserts the exit code, the message and (where it is refused)
a directory tree byte-identical to before.
"""

from __future__ import annotations

import pytest

from adversarial_helpers import record, refused
from gradlens.cli import main

LANGEVIN = ["langevin", "--no-tensorboard", "--quiet"]

# ---------------------------------------------------------------- settings files


_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)


def test_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path, capsys):
    """9^9 values described in a few hundred bytes; refused before anything is built or shown."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_BOMB)
    assert bomb.stat().st_size < 600
    err = refused(capsys, tmp_path, ["record", "--config", str(bomb), "--out", str(tmp_path / "r")], 2,
                  f"{bomb}: its aliases (*name) expand to more than 100,000 values")
    assert len(err) < 400 and "lol" not in err
    refused(capsys, tmp_path, [*LANGEVIN, "--config", str(bomb), "--out", str(tmp_path / "r")], 2, f"{bomb}: its aliases")


@pytest.mark.parametrize("suffix,text", [
    (".json", '{"seed": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    (".yaml", "seed: " + "[" * 100_000 + "]" * 100_000),
    (".toml", "seed = " + "[" * 100_000 + "]" * 100_000),
    (".json", '{"seed": ' + "[" * 40 + "]" * 40 + "}"),
], ids=["json", "yaml", "toml", "json-40"])
@pytest.mark.parametrize("command", ["record", "langevin"])
def test_deeply_nested_config_is_one_message(tmp_path, capsys, suffix, text, command):
    """nesting deep enough to exhaust recursion, and nesting no setting has."""
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    argv = ["record", "--config", str(path)] if command == "record" else [*LANGEVIN, "--config", str(path)]
    refused(capsys, tmp_path, [*argv, "--out", str(tmp_path / "r")], 2, f"{path}: ", "nest")


@pytest.mark.parametrize("text,problem", [
    ('{"steps": ' + "9" * 5000 + "}", "not usable JSON: Exceeds the limit"),
    ('{"steps": ' + "9" * 30 + "}", "setting 'steps': a whole number of 30 digits"),
    ('{"out": "\\ud800"}', "setting 'out': holds an unpaired surrogate"),
    ('{"out": "a\\u0000b"}', "setting 'out': holds a NUL character"),
], ids=["5000-digits", "30-digits", "surrogate", "nul"])
@pytest.mark.parametrize("command", ["record", "langevin"])
def test_unusable_config_values_name_the_file_and_the_setting(tmp_path, capsys, text, problem, command):
    """huge integers, an unpaired surrogate and NUL in a path, each with its file and setting."""
    path = tmp_path / "c.json"
    path.write_text(text)
    argv = ["record", "--config", str(path)] if command == "record" else [*LANGEVIN, "--config", str(path)]
    refused(capsys, tmp_path, argv, 2, f"{path}: {problem}")


def test_tilde_in_a_config_path_is_the_home_directory(tmp_path, monkeypatch):
    """`out: ~/x` in a settings file means $HOME/x, as on a command line; no literal ./~."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (work / "lv.yaml").write_text("out: ~/lv\ndim: 2\nstep: 0.01\nsteps: 5\nparticles: 0\n")
    assert main([*LANGEVIN, "--config", "lv.yaml"]) == 0
    assert (home / "lv" / "config.json").is_file() and not (work / "~").exists()
    (work / "rec.yaml").write_text("out: ~/rec\nenv: tabular\nloss: dpo\nsteps: 2\n")
    assert main(["record", "--quiet", "--config", "rec.yaml"]) == 0
    assert (home / "rec" / "config.json").is_file() and not (work / "~").exists()


# ---------------------------------------------------------------- gradlens langevin


@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "SystemExit(3)"])
def test_langevin_potential_raising_keyboard_interrupt_or_system_exit(tmp_path, capsys, monkeypatch, raised):
    """a user potential that raises KeyboardInterrupt or SystemExit is one message, and nothing is left."""
    (tmp_path / "pot.py").write_text(f"def U(x):\n    raise {raised}\n")
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, [*LANGEVIN, "--target", "user", "--potential", "pot.py:U", "--dim", "2", "--step", "0.01",
                               "--steps", "5", "--particles", "20", "--knn-every", "5", "--reference-steps", "5",
                               "--out", str(tmp_path / "runs" / "r")],
            2, f"raised {raised.split('(')[0]}")


def test_langevin_readme_example_runs_and_a_failure_writes_nothing(tmp_path, capsys, monkeypatch):
    """without --step or --eps: one message naming both, and no runs/langevin/ left behind;
    the front page's example (with --eps) runs."""
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, [*LANGEVIN, "--target", "gaussian", "--dim", "10"], 2, "pass --step H", "--eps EPS")
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr("gradlens.langevin.command._check_flags", lambda args: None)  # reach the runner's own check
    refused(capsys, tmp_path, [*LANGEVIN, "--target", "gaussian", "--dim", "10"], 2, "pass --step H")
    assert not (tmp_path / "runs").exists()
    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()
    assert "`gradlens langevin --target gaussian --dim 10 --eps 0.1`" in readme
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main([*LANGEVIN, "--target", "gaussian", "--dim", "10", "--eps", "0.1"]) == 0
    assert len(list((tmp_path / "runs" / "langevin").iterdir())) == 1


# ---------------------------------------------------------------- gradlens plot


def test_plot_out_through_a_link_into_a_run_is_refused(tmp_path, capsys):
    """--out LINK/figs where LINK points at a run is inside the run."""
    run = tmp_path / "runs" / "r"
    record(run)
    link = tmp_path / "link"
    link.symlink_to(run)
    refused(capsys, tmp_path, ["plot", str(run), "--out", str(link / "figs")], 2, f"--out {link / 'figs'}", "gradlens run directory")
    refused(capsys, tmp_path, ["plot", str(run), "--out", str(link)], 2, f"--out {link}", "gradlens run directory")


def _run(tmp_path, name="r", steps=3, *extra):
    run = tmp_path / "runs" / name
    record(run, *extra, steps=steps)
    return run


def _plot(tmp_path, *paths):
    return ["plot", *map(str, paths), "--out", str(tmp_path / "figs")]


@pytest.mark.parametrize("name", ["steps.csv", "config.json", "evals.csv", "summary.json"])
def test_plot_refuses_a_run_file_that_links_out_of_the_run(tmp_path, capsys, name):
    """steps.csv (or any run file) linking to a file outside the run is never opened."""
    run = _run(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the first line of a private file\n")
    (run / name).unlink()
    (run / name).symlink_to(secret)
    err = refused(capsys, tmp_path, _plot(tmp_path, run), 1, f"{run / name}: is a link to a file outside the run")
    assert "root:x" not in err


def test_plot_refuses_a_fifo_in_a_run_instead_of_hanging(tmp_path, capsys):
    """a FIFO named evals.csv would block the reader forever."""
    import os

    run = _run(tmp_path)
    (run / "evals.csv").unlink()
    os.mkfifo(run / "evals.csv")
    refused(capsys, tmp_path, _plot(tmp_path, run), 1, f"{run / 'evals.csv'}: not a regular file")


def test_plot_config_with_a_5000_digit_integer_is_one_message(tmp_path, capsys):
    """json's own limit on integer digits is a message naming the file, not a traceback."""
    run = _run(tmp_path)
    header = (run / "config.json").read_text().replace('"seed": 0', '"seed": ' + "9" * 5000, 1)
    (run / "config.json").write_text(header)
    refused(capsys, tmp_path, _plot(tmp_path, run), 1, f"{run / 'config.json'}: not usable JSON")


def _set_cell(run, column, value, line=3):
    path = run / "steps.csv"
    lines = path.read_text().split("\n")
    index = lines[0].split(",").index(column)
    cells = lines[line - 1].split(",")
    cells[index] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines))


@pytest.mark.parametrize("column,value,problem", [
    ("loss", "abc", "'loss' value 'abc' is not a number"),
    ("nonfinite", "yes", "'nonfinite' value 'yes' is not a"),
    ("nonfinite", "2", "'nonfinite' value '2' is not a flag (0 or 1)"),
    ("step", "four", "'step' value 'four' is not a step"),
    ("step", "3.5", "'step' value '3.5' is not a step"),
    ("step", "-7", "'step' value '-7' is not a step"),
    ("step", "1e20", "'step' value '1e+20' is not a step"),
    ("step", "", "'step' value (empty) is not a step"),
], ids=["loss-abc", "nonfinite-yes", "nonfinite-2", "step-four", "step-3.5", "step-minus-7", "step-1e20", "step-empty"])
def test_plot_refuses_bad_cells_with_file_and_line(tmp_path, capsys, column, value, problem):
    """a cell gradlens never writes is refused with its file and line, never coerced to NaN."""
    run = _run(tmp_path)
    _set_cell(run, column, value)
    refused(capsys, tmp_path, _plot(tmp_path, run), 1, f"{run / 'steps.csv'}: line 3: {problem}")


def test_plot_accepts_the_non_finite_values_gradlens_writes(tmp_path, capsys):
    """The other side: nan, inf, -inf and empty cells are numbers, as written."""
    run = _run(tmp_path)
    _set_cell(run, "loss", "inf", line=2)
    _set_cell(run, "grad/ratio", "nan", line=3)
    _set_cell(run, "grad/dot", "", line=4)
    assert main(_plot(tmp_path, run)) == 0


def test_plot_uses_rows_in_step_order(tmp_path, capsys):
    """reversed rows are sorted by step (with a warning): last_step and changes keep their sign."""
    import pandas as pd

    run = _run(tmp_path, steps=5)
    assert main(_plot(tmp_path / "a", run)) == 0
    before = pd.read_csv(tmp_path / "a" / "figs" / "runs.csv")
    lines = (run / "steps.csv").read_text().split("\n")
    (run / "steps.csv").write_text("\n".join([lines[0], *lines[1:-1][::-1]]) + "\n")
    capsys.readouterr()
    assert main(_plot(tmp_path / "b", run)) == 0
    assert "steps.csv: rows are not in step order" in capsys.readouterr().err
    after = pd.read_csv(tmp_path / "b" / "figs" / "runs.csv")
    assert after["last_step"].iloc[0] == 4
    pd.testing.assert_frame_equal(before.drop(columns="path"), after.drop(columns="path"))


def test_plot_counts_copies_of_one_seed_once(tmp_path, capsys):
    """the default job recorded twice (seed 0 both times) is one seed per group, said in the report."""
    import pandas as pd

    a, b = tmp_path / "runs" / "first", tmp_path / "runs" / "second"
    for parent in (a, b):
        assert main(["record", "--env", "tabular", "--loss", "dpo,balanced", "--steps", "3", "--quiet", "--out", str(parent)]) == 0
    capsys.readouterr()
    assert main(_plot(tmp_path, tmp_path / "runs")) == 0
    captured = capsys.readouterr()
    assert "repeats seed 0" in captured.err and "each seed is counted once" in captured.err
    summary = pd.read_csv(tmp_path / "figs" / "summary.csv")
    assert summary["n_seeds"].tolist() == [1, 1]
    comparison = pd.read_csv(tmp_path / "figs" / "comparison.csv")
    assert comparison["ci_low"].isna().all() and comparison["p_holm"].isna().all()
    assert (comparison["n_group"] == 1).all() and "unpaired" not in captured.out
    report = (tmp_path / "figs" / "report.html").read_text()
    assert "repeats seed 0" in report and "Warnings: none" not in report
    # Runs of one seed that differ in a setting (here the loss, pooled by --group-by) are not copies.
    assert main(["plot", str(a), "--group-by", "seed", "--out", str(tmp_path / "by-seed")]) == 0
    assert "repeats seed" not in capsys.readouterr().err


def test_plot_leaves_out_unfinished_runs_beside_finished_ones(tmp_path, capsys):
    """a killed run (no summary.json, 2 of 6 steps) is not averaged with finished ones; named in the warning."""
    import pandas as pd

    runs = tmp_path / "runs"
    for seed in (0, 1):
        record(runs / f"s{seed}", "--seed", str(seed), steps=6)
    killed = runs / "s2"
    record(killed, "--seed", "2", steps=6)
    (killed / "summary.json").unlink()
    lines = (killed / "steps.csv").read_text().split("\n")
    (killed / "steps.csv").write_text("\n".join(lines[:3]) + "\n")
    capsys.readouterr()
    assert main(_plot(tmp_path, runs)) == 0
    err = capsys.readouterr().err
    assert f"left out 1 run(s) that have not finished" in err and f"{killed} (2 step rows, last step 1, of 6 asked for)" in err
    summary = pd.read_csv(tmp_path / "figs" / "summary.csv")
    assert summary["n_seeds"].tolist() == [2] and summary["steps"].tolist() == [6]
    assert "left out 1 run(s)" in (tmp_path / "figs" / "report.html").read_text()
    # Alone, an unfinished run is still plotted, with the warning that it has not finished.
    assert main(["plot", str(killed), "--out", str(tmp_path / "alone")]) == 0
    assert "no run here has finished" in capsys.readouterr().err


def test_p_values_are_never_impossible():
    """a bootstrap p is at least 1/(B+1); no spread gives an undefined (NaN) interval, marked."""
    import math

    from gradlens.analysis.compare import NOTE_NO_SPREAD, diff_interval

    one_sign = diff_interval([1.0, 2.0, 3.5], [0.0, 0.0, 0.1], paired=True, n_boot=999)
    assert one_sign.p_value >= 1 / 1000 and one_sign.p_value == pytest.approx(2 / 1000)
    for ci in ("bootstrap", "t"):
        for paired in (True, False):
            flat = diff_interval([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], paired=paired, ci=ci)
            assert flat.diff == 1.0 and math.isnan(flat.ci_low) and math.isnan(flat.ci_high) and math.isnan(flat.p_value)
            assert flat.ci_note == NOTE_NO_SPREAD
    spread = diff_interval([2.0, 2.5, 3.0], [1.0, 1.0, 1.0], ci="t")  # one side constant: Welch's t is defined
    assert spread.ci_low < spread.ci_high and 0 < spread.p_value < 1


def test_plot_p_holm_is_never_zero(tmp_path, capsys):
    """End to end: three paired seeds whose differences all have one sign."""
    import pandas as pd

    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        assert main(["record", "--env", "tabular", "--loss", "dpo,balanced", "--steps", "4", "--seed", str(seed), "--quiet",
                     "--out", str(runs / f"s{seed}")]) == 0
    assert main(_plot(tmp_path, runs)) == 0
    comparison = pd.read_csv(tmp_path / "figs" / "comparison.csv")
    p = comparison["p_holm"].dropna()
    assert len(p) and (p >= 1 / 4001).all()


def test_plot_names_a_run_whose_path_is_not_utf8_and_leaves_no_out(tmp_path, capsys):
    """a run directory named in another encoding is named (escaped) in the message; no empty --out is left."""
    import os

    runs = tmp_path / "runs"
    record(runs / "r")
    os.rename(os.fsencode(runs / "r"), os.fsencode(runs) + b"/r\xff")
    refused(capsys, tmp_path, _plot(tmp_path, runs), 1, f"{runs}/r\\xff: the run's path is not valid UTF-8", "rename it")
    assert not (tmp_path / "figs").exists()


def test_plot_failure_after_creating_out_removes_it(tmp_path, capsys, monkeypatch):
    """whatever fails after --out was created, the folders it created and left empty are removed again."""
    from gradlens.plot import preference, registry

    def broken(groups, options):
        raise ValueError("no summary")

    run = _run(tmp_path)
    monkeypatch.setitem(registry.PLOTTERS, "preference", registry.KindPlotter(summarize=broken, figures=preference.figures))
    refused(capsys, tmp_path, ["plot", str(run), "--out", str(tmp_path / "a" / "b")], 1, "cannot summarise these runs: no summary")
    assert not (tmp_path / "a").exists()


def test_warnings_print_no_python_source_lines(tmp_path):
    """a warning is one line, `gradlens COMMAND: warning: ...`, without the file and source line that raised it
    (a real process: pytest would record the warning instead of printing it)."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    record(run)
    steps = run / "steps.csv"
    header, *rows = steps.read_text().splitlines()
    steps.write_text("\n".join([header, *reversed(rows)]) + "\n")  # out of step order: plot warns and sorts
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-m", "gradlens", "plot", str(run), "--out", str(tmp_path / "plots")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "step order" in line]
    assert lines == [f"gradlens plot: warning: {steps}: rows are not in step order (a damaged or edited file); they are used sorted by step"]
    assert ".py:" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_plot_runs_of_two_kinds_each_in_its_own_folder(tmp_path, capsys):
    """a Langevin run beside preference runs: each kind is plotted in OUT/KIND/, nothing is refused."""
    runs = tmp_path / "runs"
    record(runs / "pref")
    assert main([*LANGEVIN, "--dim", "2", "--step", "0.01", "--steps", "20", "--particles", "0", "--out", str(runs / "langevin" / "g")]) == 0
    capsys.readouterr()
    assert main(_plot(tmp_path, runs)) == 0
    captured = capsys.readouterr()
    assert "each kind is plotted in its own folder" in captured.out and "error" not in captured.err
    for kind, figure in (("preference", "loss.png"), ("langevin", "langevin_kl.png")):
        assert (tmp_path / "figs" / kind / "report.html").is_file() and (tmp_path / "figs" / kind / figure).is_file()


def test_langevin_kl_figure_axis_starts_at_zero_without_overlaps_or_stray_notes(tmp_path):
    """a long run on a log iteration axis: no negative iterations, no overlapping tick labels, and the
    k-NN note only where k-NN estimates are drawn."""
    from gradlens.analysis.groups import group_runs
    from gradlens.plot.langevin import kl_figure
    from gradlens.plot.style import plt
    from gradlens.runs import load_run

    out = tmp_path / "g"
    assert main([*LANGEVIN, "--dim", "2", "--step", "0.001", "--steps", "20000", "--particles", "0", "--out", str(out)]) == 0
    fig = kl_figure(group_runs([load_run(out)], "label"))
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] >= 0
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text() and t.get_visible()
             and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    assert len(boxes) >= 3
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert not any("k-NN" in t.get_text() for t in fig.texts)
    plt.close(fig)
