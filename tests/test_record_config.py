"""--config files, flag precedence, the default job and run-directory naming."""

from __future__ import annotations

import json

import pytest

from gradlens.cli import build_parser, main
from gradlens.record import plan as P
from gradlens.record.command import _plan
from gradlens.record.config import load_config_file
from gradlens.record.envs.registry import get_env


def _args(argv):
    return build_parser(["record", *argv])[0].parse_args(["record", *argv])


def test_toml_config_with_flag_override_is_saved_resolved(tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text('env = "tabular"\nloss = "balanced"\nsteps = 3\nbeta = 0.5\nbatch-size = 8\nbalance_space = "token_mean"\n')
    out = tmp_path / "run"
    assert main(["record", "--config", str(cfg), "--beta", "0.25", "--out", str(out), "--quiet"]) == 0
    header = json.loads((out / "config.json").read_text())
    saved = header["config"]
    assert header["kind"] == "preference"
    assert saved["beta"] == 0.25  # the flag wins
    assert saved["steps"] == 3 and saved["batch_size"] == 8 and saved["loss"] == "balanced"
    assert saved["balance_space"] == "token_mean"
    assert saved["lr"] == get_env("tabular").defaults.lr and saved["optimizer"] == "adam"  # env defaults filled in
    assert saved["seed"] == 0 and saved["device"] == "auto"
    assert {"python", "torch", "transformers"} <= set(header["versions"])


def test_json_config_and_loss_list(tmp_path):
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"env": "tabular", "loss": ["dpo", "adadpo"], "steps": 2, "seed": 3}))
    out = tmp_path / "runs"
    assert main(["record", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tabular-adadpo-s3", "tabular-dpo-s3"]
    assert json.loads((out / "tabular-adadpo-s3" / "config.json").read_text())["config"]["loss"] == "adadpo"


@pytest.mark.parametrize(
    "text, suffix, expected",
    [
        ('env = "tabular"\nlearnig_rate = 1\n', ".toml", "unknown setting 'learnig_rate'"),
        ('steps = "many"\n', ".toml", "'steps' must be an integer"),
        ('{"beta": true}', ".json", "'beta' must be a number"),
        ('{"steps": 3,', ".json", "line 1: not valid JSON"),
        ('env = \n', ".toml", "not valid TOML"),
        ("steps = 3", ".ini", "config files must end in .toml, .json, .yaml or .yml"),
        ("steps: [3\n", ".yaml", "line 2: not valid YAML"),
        ("batch_size: 4\nper_device_train_batch_size: 2\n", ".yml", "line 1: 'batch_size' is not available for a TRL recipe"),
    ],
)
def test_bad_config_file(tmp_path, capsys, text, suffix, expected):
    cfg = tmp_path / f"job{suffix}"
    cfg.write_text(text)
    out = tmp_path / "run"
    assert main(["record", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and expected in err
    assert not out.exists()


def test_config_keys_accept_dashes_and_underscores(tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text("grad-accum = 2\ncheckpoint_every = 7\nshuffle = false\n")
    assert load_config_file(cfg) == {"grad_accum": 2, "checkpoint_every": 7, "shuffle": False}


def test_no_arguments_is_dpo_then_balanced_on_tiny_gpt2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plans = _plan(_args([]))
    assert [(p.cfg.env, p.cfg.loss, str(p.path), p.action) for p in plans] == [
        ("tiny-gpt2", "dpo", "runs/tiny-gpt2-dpo-s0", P.NEW),
        ("tiny-gpt2", "balanced", "runs/tiny-gpt2-balanced-s0", P.NEW),
    ]
    assert plans[0].cfg.steps == get_env("tiny-gpt2").defaults.steps


def test_rerunning_the_default_job_picks_fresh_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny-gpt2-dpo-s0").mkdir(parents=True)
    # A config.json as gradlens writes it: --overwrite replaces only directories it recognises.
    (tmp_path / "runs" / "tiny-gpt2-dpo-s0" / "config.json").write_text('{"schema_version": 1, "kind": "preference", "config": {}}')
    plans = _plan(_args([]))
    assert [str(p.path) for p in plans] == ["runs/tiny-gpt2-dpo-s0-2", "runs/tiny-gpt2-balanced-s0-2"]
    assert "runs/tiny-gpt2-dpo-s0 exists, so this job writes runs/tiny-gpt2-dpo-s0-2" in plans[0].note
    (tmp_path / "runs" / "tiny-gpt2-balanced-s0-2").mkdir()
    (tmp_path / "runs" / "tiny-gpt2-balanced-s0-2" / "x").write_text("")
    assert [str(p.path) for p in _plan(_args([]))] == ["runs/tiny-gpt2-dpo-s0-3", "runs/tiny-gpt2-balanced-s0-3"]
    # --overwrite targets the plain names; --resume the most recent set.
    assert [(str(p.path), p.action) for p in _plan(_args(["--overwrite"]))] == [
        ("runs/tiny-gpt2-dpo-s0", P.OVERWRITE), ("runs/tiny-gpt2-balanced-s0", P.NEW)]
    with pytest.raises(ValueError, match="not a gradlens run directory"):
        _plan(_args(["--resume"]))  # -2 holds a stray file, not a run


def test_resume_refuses_changed_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["record", "--env", "tabular", "--loss", "dpo", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    before = (out / "config.json").read_bytes()
    assert main(["record", "--env", "tabular", "--loss", "dpo", "--lr", "0.5", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "cannot change --lr when resuming" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == before
