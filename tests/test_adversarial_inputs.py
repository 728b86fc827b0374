"""Adversarial inputs, round 3, outside the run directory: settings files, `gradlens plot` and
`gradlens langevin`. Each case asserts the exit code, the message and (where it is refused)
a directory tree byte-identical to before.

Items of the reliability list are named in each test's docstring by their number.
"""

from __future__ import annotations

import json

import pytest

from adversarial_helpers import JOB, record, refused, tree
from gradlens.cli import main

LANGEVIN = ["langevin", "--no-tensorboard", "--quiet"]

# ---------------------------------------------------------------- settings files


_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)


def test_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path, capsys):
    """9: 9^9 values described in a few hundred bytes; refused before anything is built or shown."""
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
    """17: nesting deep enough to exhaust recursion, and nesting no setting has."""
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
    """22: huge integers, an unpaired surrogate and NUL in a path, each with its file and setting."""
    path = tmp_path / "c.json"
    path.write_text(text)
    argv = ["record", "--config", str(path)] if command == "record" else [*LANGEVIN, "--config", str(path)]
    refused(capsys, tmp_path, argv, 2, f"{path}: {problem}")


def test_tilde_in_a_config_path_is_the_home_directory(tmp_path, monkeypatch):
    """27: `out: ~/x` in a settings file means $HOME/x, as on a command line; no literal ./~."""
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
    """20: a user potential that raises KeyboardInterrupt or SystemExit is one message, and nothing is left."""
    (tmp_path / "pot.py").write_text(f"def U(x):\n    raise {raised}\n")
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, [*LANGEVIN, "--target", "user", "--potential", "pot.py:U", "--dim", "2", "--step", "0.01",
                               "--steps", "5", "--particles", "20", "--knn-every", "5", "--reference-steps", "5",
                               "--out", str(tmp_path / "runs" / "r")],
            2, f"raised {raised.split('(')[0]}")


def test_langevin_readme_example_runs_and_a_failure_writes_nothing(tmp_path, capsys, monkeypatch):
    """30: without --step or --eps: one message naming both, and no runs/langevin/ left behind;
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
    """7: --out LINK/figs where LINK points at a run is inside the run."""
    run = tmp_path / "runs" / "r"
    record(run)
    link = tmp_path / "link"
    link.symlink_to(run)
    refused(capsys, tmp_path, ["plot", str(run), "--out", str(link / "figs")], 2, f"--out {link / 'figs'}", "gradlens run directory")
    refused(capsys, tmp_path, ["plot", str(run), "--out", str(link)], 2, f"--out {link}", "gradlens run directory")
