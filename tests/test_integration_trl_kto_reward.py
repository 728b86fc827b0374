"""gradlens inside real ``trl.KTOTrainer`` (desirable vs undesirable) and ``trl.RewardTrainer``
(the reward model's chosen side vs rejected side).

The reference is independent of gradlens: a plain TRL trainer computes its own loss on the
micro-batches the gradlens run trained on at its first step, once per group, with the
model's per-row output (KTO: the per-token log-probs; reward model: the scores) detached on
every row outside the group; ``torch.autograd.grad`` of that loss is the group's gradient.
Recorded pieces, norms and dot products must match (<= 1e-5 relative, fp32), and the groups
must add up to the plain gradient. Two families: GPT-2 (tied LM head; a reward model has no
LM head, so nothing is tied there) and Llama.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from gradlens.integrations import run_log  # noqa: E402
from gradlens.runs import load_run, schema  # noqa: E402

from trl_tiny import relative, save_model, trainable  # noqa: E402

TOL = 1e-5
UNPAIRED = [
    {"prompt": "a b c", "completion": " d e", "label": True},
    {"prompt": "b c", "completion": " j k", "label": False},
    {"prompt": "c d e f", "completion": " l m n", "label": True},
    {"prompt": "p", "completion": " b", "label": False},
    {"prompt": "e", "completion": " f g h i", "label": True},
    {"prompt": "g h", "completion": " o", "label": False},
    {"prompt": "i", "completion": " a a", "label": False},
    {"prompt": "k l", "completion": " m", "label": True},
]
PAIRS = [
    {"prompt": "a b c", "chosen": " d e", "rejected": " f g h"},
    {"prompt": "b c", "chosen": " i", "rejected": " j k"},
    {"prompt": "c d e f", "chosen": " l m n", "rejected": " o"},
    {"prompt": "p", "chosen": " a a", "rejected": " b"},
    {"prompt": "e", "chosen": " f g h i", "rejected": " g"},
    {"prompt": "g", "chosen": " h", "rejected": " i j"},
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    torch.set_num_threads(1)
    dirs = {}
    for family in ("gpt2", "llama"):
        dirs[family] = save_model(family, tmp_path_factory.mktemp(family))
        dirs[f"{family}-rm"] = save_model(family, tmp_path_factory.mktemp(f"{family}-rm"), num_labels=1)
    return dirs


COMMON = dict(per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2, report_to="none", use_cpu=True, bf16=False,
              logging_steps=1, save_strategy="no", seed=0)  # fmt: skip


def make(kind: str, model_dir: str, tmp_path, *, gradlens: bool, callbacks=(), **overrides):
    from transformers import AutoTokenizer

    from gradlens.integrations.trl import GradlensKTOTrainer, GradlensRewardTrainer

    extra = {k: overrides.pop(k) for k in ("peft_config", "gradlens_dir") if k in overrides}
    args = {**COMMON, "output_dir": str(tmp_path / "trainer"), **overrides}
    if kind == "kto":
        cls, config, data = (GradlensKTOTrainer if gradlens else trl.KTOTrainer), trl.KTOConfig(**args), UNPAIRED
    else:
        cls, config, data = (GradlensRewardTrainer if gradlens else trl.RewardTrainer), trl.RewardConfig(**args), PAIRS
    return cls(model=model_dir, args=config, train_dataset=datasets.Dataset.from_list(data),
               processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=list(callbacks), **extra)  # fmt: skip


def spy_micro_batches(trainer) -> list[dict]:
    seen, compute_loss = [], trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        if model.training and torch.is_grad_enabled():
            seen.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inputs.items()})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    return seen


def keep_captures(monkeypatch) -> list:
    kept, write_step = [], run_log.RunLog.write_step

    def spy(self, result, **kwargs):
        kept.append(result.capture)
        return write_step(self, result, **kwargs)

    monkeypatch.setattr(run_log.RunLog, "write_step", spy)
    return kept


def detach_rows(model, keep: torch.Tensor, field: str):
    """Wrap ``model.forward``: with gradients on, ``field`` of the output is detached on rows outside ``keep``."""
    forward = model.forward

    def wrapped(self, *args, **kwargs):
        out = forward(*args, **kwargs)
        value = getattr(out, field, None)
        if torch.is_grad_enabled() and value is not None and value.requires_grad:
            rows = keep.to(value.device).reshape(-1, *([1] * (value.dim() - 1)))
            out[field] = torch.where(rows, value, value.detach())
        return out

    model.forward = types.MethodType(wrapped, model)
    return forward


def reference_gradients(trainer, batches: list[dict], groups_of, field: str) -> dict[str, dict[str, torch.Tensor]]:
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    params = trainable(model)
    out = {}
    for group in ("all", *groups_of(batches[0]).keys()):
        total = {n: torch.zeros_like(p) for n, p in params}
        for inputs in batches:
            keep = groups_of(inputs)[group] if group != "all" else torch.ones(inputs["input_ids"].shape[0], dtype=torch.bool)
            original = detach_rows(model, keep, field)
            try:
                loss = trainer.compute_loss(model, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()})
            finally:
                model.forward = original
            if not trainer.loss_is_scaled_for_ga:  # the Trainer divides the loss by the accumulation steps
                loss = loss / trainer.args.gradient_accumulation_steps
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            for (n, _), g in zip(params, grads):
                if g is not None:
                    total[n] += g
        out[group] = total
    return out


def kto_groups(inputs) -> dict[str, torch.Tensor]:
    label = torch.as_tensor(inputs["label"]).bool()
    return {schema.DESIRABLE: label, schema.UNDESIRABLE: ~label}


def reward_groups(inputs) -> dict[str, torch.Tensor]:
    b = inputs["input_ids"].shape[0] // 2
    chosen = torch.arange(2 * b) < b
    first, second = schema.DEFAULT_GROUPS
    return {first: chosen, second: ~chosen}


def flat_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def check_first_step(row, cap, ref, pair) -> None:
    a, b = pair
    norms = {g: flat_norm(ref[g].values()) for g in ref}
    assert norms[a] > 0 and norms[b] > 0
    for g in pair:
        assert relative(row[schema.group_norm_column(g)], norms[g]) <= TOL, g
        pieces = cap.pieces(g)
        assert flat_norm(pieces[n] - ref[g][n] for n in ref[g]) <= TOL * norms[g], g
    dot = sum(float((ref[a][n].double() * ref[b][n].double()).sum()) for n in ref["all"])
    assert abs(row[schema.GRAD_DOT] - dot) <= TOL * norms[a] * norms[b]
    assert relative(row[schema.GRAD_RATIO], norms[b] / norms[a]) <= 2 * TOL
    assert relative(row[schema.GRAD_NORM], norms["all"]) <= TOL
    summed = {n: cap.pieces(a).get(n, torch.zeros_like(t)) + cap.pieces(b).get(n, torch.zeros_like(t)) for n, t in ref["all"].items()}
    assert flat_norm(summed[n] - ref["all"][n] for n in ref["all"]) <= TOL * norms["all"]


CASES = {
    "kto-gpt2-ga": ("kto", "gpt2", dict(gradient_accumulation_steps=2)),
    "kto-llama-apo": ("kto", "llama", dict(loss_type="apo_zero_unpaired", desirable_weight=1.5)),
    "reward-gpt2-ga": ("reward", "gpt2-rm", dict(gradient_accumulation_steps=2)),
    "reward-gpt2": ("reward", "gpt2-rm", dict()),
    "reward-llama-centered": ("reward", "llama-rm", dict(center_rewards_coefficient=0.1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_split_matches_separate_autograd_passes(case, model_dirs, tmp_path, monkeypatch):
    from gradlens.integrations.trl import GradlensCallback

    kind, model, settings = CASES[case]
    captures = keep_captures(monkeypatch)
    callback = GradlensCallback(tmp_path / "run", capture_options={"keep_pieces": True})
    trainer = make(kind, model_dirs[model], tmp_path, gradlens=True, callbacks=[callback], **settings)
    batches = spy_micro_batches(trainer)
    trainer.train()
    run = load_run(tmp_path / "run")
    first = batches[: trainer.args.gradient_accumulation_steps]
    reference = make(kind, model_dirs[model], tmp_path / "ref", gradlens=False, **settings)
    groups_of, field, pair = (kto_groups, "log_probs", schema.KTO_GROUPS) if kind == "kto" else (reward_groups, "logits", schema.DEFAULT_GROUPS)
    check_first_step(run.steps.iloc[0], captures[0], reference_gradients(reference, first, groups_of, field), pair)
    assert run.config[schema.CONFIG_GROUPS] == list(pair)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and schema.group_norm_column(pair[1]) in logged[0] and schema.GRAD_RATIO in logged[0]
    if kind == "kto":
        rows = sum(int(torch.as_tensor(bt["label"]).numel()) for bt in first)
        assert run.steps.iloc[0][schema.group_count_column(schema.DESIRABLE)] + run.steps.iloc[0][schema.group_count_column(schema.UNDESIRABLE)] == rows
    else:
        assert 0 <= run.steps.iloc[0][schema.REWARDS_ACCURACIES] <= 1


def test_kto_with_peft(model_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)
    trainer = make("kto", model_dirs["gpt2"], tmp_path, gradlens=True, gradlens_dir=tmp_path / "run", max_steps=2, peft_config=lora)
    trainer.train()
    run = load_run(tmp_path / "run")
    assert len(run.steps) == 2 and run.summary["status"] == "complete"
    for _, r in run.steps.iterrows():  # two groups that cover every row: ||g||^2 = ||g_d||^2 + ||g_u||^2 + 2 <g_d, g_u>
        gd, gu = r[schema.group_norm_column(schema.DESIRABLE)], r[schema.group_norm_column(schema.UNDESIRABLE)]
        assert gd > 0 and gu > 0
        assert relative(r[schema.GRAD_NORM] ** 2, gd**2 + gu**2 + 2 * r[schema.GRAD_DOT]) <= 1e-4
    assert any("lora" in layer for layer in run.layers[schema.LAYER].unique())
