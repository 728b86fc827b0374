"""gradlens inside a real ``trl.DPOTrainer``: the recorded split against TRL's own loss.

The model (tiny GPT-2, tied embeddings) and a word-level tokenizer are built and
saved by the test; nothing is downloaded. The reference is independent of gradlens:
a plain ``trl.DPOTrainer`` with TRL's *fused* LM head computes its own loss on the
very batches the gradlens run trained on, and separate ``autograd.grad`` passes
pull its per-token weights back through the chosen rows and the rejected rows.
"""

from __future__ import annotations

import importlib
import math
import sys
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import gradlens  # noqa: E402
from gradlens.gradients import UnattributedGradientWarning  # noqa: E402
from gradlens.runs import load_run  # noqa: E402
from trl_harness import PAIRS, TOL, WORDS, dpo_config, flat, save_tiny_gpt2, spy_training_batches, trl_loss_split  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def make_trainer(model_dir, tmp_path, run_dir=None, **kwargs):
    from gradlens.integrations.trl import GradlensDPOTrainer

    config_overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("loss", "unfused_head", "head_chunk_elements")}
    return GradlensDPOTrainer(
        model=model_dir, args=dpo_config(tmp_path, **config_overrides), train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(model_dir), gradlens_dir=run_dir, **kwargs,
    )  # fmt: skip


def trl_reference(model_dir, tmp_path, micro_batches):
    """(g_chosen, g_rejected, per-parameter chosen parts) of TRL's own loss, summed over micro-batches as Trainer does."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir)  # the initial weights: step 0
    plain = trl.DPOTrainer(
        model=policy, args=dpo_config(tmp_path, gradient_checkpointing=False, output_dir=str(tmp_path / "reference")),
        train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=AutoTokenizer.from_pretrained(model_dir),
    )  # fmt: skip
    names = {id(p): n for n, p in policy.named_parameters()}
    params = list({id(p): p for p in policy.parameters() if p.requires_grad}.values())
    sums = trl_loss_split(plain, policy, params, micro_batches)
    per_param = {names[id(p)]: (gc, gr) for p, gc, gr in zip(params, *sums)}
    return flat(sums[0]), flat(sums[1]), per_param


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_step0_split_equals_trl_loss_reference_with_checkpointing(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    # head_chunk_elements: the unfused head runs over 2-position slices, each checkpointed
    trainer = make_trainer(model_dir, tmp_path, run_dir, head_chunk_elements=2 * 8 * len(WORDS))
    seen = spy_training_batches(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnattributedGradientWarning)  # the tied head weight must be attributed
        trainer.train()
    assert seen[0]["_checkpointing"], "DPOConfig's default gradient checkpointing should be on"
    assert len(seen) == 3 and seen[0]["input_ids"].shape[0] == 8

    gc, gr, per_param = trl_reference(model_dir, tmp_path, seen[:1])
    run = load_run(run_dir)
    assert run.kind == "preference" and run.config["env"] == "trl" and run.config["loss"] == "dpo"
    row = run.steps.set_index("step").loc[0]
    assert rel(row["grad_norm/chosen"], gc.norm().item()) <= TOL
    assert rel(row["grad_norm/rejected"], gr.norm().item()) <= TOL
    assert rel(row["grad_norm"], (gc + gr).norm().item()) <= TOL
    assert abs(row["grad/dot"] - (gc @ gr).item()) <= TOL * gc.norm().item() * gr.norm().item()
    # The fused-head trap: lm_head.weight is transformer.wte.weight; its split must be exact too.
    wte = run.layers[(run.layers.step == 0) & (run.layers.layer == "transformer.wte")].iloc[0]
    ref_c, ref_r = per_param["transformer.wte.weight"]
    assert rel(wte["chosen_sq"], ref_c.pow(2).sum().item()) <= 2 * TOL
    assert rel(wte["rejected_sq"], ref_r.pow(2).sum().item()) <= 2 * TOL
    # Trainer's own (pre-clip) grad_norm is the same gradient.
    assert rel(row["grad_norm"], trainer.state.log_history[0]["grad_norm"]) <= TOL

    assert list(run.steps.step) == [0, 1, 2] and set(run.layers.step) == {0, 1, 2}
    assert run.summary["status"] == "complete" and run.summary["unattributed_parameters"] == []
    assert list(run_dir.glob("events.out.tfevents.*")), "TensorBoard events were not written"
    assert math.isclose(row["rewards/margins"], trainer.state.log_history[0]["rewards/margins"], abs_tol=1e-6)

    from gradlens.cli import main

    assert main(["plot", str(run_dir), "--out", str(tmp_path / "figures")]) == 0
    assert list((tmp_path / "figures").glob("*.png"))


def test_gradient_accumulation_with_a_smaller_last_micro_batch(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    trainer = make_trainer(model_dir, tmp_path, run_dir, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                           max_steps=1, gradient_checkpointing=False)  # fmt: skip
    seen = spy_training_batches(trainer)
    trainer.train()
    assert [s["input_ids"].shape[0] for s in seen] == [6, 4]  # 3 pairs, then the last 2
    gc, gr, _ = trl_reference(model_dir, tmp_path, seen)
    row = load_run(run_dir).steps.iloc[0]
    assert rel(row["grad_norm/chosen"], gc.norm().item()) <= TOL
    assert rel(row["grad_norm/rejected"], gr.norm().item()) <= TOL
    assert rel(row["grad_norm"], trainer.state.log_history[0]["grad_norm"]) <= TOL


def test_fused_head_kept_leaves_the_tied_weight_unattributed(model_dir, tmp_path):
    # The trap the unfused head avoids: TRL's kernel reads lm_head.weight (= wte.weight) directly.
    run_dir = tmp_path / "run"
    trainer = make_trainer(model_dir, tmp_path, run_dir, unfused_head=False, max_steps=1)
    with pytest.warns(UnattributedGradientWarning, match="transformer.wte.weight"):
        trainer.train()
    run = load_run(run_dir)
    assert run.summary["unattributed_parameters"] == ["transformer.wte.weight"]
    assert "transformer.wte" not in set(run.layers.layer)


def test_unfused_head_that_disagrees_with_trls_head_stops_training(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, tmp_path / "run", max_steps=1)
    trainer._gradlens_head.scale = 1.5  # as if the model scaled its logits in a way gradlens missed
    with pytest.raises(RuntimeError, match="disagrees with TRL's fused head"):
        trainer.train()


@pytest.mark.parametrize("method", ["balanced", "adadpo"])
def test_gradlens_losses_inside_dpotrainer(model_dir, tmp_path, method):
    trainer = make_trainer(model_dir, tmp_path, loss=method, max_steps=2, gradient_checkpointing=False)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    fused, tapped = trainer.model.forward, {}

    def tap(*args, **kwargs):
        out = fused(*args, **kwargs)
        if torch.is_grad_enabled():
            tapped["log_probs"] = out.log_probs
        return out

    trainer.model.forward = tap
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    trainer.model.forward = fused  # back to the trainer's own forward
    lp = tapped["log_probs"]
    (w,) = torch.autograd.grad(loss, lp)
    assert torch.equal(w, w[:, :1].expand_as(w))  # one coefficient per row: d loss / d l_row
    coeff = w[:, 0]

    b = lp.shape[0] // 2
    logps = lp.detach().sum(1)
    chosen, rejected = logps[:b].clone().requires_grad_(), logps[b:].clone().requires_grad_()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    lengths = inputs["completion_mask"].sum(1)
    out = gradlens.preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=trainer.beta, method=method,
                                   chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])  # fmt: skip
    out.loss.backward()
    assert not torch.allclose(out.weight_chosen * out.beta_chosen, torch.full_like(chosen, trainer.beta))  # not plain DPO
    torch.testing.assert_close(coeff[:b], chosen.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(coeff[b:], rejected.grad, rtol=1e-6, atol=0)
    assert math.isclose(loss.item(), out.dpo_loss.item(), rel_tol=1e-6)  # the logged loss is DPO's value

    trainer.train()  # TRL's own metrics are still logged, with gradlens's weights beside them
    logged = trainer.state.log_history[0]
    assert {"rewards/chosen", "rewards/margins", "logps/rejected", "entropy", "weights/chosen", "weights/rejected"} <= set(logged)


def test_gradlens_loss_refuses_other_trl_losses(model_dir, tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        make_trainer(model_dir, tmp_path, loss="balanced", loss_type=["hinge"])
    with pytest.raises(ValueError, match="choose one of"):
        make_trainer(model_dir, tmp_path, loss="ipo")


def forget_integration(monkeypatch):
    """Make the next import of gradlens.integrations.trl run its module code again (undone after the test)."""
    import gradlens.integrations as package

    monkeypatch.setattr(package, "trl", package.__dict__.get("trl"), raising=False)
    monkeypatch.delitem(sys.modules, "gradlens.integrations.trl", raising=False)


def test_missing_trl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    forget_integration(monkeypatch)
    with pytest.raises(ImportError, match=r"pip install 'gradlens\[trl\]'"):
        importlib.import_module("gradlens.integrations.trl")


def test_unsupported_trl_version_fails_clearly(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.15.2")
    forget_integration(monkeypatch)
    with pytest.raises(ImportError, match=r"supports trl>=1\.16\.0,<1\.17\.0, but trl 1\.15\.2"):
        importlib.import_module("gradlens.integrations.trl")
    monkeypatch.setenv("GRADLENS_ALLOW_UNSUPPORTED_TRL", "1")
    forget_integration(monkeypatch)
    with pytest.warns(RuntimeWarning, match="1.15.2"):
        importlib.import_module("gradlens.integrations.trl")


def _tensorboard_scalars(root, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` in the event files under ``root`` (read back with tensorboard itself)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in root.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


SPLIT = ["grad_norm/chosen", "grad_norm/rejected", "grad/dot", "grad/cosine", "grad/ratio"]


def test_trainer_logs_and_report_to_tensorboard_carry_the_split(model_dir, tmp_path):
    """What a report_to user sees: the split in log_history and in Trainer's own TensorBoard events."""
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    trainer = make_trainer(model_dir, tmp_path, run_dir, loss="balanced", max_steps=4, logging_steps=2,
                           report_to=["tensorboard"], gradient_checkpointing=False)  # fmt: skip
    trainer.train()
    steps = load_run(run_dir).steps.set_index("step")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    for entry in logged:
        row = steps.loc[entry["step"] - 1]  # Trainer logs after the update; gradlens's row is the step's gradient
        for name in SPLIT:
            assert entry[name] == row[name], name
        # steps.csv's lr is Trainer's learning_rate: the rate the step's update used (linear decay here).
        assert "lr" not in entry and entry["learning_rate"] == pytest.approx(row["lr"], rel=1e-12)
        assert 0 < entry["weights/chosen"] < 2 and entry["weights/chosen"] + entry["weights/rejected"] == pytest.approx(2)
    tensorboard = tmp_path / "trainer"  # report_to writes under output_dir, apart from the gradlens run directory
    for name in SPLIT + ["weights/chosen"]:
        events = _tensorboard_scalars(tensorboard, f"train/{name}")
        assert [step for step, _ in events] == [2, 4], name
        assert [v for _, v in events] == pytest.approx([entry[name] for entry in logged], rel=1e-6), name
    assert list(run_dir.glob("events.out.tfevents.*")) and load_run(run_dir).summary["status"] == "complete"
