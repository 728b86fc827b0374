"""The environment registry: the one place `gradlens record --env` choices, defaults, help and checks come from."""

from __future__ import annotations

import argparse
import json
import pkgutil

import pytest

import gradlens.record.envs as envs_package
from gradlens.cli import main
from gradlens.record.command import add_arguments
from gradlens.record.config import RecordConfig, resolve, validate, with_env_defaults
from gradlens.record.envs import build_env
from gradlens.record.envs.registry import ENVS, EnvDefaults, envs_with, get_env, load_envs, register_env
from gradlens.record.envs.tabular import TabularEnv
from gradlens.runs import schema

# A registered environment for these tests only: the tabular task under other defaults and flags.
NAME = "tabular-test-copy"
DEFAULTS = EnvDefaults(lr=0.02, optimizer="sgd", batch_size=6, steps=3, eval_every=2, checkpoint_every=3, max_length=2)


@pytest.fixture
def copy_env():
    load_envs()
    register_env(NAME, help="the tabular task, registered by a test", defaults=DEFAULTS, small=True)(type("CopyEnv", (TabularEnv,), {}))
    try:
        yield ENVS[NAME]
    finally:
        del ENVS[NAME]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_every_module_registers_one_environment():
    modules = {m.name for m in pkgutil.iter_modules(envs_package.__path__)} - {"base", "registry"}
    registered = {spec.cls.__module__.rpartition(".")[2] for spec in load_envs().values()}
    assert registered == modules  # a module that registers nothing, or a registration outside the package, fails here
    assert set(load_envs()) == {"tabular", "tiny-gpt2", "user"}
    assert envs_with("small") == ("tabular", "tiny-gpt2") and envs_with("model_and_data") == ("user",)
    for name, spec in load_envs().items():
        assert spec.cls.name == name


def test_a_duplicate_name_raises():
    with pytest.raises(ValueError, match="'tabular' is already registered"):
        register_env("tabular", help="x", defaults=DEFAULTS)(type("Again", (TabularEnv,), {}))
    assert ENVS["tabular"].cls is TabularEnv


def test_unknown_env_lists_the_registry(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--env must be one of \['tabular', 'tiny-gpt2', 'user'\], got 'nope'"):
        get_env("nope")
    job = tmp_path / "job.toml"
    job.write_text('env = "nope"\n')
    assert main(["record", "--config", str(job)]) == 2  # a config file's unknown env: one line, no traceback
    assert "--env must be one of ['tabular', 'tiny-gpt2', 'user'], got 'nope'" in capsys.readouterr().err


def test_a_registered_env_reaches_choices_defaults_help_and_checks(copy_env, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # --help on one line per flag, so no name is wrapped at its hyphen
    parser = _parser()
    assert parser.parse_args(["--env", NAME]).env == NAME  # a --env choice
    text = " ".join(parser.format_help().split())
    assert f"{NAME}: the tabular task, registered by a test" in text
    assert f"{NAME} 0.02" in text and f"{NAME} sgd" in text and f"{NAME} 6" in text  # --lr, --optimizer, --batch-size
    cfg = validate(with_env_defaults(RecordConfig(env=NAME)))
    assert (cfg.lr, cfg.optimizer, cfg.batch_size, cfg.steps) == (0.02, "sgd", 6, 3)
    with pytest.raises(ValueError, match=f"--data is only used with --env user \\(the {NAME} environment builds its own\\)"):
        resolve({}, {"env": NAME, "data": "x.jsonl", "loss": ("dpo",)})
    with pytest.raises(ValueError, match="--fsdp is for --env user"):
        validate(with_env_defaults(RecordConfig(env=NAME, fsdp=True)))
    assert isinstance(build_env(cfg, log=lambda _: None), TabularEnv)


def test_a_registered_env_records_a_run(copy_env, tmp_path):
    out = tmp_path / "run"
    assert main(["record", "--env", NAME, "--loss", "dpo", "--out", str(out), "--quiet", "--no-tensorboard"]) == 0
    config = json.loads((out / schema.CONFIG).read_text())["config"]
    assert (config["env"], config["lr"], config["optimizer"], config["steps"]) == (NAME, 0.02, "sgd", 3)
    assert len((out / schema.STEPS).read_text().splitlines()) == 1 + 3
