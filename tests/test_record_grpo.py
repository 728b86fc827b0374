"""GRPO on the built-in toy task: the recorded positive/zero/negative split against separate
``torch.autograd.grad`` passes, and the run directory it writes.

The reference rebuilds the first generation batch from the seed (the policy and the sampler
are seeded), writes the clipped GRPO objective itself, and takes one gradient per group with
the other rows' log-probs detached.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradlens.record import grpo_task as task
from gradlens.record.grpo import GRPOSettings, generate, record_grpo
from gradlens.runs import load_run, schema

TOL = 1e-5


def reference_split(s: GRPOSettings) -> dict[str, list[torch.Tensor]]:
    policy = task.build_policy(s.seed)
    reference = task.build_policy(s.seed).requires_grad_(False) if s.kl > 0 else None
    batch = generate(policy, reference, s, torch.Generator().manual_seed(s.seed), first_id=0)
    params = [p for p in policy.parameters() if p.requires_grad]
    a = batch.advantages
    masks = {"all": torch.ones_like(a, dtype=torch.bool), schema.POSITIVE: a > 0, schema.NEGATIVE: a < 0, schema.ZERO: a == 0}
    out = {}
    for name, keep in masks.items():
        lp = task.completion_logps(policy, batch.prompts, batch.completions)
        lp = torch.where(keep[:, None], lp, lp.detach())
        ratio = torch.exp(lp - batch.old_logps)
        term = -torch.min(ratio * a[:, None], ratio.clamp(1 - s.epsilon, 1 + s.epsilon) * a[:, None])
        if s.kl > 0:
            term = term + s.kl * (torch.exp(batch.ref_logps - lp) - (batch.ref_logps - lp) - 1)
        out[name] = list(torch.autograd.grad(term.mean(), params))
    return out


def norm(grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


@pytest.mark.parametrize("kl", [0.0, 0.2])
def test_first_step_matches_separate_autograd_passes(kl, tmp_path):
    torch.set_num_threads(1)
    s = GRPOSettings(steps=3, seed=3, kl=kl, iterations=2, eval_every=0)
    record_grpo(s, tmp_path / "run", tensorboard=False, log=lambda m: None)
    run = load_run(tmp_path / "run")
    row = run.steps.iloc[0]
    ref = reference_split(s)
    norms = {g: norm(v) for g, v in ref.items()}
    assert norms[schema.POSITIVE] > 0 and norms[schema.NEGATIVE] > 0
    for g in (schema.POSITIVE, schema.NEGATIVE):
        assert abs(row[schema.group_norm_column(g)] - norms[g]) <= TOL * norms[g], g
    dot = sum(float((p.double() * n.double()).sum()) for p, n in zip(ref[schema.POSITIVE], ref[schema.NEGATIVE]))
    assert abs(row[schema.GRAD_DOT] - dot) <= TOL * norms[schema.POSITIVE] * norms[schema.NEGATIVE]
    assert abs(row[schema.GRAD_NORM] - norms["all"]) <= TOL * norms["all"]
    assert abs(row[schema.group_norm_column(schema.ZERO)] - norms[schema.ZERO]) <= TOL * norms["all"]
    # the groups add up to the plain gradient
    summed = [p + n + z for p, n, z in zip(ref[schema.POSITIVE], ref[schema.NEGATIVE], ref[schema.ZERO])]
    assert norm([x - y for x, y in zip(summed, ref["all"])]) <= TOL * norms["all"]
    if kl == 0:  # no gradient reaches zero-advantage rows: ||g||^2 = ||g+||^2 + ||g-||^2 + 2 <g+, g->
        gp, gn = row[schema.group_norm_column(schema.POSITIVE)], row[schema.group_norm_column(schema.NEGATIVE)]
        assert row[schema.group_norm_column(schema.ZERO)] == 0
        assert abs(row[schema.GRAD_NORM] ** 2 - (gp**2 + gn**2 + 2 * row[schema.GRAD_DOT])) <= 1e-5 * row[schema.GRAD_NORM] ** 2
    counts = row[schema.COUNT_POSITIVE] + row[schema.COUNT_NEGATIVE] + row[schema.COUNT_ZERO]
    assert counts == s.batch_size * s.num_generations and row[schema.PROMPT_GROUPS] == s.batch_size


def test_run_directory_and_settings_errors(tmp_path):
    torch.set_num_threads(1)
    record_grpo(GRPOSettings(steps=4, eval_every=2, seed=1), tmp_path / "run", log=lambda m: None)
    run = load_run(tmp_path / "run")
    assert run.summary["status"] == "complete" and len(run.steps) == 4
    assert run.config[schema.CONFIG_GROUPS] == [schema.POSITIVE, schema.NEGATIVE] and run.config["loss"] == "grpo"
    assert list(run.evals[schema.STEP]) == [0, 2, 4]
    assert set(run.layers[schema.LAYER]) and (run.layers[schema.CHOSEN_SQ] >= 0).all()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run").iterdir())
    for bad, message in ((dict(num_generations=1), "num_generations"), (dict(epsilon=1.5), "epsilon"), (dict(kl=-1.0), "kl")):
        with pytest.raises(ValueError, match=message):
            record_grpo(GRPOSettings(**bad), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_verifier_and_advantages():
    prompts = torch.tensor([[task.BOS, 3, 5], [task.BOS, 6, 6]])
    answers = [(3 + 1) % task.NUM_DIGITS, (6 + 1) % task.NUM_DIGITS]
    completions = torch.tensor([[answers[0]] * task.ANSWER_TOKENS, [answers[1], 0, answers[1]]])
    assert task.verifier_reward(prompts, completions).tolist() == pytest.approx([1.0, 2 / 3 if answers[1] != 0 else 1.0])
    from gradlens.record.grpo import group_advantages

    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2)
    assert adv[0] > 0 > adv[1] and adv[2] == adv[3] == 0


def test_command_line(tmp_path, capsys):
    from gradlens.cli import main

    out = tmp_path / "run"
    base = ["record", "--loss", "grpo", "--steps", "3", "--eval-every", "0", "--quiet", "--no-tensorboard"]
    assert main([*base, "--out", str(out), "--loss-option", "num_generations=4", "--loss-option", "kl=0.1"]) == 0
    run = load_run(out)
    assert run.complete and run.config["num_generations"] == 4 and run.config["kl"] == 0.1
    assert "rho = |g_negative|/|g_positive|" in capsys.readouterr().out
    assert main([*base, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--overwrite"]) == 0
    bad = {
        ("--beta", "0.3"): "--beta has no meaning for --loss grpo",
        ("--loss", "grpo,dpo"): "record it alone",
        ("--env", "tabular"): "--env toy-grpo",
        ("--loss-option", "gamma=2"): "grpo's options are num_generations, epsilon, kl, iterations",
        ("--loss-option", "num_generations=1"): "num_generations must be at least 2",
        ("--resume",): "--resume is not available",
    }
    for extra, message in bad.items():
        assert main([*base, "--out", str(tmp_path / "bad"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "bad").exists()
    (tmp_path / "a-file").write_text("mine")
    assert main([*base, "--out", str(tmp_path / "a-file")]) == 2 and "is a file" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main([*base, "--out", str(tmp_path / "other"), "--overwrite"]) == 2  # never deletes what gradlens did not write
    capsys.readouterr()
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert main(["record", "--env", "toy-grpo", "--loss", "dpo", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "use it with --loss grpo" in capsys.readouterr().err


def test_tensorboard_layout_names_the_groups(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    torch.set_num_threads(1)
    record_grpo(GRPOSettings(steps=3, eval_every=2, seed=2), tmp_path / "run", log=lambda m: None)
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    charts = {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}
    split = charts["gradlens: positive vs negative"]
    assert split["rho = |g_negative| / |g_positive| (> 1: negative dominates)"] == [f"^{schema.GRAD_RATIO}$"]
    assert "gradlens: advantages" in charts and "gradlens: evaluation" in charts
    assert not any("chosen" in title or "rejected" in title for c in charts.values() for title in c)
    steps = load_run(tmp_path / "run").steps
    assert [e.value for e in acc.Scalars("grad_norm/negative")] == pytest.approx(steps["grad_norm/negative"].tolist(), rel=1e-6)


def test_plot_names_the_groups_and_never_pools_dpo_with_grpo(tmp_path, capsys):
    """`gradlens plot` on a GRPO run and a DPO run: the labels say which groups each ratio is of,
    the two are never pooled (not even with --group-by), and their ratios are not compared."""
    import pandas as pd

    from gradlens.cli import main
    from gradlens.plot.preference import fig_norms, fig_ratio
    from gradlens.plot.registry import PlotOptions
    from gradlens.analysis.groups import split_pair

    torch.set_num_threads(1)
    grpo, dpo = tmp_path / "grpo", tmp_path / "dpo"
    record_grpo(GRPOSettings(steps=4, eval_every=0), grpo, tensorboard=False, log=lambda m: None)
    assert main(["record", "--env", "tabular", "--loss", "dpo", "--steps", "4", "--out", str(dpo), "--quiet", "--no-tensorboard"]) == 0
    assert split_pair(load_run(grpo)) == ("positive", "negative") and split_pair(load_run(dpo)) == ("chosen", "rejected")

    options = PlotOptions(out=tmp_path)
    fig = fig_norms({"grpo": [load_run(grpo)]}, options)
    assert "positive (solid) and negative (dashed)" in fig._suptitle.get_text()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["positive ‖g‖", "negative ‖g‖"]
    mixed = fig_ratio({"dpo": [load_run(dpo)], "grpo": [load_run(grpo)]}, options)
    legend = [t.get_text() for t in mixed.axes[0].get_legend().get_texts()]
    assert "dpo (1 run): rejected / chosen" in legend and "grpo (1 run): negative / positive" in legend

    out = tmp_path / "plots"
    assert main(["plot", str(dpo), str(grpo), "--group-by", "seed", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "never pooled" in err
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 and set(summary["ratio_of"]) == {"rejected/chosen", "negative/positive"}
    layers = pd.read_csv(out / "layers.csv")
    assert set(layers["ratio_of"]) == {"rejected/chosen", "negative/positive"}
    assert not (out / "comparison.csv").exists() or pd.read_csv(out / "comparison.csv").empty
