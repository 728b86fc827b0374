"""`gradlens record --env user` with LoRA (--lora-r ...) and with --dtype bfloat16, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from gradlens.cli import main
from test_record_user import STANDARD, _record, _reference_norms, _steps, _write_jsonl, model_dir  # noqa: F401 (fixture)

BF16_TOL = 1e-3  # vs the float32 model: measured 8.0e-5 / 9.5e-5 (chosen / rejected) on this tiny model (small logits)


def test_lora_settings_in_config_adapter_in_checkpoints_and_resume(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    out = tmp_path / "run"
    lora = ["--lora-r", "4", "--lora-alpha", "16", "--lora-target-modules", "c_attn,c_fc", "--lora-dropout", "0.1"]
    assert _record(model_dir, data, out, *lora, "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--checkpoint-every", "1") == 0
    header = json.loads((out / "config.json").read_text())
    config = header["config"]
    assert (config["lora_r"], config["lora_alpha"], config["lora_target_modules"], config["lora_dropout"]) == (4, 16.0, "c_attn,c_fc", 0.1)
    assert header["config"]["env_info"]["lora"]["target_modules"] == ["c_attn", "c_fc"]
    steps = _steps(out)
    assert (steps["grad_norm/chosen"] > 0).all() and (steps["grad_norm/rejected"] > 0).all()
    import pandas as pd

    layers = set(pd.read_csv(out / "layers.csv").layer)
    assert layers and all("lora_" in layer for layer in layers)  # the frozen base is not recorded

    adapter = out / "checkpoints" / "step_2" / "adapter"
    assert not (adapter.parent / "config.json").exists()  # peft-named weights: not offered to from_pretrained
    assert (adapter / "tokenizer_config.json").is_file()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 16 and saved["lora_dropout"] == 0.1
    assert set(saved["target_modules"]) == {"c_attn", "c_fc"}
    from transformers import AutoModelForCausalLM

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert b and any(p.abs().sum() > 0 for p in b)  # trained: B left zero

    # --resume from step 2 to 3 continues the same LoRA run
    assert main(["record", "--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 0
    assert list(_steps(out).step) == [0, 1, 2]


def test_lora_alpha_default_is_stored_resolved():
    from gradlens.record.config import resolve

    (cfg,) = resolve({}, {"env": "user", "model": "m", "data": "d.jsonl", "loss": ("dpo",), "lora_r": 8})
    assert cfg.lora_alpha == 16.0 and cfg.lora_target_modules == "all-linear"
    (cfg,) = resolve({}, {"env": "user", "model": "m", "data": "d.jsonl", "loss": ("dpo",)})
    assert cfg.lora_r == 0 and cfg.lora_alpha is None  # no LoRA: nothing to resolve


def test_lora_flags_need_a_rank_and_the_user_env(capsys, tmp_path):
    assert main(["record", "--env", "tabular", "--lora-r", "4", "--out", str(tmp_path / "a")]) == 2
    assert "--lora-r is only used with --env user" in capsys.readouterr().err
    assert main(["record", "--env", "tabular", "--lora-alpha", "4", "--out", str(tmp_path / "b")]) == 2
    assert "--lora-alpha needs --lora-r" in capsys.readouterr().err


def test_lora_unknown_target_module_is_one_clear_error(model_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    assert _record(model_dir, data, tmp_path / "run", "--lora-r", "2", "--lora-target-modules", "nope_proj") == 2
    err = capsys.readouterr().err
    assert "--lora-target-modules 'nope_proj'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_dtype_bfloat16_end_to_end(model_dir, tmp_path):
    batch = 5
    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    out = tmp_path / "run"
    assert _record(model_dir, data, out, "--no-shuffle", "--steps", "2", "--batch-size", str(batch), "--beta", "0.1",
                   "--dtype", "bfloat16", "--device", "cpu", "--checkpoint-every", "1") == 0  # fmt: skip
    steps = _steps(out)
    assert (steps["nonfinite"] == 0).all()
    want_c, want_r = _reference_norms(model_dir, STANDARD[:batch], beta=0.1)  # float32 model
    row = steps.iloc[0]
    assert abs(row["grad_norm/chosen"] - want_c) <= BF16_TOL * want_c
    assert abs(row["grad_norm/rejected"] - want_r) <= BF16_TOL * want_r
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    from safetensors import safe_open

    with safe_open(str(out / "checkpoints" / "step_2" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16


def test_trl_recipe_lora_keys(tmp_path):
    """A TRL recipe's use_peft and lora_* keys go to TRL's own get_peft_config: on with TRL's defaults, off without use_peft."""
    trl = pytest.importorskip("trl")
    from gradlens.record.trl_recipe import parse_recipe

    where = {"model_name_or_path": "m", "dataset_name": "d.jsonl"}
    on = parse_recipe(tmp_path / "on.yaml", {**where, "use_peft": True, "lora_r": 8, "lora_target_modules": ["q_proj", "v_proj"]}, {})
    peft = trl.get_peft_config(trl.ModelConfig(**on.model))
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, sorted(peft.target_modules)) == (8, 32, 0.05, ["q_proj", "v_proj"])
    off = parse_recipe(tmp_path / "off.yaml", {**where, "use_peft": False, "lora_r": 8, "lora_alpha": 16}, {})
    assert trl.get_peft_config(trl.ModelConfig(**off.model)) is None  # as in TRL: the lora_* keys do nothing
