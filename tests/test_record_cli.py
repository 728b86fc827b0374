"""`gradlens record` end to end on the built-in environments."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from gradlens.cli import main
from gradlens.runs import schema
from gradlens.runs import load_run
from gradlens.record.loop import STEP_COLUMNS

TABULAR = ["record", "--env", "tabular", "--quiet"]
# A tiny-gpt2 job small enough for a unit test.
TINY = ["record", "--env", "tiny-gpt2", "--sft-steps", "20", "--steps", "4", "--batch-size", "4", "--eval-every", "2"]


def test_tabular_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TABULAR, "--loss", "balanced", "--steps", "12", "--eval-every", "5", "--checkpoint-every", "4", "--out", str(out)]) == 0
    run = load_run(out)
    assert run.kind == schema.KIND_PREFERENCE and run.complete
    steps = run.steps
    assert tuple(steps.columns) == STEP_COLUMNS
    assert steps["step"].tolist() == list(range(12))
    assert np.isfinite(steps.drop(columns=[schema.STEP]).to_numpy()).all()
    # ||g||^2 = ||g_c||^2 + ||g_r||^2 + 2 <g_c, g_r>, and rho = ||g_r|| / ||g_c||
    identity = steps[schema.GRAD_NORM_CHOSEN] ** 2 + steps[schema.GRAD_NORM_REJECTED] ** 2 + 2 * steps[schema.GRAD_DOT]
    np.testing.assert_allclose(identity, steps[schema.GRAD_NORM] ** 2, rtol=1e-5)
    np.testing.assert_allclose(steps[schema.GRAD_RATIO], steps[schema.GRAD_NORM_REJECTED] / steps[schema.GRAD_NORM_CHOSEN], rtol=1e-12)
    np.testing.assert_allclose(steps[schema.WEIGHT_CHOSEN] + steps[schema.WEIGHT_REJECTED], 2.0, rtol=1e-6)  # Balanced-DPO
    assert steps.loc[0, schema.SIGMOID_NEG_U] == 0.5 and steps.loc[0, schema.REWARDS_MARGINS] == 0.0
    layers = run.layers
    assert set(layers.columns) == {schema.STEP, schema.LAYER, schema.CHOSEN_SQ, schema.REJECTED_SQ, schema.DOT}
    per_step = layers.groupby(schema.STEP)[[schema.CHOSEN_SQ, schema.REJECTED_SQ]].sum()
    np.testing.assert_allclose(per_step[schema.CHOSEN_SQ], steps[schema.GRAD_NORM_CHOSEN] ** 2, rtol=1e-6)
    evals = run.evals
    assert evals["step"].tolist() == [0, 5, 10, 12]
    assert {"eval/kl_to_optimum", "eval/ood_mass", "eval/true_reward", "eval/pref_accuracy"} <= set(evals.columns)
    assert evals["eval/kl_to_optimum"].iloc[-1] < evals["eval/kl_to_optimum"].iloc[0]
    assert 0 < evals["eval/ood_mass"].iloc[0] < 1
    summary = run.summary
    assert summary["status"] == "complete" and summary["nonfinite_steps"] == 0 and summary["wall_time_s"] > 0
    assert summary["final"][schema.STEP] == 11 and summary["final_eval"][schema.STEP] == 12
    # The one preference-run writer: every summary key, the same ones the trainer integrations write.
    assert tuple(summary) == schema.SUMMARY_KEYS and summary[schema.SUMMARY_UNATTRIBUTED] == []
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_12", "step_8"]
    assert list(out.glob("events.out.tfevents.*"))


def test_tiny_gpt2_two_losses_and_next_commands(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main([*TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    dpo, balanced = out / "tiny-gpt2-dpo-s0", out / "tiny-gpt2-balanced-s0"
    unwrapped = captured.out.replace(" \\\n      ", " ")  # long commands continue on the next line
    assert f"gradlens plot {dpo} {balanced}" in unwrapped
    assert f"tensorboard --logdir {out}" in unwrapped
    assert "tiny-gpt2 SFT warm-start: step" in captured.err  # the warm-start is not 20 s of silence
    assert "tiny-gpt2 dpo: step" in captured.err and "|g_c|=" in captured.err and "|g_r|=" in captured.err  # progress bar
    for path in (dpo, balanced):
        run = load_run(path)
        assert run.steps["step"].tolist() == [0, 1, 2, 3]
        evals = run.evals
        assert {"eval/true_reward", "eval/kl_to_ref", "eval/pref_accuracy"} <= set(evals.columns)
        assert evals.loc[0, "eval/kl_to_ref"] == 0.0  # policy == reference before the first update
        assert (path / "checkpoints" / "reference" / "model.safetensors").is_file()
        layers = set(run.layers[schema.LAYER])
        assert {"transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= layers
    # Same warm-start for both runs: the same reference, so identical step-0 rows.
    a, b = load_run(dpo).steps, load_run(balanced).steps
    assert a.loc[0, schema.LOGPS_CHOSEN] == b.loc[0, schema.LOGPS_CHOSEN]
    assert (load_run(balanced).steps[schema.WEIGHT_CHOSEN] != 1.0).all() and (a[schema.WEIGHT_CHOSEN] == 1.0).all()


def test_same_seed_gives_identical_logs(tmp_path):
    for name in ("a", "b"):
        assert main([*TINY, "--loss", "balanced", "--quiet", "--out", str(tmp_path / name)]) == 0
    for table in (schema.STEPS, schema.LAYERS, schema.EVALS):
        assert (tmp_path / "a" / table).read_bytes() == (tmp_path / "b" / table).read_bytes(), table
    assert main([*TINY, "--loss", "balanced", "--quiet", "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "a" / schema.STEPS).read_bytes() != (tmp_path / "c" / schema.STEPS).read_bytes()


def test_grad_accumulation_matches_one_batch(tmp_path):
    common = [*TABULAR, "--loss", "dpo", "--steps", "3", "--batch-size", "32", "--optimizer", "sgd", "--lr", "1.0"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--grad-accum", "3", "--out", str(tmp_path / "three")]) == 0  # 11 + 11 + 10 pairs
    one, three = pd.read_csv(tmp_path / "one" / schema.STEPS), pd.read_csv(tmp_path / "three" / schema.STEPS)
    cols = [schema.LOSS, schema.GRAD_NORM, schema.GRAD_NORM_CHOSEN, schema.GRAD_NORM_REJECTED, schema.GRAD_DOT, schema.REWARDS_MARGINS]
    np.testing.assert_allclose(three[cols].to_numpy(), one[cols].to_numpy(), rtol=1e-5, atol=1e-12)


def test_nonfinite_step_is_logged_then_the_run_stops(tmp_path, capsys):
    out = tmp_path / "run"
    # beta * lr overflows float32: the first update makes the logits infinite.
    rc = main([*TABULAR, "--loss", "dpo", "--steps", "5", "--optimizer", "sgd", "--beta", "1e15", "--lr", "1e30", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "step 1: the loss or the gradient is not finite" in err and "--skip-nonfinite" in err
    steps = load_run(out).steps
    assert steps["step"].tolist() == [0, 1]
    assert steps[schema.NONFINITE].tolist() == [0, 1]
    assert math.isnan(steps.loc[1, schema.LOSS])
    summary = load_run(out).summary
    assert summary["status"] == "nonfinite" and summary["stopped_at_step"] == 1 and "step 1" in summary["message"]


def test_skip_nonfinite_counts_and_continues(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([*TABULAR, "--loss", "dpo", "--steps", "4", "--optimizer", "sgd", "--beta", "1e15", "--lr", "1e30", "--skip-nonfinite", "--out", str(out)])
    assert rc == 0
    steps = load_run(out).steps
    assert steps["step"].tolist() == [0, 1, 2, 3] and steps[schema.NONFINITE].tolist() == [0, 1, 1, 1]
    summary = load_run(out).summary
    assert summary["status"] == "complete" and summary["nonfinite_steps"] == 3 and summary["skipped_steps"] == 3


def test_per_row_norms(tmp_path):
    out = tmp_path / "run"
    assert main([*TABULAR, "--loss", "dpo", "--steps", "2", "--batch-size", "1", "--per-row", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "rows.csv")
    steps = pd.read_csv(out / schema.STEPS)
    assert list(rows.columns) == ["step", "pair", "side", "grad_norm"] and len(rows) == 4
    # With one pair per step, the chosen group is one row: its own norm is ||g_chosen||.
    chosen = rows[rows.side == "chosen"].set_index("step")["grad_norm"]
    np.testing.assert_allclose(chosen.to_numpy(), steps[schema.GRAD_NORM_CHOSEN].to_numpy(), rtol=1e-5)


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    assert main([*TABULAR, "--device", "cuda", "--out", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_training_steps_do_not_accumulate_tensors():
    """Hooks, captures and logged diagnostics must not keep each step's graph alive."""
    import copy
    import gc

    import torch

    from gradlens import GradientRecorder
    from gradlens.record.config import resolve
    from gradlens.record.envs import build_env
    from gradlens.record.loop import PairOrder, ReferenceLogps, StepContext, _train_step, build_optimizer

    cfg = resolve({}, {"env": "tiny-gpt2", "loss": ("balanced",), "sft_steps": 0, "batch_size": 4, "per_row": True})[0]
    env = build_env(cfg, log=lambda _: None)
    policy, reference = copy.deepcopy(env.policy), copy.deepcopy(env.policy).requires_grad_(False)
    optimizer = build_optimizer(cfg, policy.parameters())
    recorder = GradientRecorder(policy)
    refs, order = ReferenceLogps(env, reference, torch.device("cpu")), PairOrder(env.num_pairs(), 4, 0, True)
    ctx = StepContext(cfg, policy, env, recorder, refs, order, optimizer, torch.device("cpu"))

    def live_tensors(first, last):
        for step in range(first, last):
            _train_step(ctx, step)
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = live_tensors(0, 2)
        after = live_tensors(2, 8)
    finally:
        torch.set_num_threads(threads)
        recorder.close()
    assert after - before <= 5, f"{after - before} tensors survived 6 steps"
