"""gradlens inside a real ``trl.DPOTrainer``: the recorded split against TRL's own loss.

The model (tiny GPT-2, tied embeddings) and a word-level tokenizer are built and
saved by the test; nothing is downloaded. The reference is independent of gradlens:
a plain ``trl.DPOTrainer`` with TRL's *fused* LM head computes its own loss on the
very batches the gradlens run trained on, and separate ``autograd.grad`` passes
pull its per-token weights back through the chosen rows and the rejected rows.
"""

from __future__ import annotations

import importlib
import json
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

    config_overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("loss", "unfused_head", "head_chunk_elements", "callbacks")}
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
    for name in SPLIT:  # gradlens's own events count steps as the Trainer does (updates done): the curves line up
        ours, theirs = dict(_tensorboard_scalars(run_dir, name)), _tensorboard_scalars(tensorboard, f"train/{name}")
        assert sorted(ours) == [1, 2, 3, 4], name
        assert [ours[step] for step, _ in theirs] == pytest.approx([v for _, v in theirs], rel=1e-6), name
    assert list(run_dir.glob("events.out.tfevents.*")) and load_run(run_dir).summary["status"] == "complete"


# ---- a TRL recipe as `gradlens record --config` --------------------------------------------------

RECIPE_PAIRS = PAIRS + [
    {"prompt": "f g", "chosen": " h", "rejected": " i j"},
    {"prompt": "k", "chosen": " l m", "rejected": " n"},
    {"prompt": "o p a", "chosen": " b", "rejected": " c d e"},
]
# Everything that made `gradlens record` a different run before: clipping (the gradient norm is ~0.5
# here), a warm-up and a decaying schedule, weight decay, a non-default Adam beta, and TRL's
# combined loss (sigmoid + SFT with weights), with TRL's default gradient checkpointing.
RECIPE = """\
# a TRL DPO recipe, as trl/scripts/dpo.py reads it
model_name_or_path: {model}
dataset_name: {data}
output_dir: {out}
learning_rate: 5.0e-3
lr_scheduler_type: cosine
warmup_steps: 3
max_grad_norm: 0.3
weight_decay: 0.05
adam_beta1: 0.8
optim: adamw_torch
loss_type: [sigmoid, sft]
loss_weights: [1.0, 0.5]
beta: 0.2
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
max_steps: 20
max_length: 16
seed: 3
logging_steps: 1
save_strategy: "no"
report_to: none
use_cpu: true
bf16: false
remove_unused_columns: false
disable_dropout: true
"""
# TRL's settings of the recipe, as the reference passes them to DPOConfig itself.
RECIPE_DPO = dict(
    learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=3, max_grad_norm=0.3, weight_decay=0.05, adam_beta1=0.8,
    optim="adamw_torch", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.2, per_device_train_batch_size=2,
    gradient_accumulation_steps=2, max_steps=20, max_length=16, seed=3, logging_steps=1, save_strategy="no",
    report_to="none", use_cpu=True, bf16=False, remove_unused_columns=False, disable_dropout=True,
)  # fmt: skip
RECIPE_TOL = 1e-6  # relative, losses / lr / grad_norm; measured 2.2e-7
RECIPE_PARAM_TOL = 1e-5  # absolute, final parameters; measured 4.1e-6


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_trl_recipe_trains_the_same_run_as_trl(model_dir, tmp_path):
    """The same recipe through trl.DPOTrainer (as TRL's dpo.py builds it) and `gradlens record --config`.

    20 steps in float32: the runs differ by float32 rounding only, which Adam carries on (measured:
    losses and gradient norms 2.2e-7 relative, final parameters 4.1e-6 while training moved them by
    5.4e-2; 4.9e-6 with TRL's fused LM head kept, ``unfused_head: false``).
    """
    from safetensors.torch import load_file

    from gradlens.cli import main

    data = _write_jsonl(tmp_path / "prefs.jsonl", RECIPE_PAIRS)
    recipe = tmp_path / "dpo.yaml"
    text = RECIPE.format(model=model_dir, data=data, out=tmp_path / "trl-out")
    recipe.write_text(text, encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["record", "--config", str(recipe), "--quiet"]) == 0
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "/gradlens/" in w.filename.replace("\\", "/")]
    assert not ours, ours  # no warning (deprecations included) raised from gradlens's own code
    # gradlens builds the DPOConfig under transformers 5's names (TRL's default would warn on the old one).
    assert not [w for w in caught if "`gradient_checkpointing` is deprecated" in str(w.message)]

    # TRL's own trainer, built the way trl/scripts/dpo.py builds it from the same recipe.
    init = dict(revision="main", trust_remote_code=False, attn_implementation=None, dtype="float32")
    args = trl.DPOConfig(output_dir=str(tmp_path / "reference"), model_init_kwargs=init, **RECIPE_DPO)
    reference = trl.DPOTrainer(model=model_dir, args=args, train_dataset=datasets.Dataset.from_list(RECIPE_PAIRS))
    reference.train()

    logged = [e for e in reference.state.log_history if "loss" in e]
    run = load_run(tmp_path / "trl-out" / "gradlens")
    assert run.config["env"] == "trl" and run.config["trl_loss_type"] == ["sigmoid", "sft"]
    assert len(logged) == 20 and list(run.steps.step) == list(range(20))
    compared = (("loss", "loss"), ("lr", "learning_rate"), ("grad_norm", "grad_norm"))
    worst = {}
    for column, key in compared:
        mine, theirs = run.steps[column].to_numpy(), [e[key] for e in logged]
        worst[column] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(mine, theirs))
    print(f"measured: worst relative difference per column {worst}")
    assert max(worst.values()) <= RECIPE_TOL, worst
    assert min(e["grad_norm"] for e in logged) > 0.3  # the recipe's clipping was active on every step
    trained = load_file(str(tmp_path / "trl-out" / "model.safetensors"))
    expected = reference.model.state_dict()
    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    moved = max((expected[n] - start[n]).abs().max().item() for n in trained)
    diff = max((trained[n] - expected[n]).abs().max().item() for n in trained)
    print(f"measured: final parameters differ by {diff:.3g} (they moved by {moved:.3g})")
    assert moved > 1e-2 and diff <= RECIPE_PARAM_TOL, (diff, moved)


def test_unfused_head_gradient_equals_plain_logits(model_dir, tmp_path):
    """The recipe's first batch (its longest row fills every position, with padding in the others).

    An independent reference (the model's own logits, ``log_softmax``, ``gather``) gives the
    gradient of a weighted sum of sequence log-probs; gradlens's unfused head must match it.
    """
    trainer = make_trainer(model_dir, tmp_path, max_steps=1, gradient_checkpointing=False)
    model = trainer.model.train()
    ids = torch.tensor([[4, 5, 6, 7, 13, 14, 15, 0], [6, 7, 8, 9, 10, 0, 0, 0], [4, 5, 6, 7, 16, 0, 0, 0], [6, 8, 0, 0, 0, 0, 0, 0]])
    completion = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]])
    attention = (torch.arange(8) < torch.tensor([8, 6, 6, 3]).unsqueeze(1)).long()
    labels = ids.masked_fill(completion == 0, -100)
    weights = torch.tensor([1.0, -1.0, 0.5, 2.0])

    def gradient(sequence_logps):
        model.zero_grad()
        (sequence_logps() * weights).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    def plain():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        target = labels[:, 1:]
        per_token = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (per_token * (target != -100)).sum(1)

    def head(unfused: bool):
        trainer._gradlens_head.active = lambda: unfused
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        return (out.log_probs * (labels[:, 1:] != -100)).sum(1)

    reference = gradient(plain)
    mine = gradient(lambda: head(True))
    trls = gradient(lambda: head(False))
    error = ((mine - reference).norm() / reference.norm()).item()
    print(f"measured: unfused head {error:.2g}, TRL's fused head {((trls - reference).norm() / reference.norm()).item():.2g} (relative to the reference)")
    assert error <= 1e-6


def test_torch_compile_records_through_the_uncompiled_module(model_dir, tmp_path):
    """DPOConfig(torch_compile=True): recorded steps are exact and gradlens adds no graph break of its own.

    Recorded steps run the module inside the compiled wrapper (eagerly, with the hooks); between them the
    hooks are off and the compiled graph runs. The ``eager`` backend keeps the test fast: dynamo still traces
    (and breaks graphs) exactly as with inductor.
    """
    from torch._dynamo.utils import counters

    from gradlens.integrations.transformers import GradlensCallback

    def train(run_dir, **overrides):
        torch._dynamo.reset()
        counters.clear()
        callback = GradlensCallback(run_dir, record_every=2)
        trainer = make_trainer(model_dir, tmp_path, max_steps=3, gradient_checkpointing=False, callbacks=[callback], **overrides)
        trainer.train()
        return trainer, load_run(run_dir)

    trainer, compiled = train(tmp_path / "compiled", torch_compile=True, torch_compile_backend="eager")
    breaks = {reason.splitlines()[0] for reason in counters["graph_break"]}
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    # TRL's fused LM head breaks the graph itself (torch.mm with a non-contiguous out=); nothing else may.
    assert breaks <= {"Attempted to call op with non-contiguous `out=` tensor"}, breaks
    _, eager = train(tmp_path / "eager")
    recorded = compiled.steps.dropna(subset=["grad_norm/chosen"])
    assert list(recorded.step) == [0, 2]
    for column in ("grad_norm/chosen", "grad_norm/rejected", "grad/dot", "loss"):
        mine, reference = recorded[column].to_numpy(), eager.steps.set_index("step").loc[[0, 2], column].to_numpy()
        assert abs(mine - reference).max() <= 1e-6 * abs(reference).max(), column
    logged = {e["step"]: e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e}
    assert rel(recorded.set_index("step").loc[0, "grad_norm"], logged[1]) <= TOL  # Trainer's own norm of that step
    assert compiled.summary["unattributed_parameters"] == []


# ---- every key of a TRL recipe -------------------------------------------------------------------


def test_every_trl_key_is_honoured_or_refused_with_a_reason():
    import dataclasses

    from gradlens.record.trl_recipe import SOURCES, key_rules

    rules = key_rules()
    for source in SOURCES:
        for f in dataclasses.fields(getattr(trl, source)):
            assert f.name in rules, f"{source}.{f.name} has no rule"
    for name, (source, rule) in rules.items():
        assert rule.does and (rule.allowed is None or rule.reason), name
        assert rule.to in ("DPOConfig", "ModelConfig", "ScriptArguments", "DatasetMixtureConfig", "gradlens", ""), name


def test_key_table_in_the_docs_is_generated_from_trls_dataclasses():
    from pathlib import Path

    from gradlens.record.trl_recipe import docs_with_table

    page = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
    text = page.read_text(encoding="utf-8")
    assert docs_with_table(text) == text, "the key table is out of date: python -m gradlens.record.trl_recipe docs/integrations.md"


def _example_command_keys() -> dict[str, object]:
    """The --keys of TRL's own example commands (the docstring of trl/scripts/dpo.py), with their values."""
    import re

    import trl.scripts.dpo as script

    words = " ".join(re.findall(r"python trl/scripts/dpo.py(.*?)```", script.__doc__, re.S)).replace("\\", " ").split()
    keys: dict[str, object] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
            name = word[2:]
            if name.startswith("no_"):
                name, value = name[3:], False
            keys[name] = value
    return keys


# Keys a TRL user brings from TRL's docs and earlier releases (older names are refused with the new way).
EXAMPLE_KEYS = {
    "remove_unused_columns": False, "label_smoothing": 0.0, "lora_modules_to_save": ["lm_head"], "use_rslora": False,
    "lora_task_type": "CAUSAL_LM", "padding_free": False, "disable_dropout": True, "model_init_kwargs": {},
    "truncation_mode": "keep_start", "adam_beta1": 0.9, "optim": "adamw_torch", "torch_dtype": "float32",
}  # fmt: skip


def test_no_key_of_trls_example_commands_is_unknown(tmp_path):
    from gradlens.record.trl_recipe import parse_recipe

    keys = _example_command_keys()
    assert {"dataset_name", "model_name_or_path", "learning_rate", "use_peft", "lora_r", "remove_unused_columns"} <= set(keys)
    recipe = parse_recipe(tmp_path / "dpo.yaml", {**keys, **EXAMPLE_KEYS}, {})
    assert recipe.dpo["learning_rate"] == pytest.approx(5e-6) and recipe.dpo["remove_unused_columns"] is False
    assert recipe.model["use_peft"] is True and recipe.model["lora_r"] == 32 and recipe.model["dtype"] == "float32"
    assert recipe.dpo["max_steps"] == 1000 and recipe.dpo["eval_strategy"] == "steps"


@pytest.mark.parametrize(
    "line, message",
    [
        ("load_in_4bit: true", "line 3: load_in_4bit: True is not supported: needs bitsandbytes and a GPU; not supported"),
        ("rpo_alpha: 0.5", "line 3: rpo_alpha: 0.5 is not supported: removed from TRL; RPO is `loss_type: [sigmoid, sft]`"),
        ("padding_free: true", "the chosen/rejected split needs the rows along dim 0"),
        ("push_to_hub: true", "never uploads"),
        ("learning_rate: fast", "line 3: 'learning_rate' must be a number, got 'fast'"),
        ("lerning_rate: 1.0e-5", "line 3: unknown setting 'lerning_rate'"),
        ("batch_size: 8", "line 3: 'batch_size' is not available for a TRL recipe: a TRL recipe sets `per_device_train_batch_size`"),
    ],
)
def test_a_refused_recipe_key_is_one_clear_line(model_dir, tmp_path, capsys, line, message):
    from gradlens.cli import main

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"model_name_or_path: {model_dir}\ndataset_name: prefs.jsonl\n{line}\n", encoding="utf-8")
    assert main(["record", "--config", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: {message}" in err or message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_hub_dataset_name_says_how_to_save_it(model_dir, tmp_path, capsys):
    from gradlens.cli import main

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"model_name_or_path: {model_dir}\ndataset_name: trl-lib/ultrafeedback_binarized\n", encoding="utf-8")
    assert main(["record", "--config", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "looks like a Hugging Face Hub data set" in err and "save_to_disk('prefs')" in err
    assert not (tmp_path / "run").exists()
    assert main(["record", "--model", model_dir, "--data", "trl-lib/ultrafeedback_binarized", "--out", str(tmp_path / "r2")]) == 2
    assert "save_to_disk('prefs')" in capsys.readouterr().err


def test_flags_override_a_recipe_under_gradlenss_names(tmp_path):
    from gradlens.record.trl_recipe import parse_recipe

    data = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "learning_rate": "5e-7", "lora_r": 32, "gradient_checkpointing": True}
    recipe = parse_recipe(tmp_path / "dpo.yaml", data, {"lr": 1e-5, "steps": 7, "lora_r": 8, "lora_target_modules": "c_attn,c_proj", "out": "runs/x"})
    assert recipe.dpo["learning_rate"] == 1e-5 and recipe.dpo["max_steps"] == 7
    assert recipe.model == {"lora_r": 8, "use_peft": True, "lora_target_modules": ["c_attn", "c_proj"]}
    assert recipe.script["out"] == "runs/x"
    # YAML reads 5e-7 (no dot) as a string; TRL's parser would take it as a number, and so does gradlens.
    assert parse_recipe(tmp_path / "dpo.yaml", data, {}).dpo["learning_rate"] == 5e-7
    # ... and an unquoted `no` as false: TRL's strategies take it as "no".
    assert parse_recipe(tmp_path / "dpo.yaml", {**data, "save_strategy": False}, {}).dpo["save_strategy"] == "no"
    with pytest.raises(ValueError, match="'learning_rate' and 'lr' both set 'learning_rate'"):
        parse_recipe(tmp_path / "dpo.yaml", {**data, "lr": 1e-3}, {})


def test_trl_recipe_with_lora_trains_trls_adapter(model_dir, tmp_path):
    """TRL's LoRA options in a recipe: the adapter is TRL's own (get_peft_config), and the run is TRL's."""
    pytest.importorskip("peft")
    from gradlens.cli import main

    data = _write_jsonl(tmp_path / "prefs.jsonl", RECIPE_PAIRS)
    lora = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["c_attn", "c_proj"], use_rslora=True)
    dpo = dict(RECIPE_DPO, max_steps=3, loss_type=["ipo"], loss_weights=None, learning_rate=5e-2)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(
        json.dumps({"model_name_or_path": model_dir, "dataset_name": str(data), "output_dir": str(tmp_path / "out"), **dpo, **lora}),
        encoding="utf-8",
    )  # JSON is YAML
    assert main(["record", "--config", str(recipe), "--quiet"]) == 0

    model_args = trl.ModelConfig(model_name_or_path=model_dir, **lora)
    init = dict(revision="main", trust_remote_code=False, attn_implementation=None, dtype="float32")
    args = trl.DPOConfig(output_dir=str(tmp_path / "reference"), model_init_kwargs=init, **dpo)
    reference = trl.DPOTrainer(model=model_dir, args=args, train_dataset=datasets.Dataset.from_list(RECIPE_PAIRS),
                               peft_config=trl.get_peft_config(model_args))  # fmt: skip
    reference.train()

    run = load_run(tmp_path / "out" / "gradlens")
    assert set(run.layers.layer) and all("lora_" in layer for layer in set(run.layers.layer))
    assert run.config["trl_loss_type"] == ["ipo"] and run.summary["unattributed_parameters"] == []
    logged = [e["loss"] for e in reference.state.log_history if "loss" in e]
    assert run.steps.loss.tolist() == pytest.approx(logged, rel=RECIPE_TOL)
    assert (tmp_path / "out" / "adapter_config.json").is_file()  # TRL saved its adapter, as trl/scripts/dpo.py does


def test_trl_recipe_reads_the_splits_of_a_saved_datasetdict(model_dir, tmp_path, capsys):
    from gradlens.cli import main

    saved = tmp_path / "prefs"
    datasets.DatasetDict({"fit": datasets.Dataset.from_list(RECIPE_PAIRS[:6]), "holdout": datasets.Dataset.from_list(RECIPE_PAIRS[6:])}).save_to_disk(str(saved))
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(
        f"model_name_or_path: {model_dir}\ndataset_name: {saved}\ndataset_train_split: fit\ndataset_test_split: holdout\n"
        f"output_dir: {tmp_path / 'out'}\neval_strategy: steps\neval_steps: 1\nmax_steps: 2\nper_device_train_batch_size: 2\n"
        "per_device_eval_batch_size: 2\nbf16: false\nuse_cpu: true\nreport_to: none\nsave_strategy: 'no'\nlogging_steps: 1\n",
        encoding="utf-8",
    )
    assert main(["record", "--config", str(recipe), "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    assert out.count("'eval_loss'") == 2  # TRL's Trainer evaluated the holdout split at steps 1 and 2
    assert len(load_run(tmp_path / "out" / "gradlens").steps) == 2
    recipe.write_text(recipe.read_text().replace("holdout", "test"), encoding="utf-8")
    assert main(["record", "--config", str(recipe), "--overwrite", "--quiet"]) == 2
    assert "the saved DatasetDict has no split 'test' (it has ['fit', 'holdout'])" in capsys.readouterr().err


def test_padding_free_is_refused_with_the_reason(model_dir, tmp_path):
    with pytest.raises(ValueError, match="padding_free=True packs every row into one sequence"):
        make_trainer(model_dir, tmp_path, tmp_path / "run", padding_free=True)
    assert not (tmp_path / "run").exists()
