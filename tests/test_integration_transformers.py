"""gradlens in a plain ``transformers.Trainer`` with a user's own pairwise loss.

Batches carry ``row_groups``; the reference pulls the user's loss back through
each group's rows with separate ``autograd.grad`` passes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from gradlens.integrations.transformers import GradlensCallback, GradlensTrainerMixin, pair_row_groups
from gradlens.runs import load_run, schema
from models import VOCAB, sequence_logps, tiny_gpt2

T, PROMPT, NUM_PAIRS = 7, 3, 6


def pairs() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(NUM_PAIRS):
        chosen = torch.randint(2, VOCAB, (T,), generator=g)
        rejected = torch.randint(2, VOCAB, (T,), generator=g)
        rejected[:PROMPT] = chosen[:PROMPT]
        out.append({"chosen": chosen, "rejected": rejected})
    return out


def collate(examples: list[dict], *, groups: bool = True) -> dict:
    b = len(examples)
    batch = {"input_ids": torch.stack([e["chosen"] for e in examples] + [e["rejected"] for e in examples])}
    if groups:
        batch["row_groups"] = pair_row_groups(b)
    return batch


def pairwise_loss(model, input_ids):
    logps = sequence_logps(model, input_ids, PROMPT)
    b = input_ids.shape[0] // 2
    return -F.logsigmoid(0.5 * (logps[:b] - logps[b:])).mean()


class PairTrainer(GradlensTrainerMixin, Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"].clone())
        return pairwise_loss(model, inputs["input_ids"])


def make_trainer(tmp_path, trainer_cls=PairTrainer, groups=True, **kwargs):
    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=3, max_steps=2, learning_rate=1e-2,
        report_to="none", use_cpu=True, remove_unused_columns=False, logging_steps=1, save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = trainer_cls(model=tiny_gpt2(seed=0), args=args, train_dataset=pairs(),
                          data_collator=lambda ex: collate(ex, groups=groups), **kwargs)  # fmt: skip
    trainer.seen = []
    return trainer


def test_callback_records_the_users_pairwise_split(tmp_path):
    run_dir = tmp_path / "run"
    trainer = make_trainer(tmp_path, callbacks=[GradlensCallback(run_dir, config={"loss": "my-pairwise"})])
    trainer.train()

    model = tiny_gpt2(seed=0)  # the weights at step 0
    params = list(model.parameters())
    ids = trainer.seen[0]
    b = ids.shape[0] // 2
    logps = sequence_logps(model, ids, PROMPT)
    (w,) = torch.autograd.grad(-F.logsigmoid(0.5 * (logps[:b] - logps[b:])).mean(), logps, retain_graph=True)
    ref = []
    for rows in (slice(0, b), slice(b, 2 * b)):
        grads = torch.autograd.grad(logps[rows], params, grad_outputs=w[rows], retain_graph=True, allow_unused=True)
        ref.append(torch.cat([g.reshape(-1) for g in grads if g is not None]))

    run = load_run(run_dir)
    row = run.steps.set_index("step").loc[0]
    assert run.config["env"] == "transformers" and run.config["loss"] == "my-pairwise"
    assert math.isclose(row["grad_norm/chosen"], ref[0].norm().item(), rel_tol=1e-5)
    assert math.isclose(row["grad_norm/rejected"], ref[1].norm().item(), rel_tol=1e-5)
    assert math.isclose(row["grad/dot"], (ref[0] @ ref[1]).item(), rel_tol=1e-4)
    assert math.isclose(row["grad_norm"], trainer.state.log_history[0]["grad_norm"], rel_tol=1e-5)
    assert math.isclose(row["loss"], trainer.state.log_history[0]["loss"], rel_tol=1e-3)
    assert list(run.steps.step) == [0, 1] and run.summary["status"] == "complete"
    assert tuple(run.summary) == schema.SUMMARY_KEYS  # the same writer and keys as `gradlens record`
    assert run.summary["steps_logged"] == 2 and run.summary["unattributed_parameters"] == []
    assert math.isclose(run.layers[run.layers.step == 0].chosen_sq.sum(), row["grad_norm/chosen"] ** 2, rel_tol=1e-9)


def test_batch_without_row_groups_is_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, groups=False, callbacks=[GradlensCallback(tmp_path / "run")])
    with pytest.raises(ValueError, match="no 'row_groups' entry"):
        trainer.train()


def test_callback_without_the_mixin_says_what_is_missing(tmp_path):
    class PlainTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return pairwise_loss(model, inputs["input_ids"])

    trainer = make_trainer(tmp_path, trainer_cls=PlainTrainer, groups=False, callbacks=[GradlensCallback(tmp_path / "run")])
    with pytest.raises(RuntimeError, match="GradlensTrainerMixin"):
        trainer.train()


def test_resumed_trainer_continues_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    first = make_trainer(tmp_path, callbacks=[GradlensCallback(run_dir)])
    first.args.save_strategy, first.args.save_steps = "steps", 1
    first.train()
    assert list(load_run(run_dir).steps.step) == [0, 1]
    second = make_trainer(tmp_path, callbacks=[GradlensCallback(run_dir, resume=True)])
    second.args.max_steps = 3
    second.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-1"))
    run = load_run(run_dir)
    assert list(run.steps.step) == [0, 1, 2]  # step 1 was dropped and recorded again, nothing duplicated
    assert sorted(set(run.layers.step)) == [0, 1, 2] and run.summary["status"] == "complete"


def test_callback_puts_the_split_into_the_trainers_own_logs(tmp_path):
    """log_history (what W&B, trackio, ... receive) and a real report_to=["tensorboard"] event file."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from transformers.integrations import TensorBoardCallback

    # What report_to=["tensorboard"] installs, in the same place: before the user's callbacks.
    trainer = make_trainer(tmp_path, callbacks=[TensorBoardCallback(), GradlensCallback(tmp_path / "run", record_every=2)])
    trainer.args.max_steps = 4
    trainer.train()
    steps = load_run(tmp_path / "run").steps.set_index("step")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    split = ["grad_norm/chosen", "grad_norm/rejected", "grad/dot", "grad/cosine", "grad/ratio"]
    for entry in logged:
        recorded = (entry["step"] - 1) // 2 * 2  # record_every=2: steps 0 and 2; unrecorded steps repeat nothing
        if entry["step"] - 1 == recorded:
            assert all(entry[name] == steps.loc[recorded, name] for name in split)
        else:
            assert not any(name in entry for name in split)  # not measured: absent, never a NaN standing for "skipped"
        assert "lr" not in entry and "learning_rate" in entry and entry["nonfinite"] == 0.0
    (events,) = {p.parent for p in (tmp_path / "trainer").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    ratio = acc.Scalars("train/grad/ratio")
    assert [e.step for e in ratio] == [1, 3]
    assert [e.value for e in ratio] == pytest.approx([steps.loc[0, "grad/ratio"], steps.loc[2, "grad/ratio"]], rel=1e-6)
