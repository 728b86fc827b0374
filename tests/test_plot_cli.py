"""Command-line conventions of `gradlens` (the dispatcher in cli.py and the
flags every subcommand shares): help, version, unknown flags, --quiet,
--config, --no-tensorboard, a 100-column end-of-run summary, and notes that
only follow a validated job."""

from __future__ import annotations

import json

import pytest

import gradlens
from gradlens.cli import main
from gradlens.runs import langevin_schema as C
from gradlens.runs import load_run

TABULAR = ["record", "--env", "tabular", "--loss", "dpo", "--steps", "2", "--eval-every", "0"]


def test_bare_gradlens_prints_help_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: gradlens" in out and "record" in out and "plot" in out and "langevin" in out
    assert not (tmp_path / "runs").exists()  # no training job started


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradlens {gradlens.__version__}"


@pytest.mark.parametrize("command", ["record", "plot", "langevin"])
def test_unknown_flag_prints_the_subcommands_usage(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: gradlens {command}" in err and "unrecognized arguments: --no-such-flag" in err


def test_record_without_tensorboard_and_a_summary_within_100_columns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*TABULAR, "--loss", "dpo,balanced", "--out", "runs", "--no-tensorboard", "--quiet"]) == 0
    out = capsys.readouterr().out
    for run in ("runs/tabular-dpo-s0", "runs/tabular-balanced-s0"):
        assert load_run(tmp_path / run).complete
        assert not list((tmp_path / run).glob("events.out.tfevents.*"))
        assert run in out
    assert max(len(line) for line in out.splitlines()) <= 100, out


def test_exists_note_comes_only_after_validation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*TABULAR, "--quiet"]) == 0  # runs/tabular-dpo-s0
    capsys.readouterr()
    # An invalid job: the run exists (so a -2 directory would be planned) but --device is impossible.
    assert main([*TABULAR, "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "exists, so this job writes" not in err
    assert main(TABULAR) == 0
    assert "exists, so this job writes runs/tabular-dpo-s0-2" in capsys.readouterr().err


def test_langevin_config_file_quiet_and_flags_override(tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text('dim = 3\nsteps = 40\nstep = 0.01\nparticles = 0\nno-tensorboard = true\ntarget = "gaussian"\n')
    out = tmp_path / "lang"
    assert main(["langevin", "--config", str(config), "--steps", "25", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""  # --quiet
    header = json.loads((out / "config.json").read_text())["config"]
    assert header["steps"] == 25 and header["dim"] == 3  # the flag wins; the file fills the rest
    assert load_run(out).steps[C.STEP].max() == 25
    assert not list(out.glob("events.out.tfevents.*"))
    bad = tmp_path / "bad.toml"
    bad.write_text("dimension = 3\n")
    assert main(["langevin", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: unknown setting 'dimension'" in err and "Traceback" not in err
    bad.write_text('dim = "ten"\n')
    assert main(["langevin", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "'dim' must be a int, got 'ten'" in capsys.readouterr().err
