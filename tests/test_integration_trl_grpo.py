"""gradlens inside real ``trl.GRPOTrainer`` / ``trl.RLOOTrainer``: the positive/negative-advantage split.

Models, tokenizer, prompts and reward function are built here; generation uses the tiny
random model (the split does not need good samples). The reference is independent of
gradlens: a plain TRL trainer computes TRL's own loss on the very micro-batches the
gradlens run trained on at its first step, once per group, with the log-probs (and
entropies) of every row outside the group detached; ``torch.autograd.grad`` of that loss
is the group's gradient. The recorded pieces, norms and dot products must match it
(<= 1e-5 relative, fp32), and the groups must add up to the plain gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from gradlens.integrations import run_log  # noqa: E402
from gradlens.runs import load_run, schema  # noqa: E402

from trl_tiny import relative, save_model, trainable  # noqa: E402

TOL = 1e-5
PROMPTS = ["a b c", "b c", "c d e f", "p", "e", "g h", "i j k", "l"]


def reward_early_letters(constant: tuple[str, ...] = ("p", "l")):
    """Reward: the share of completion words from the first half of the alphabet (varies between
    random samples); prompts whose first word is in ``constant`` always score 0.5, so all their
    completions have advantage 0."""

    def reward(prompts, completions, **kwargs) -> list[float]:
        out = []
        for prompt, text in zip(prompts, completions):
            words = text.split()
            out.append(0.5 if prompt.split()[0] in constant else sum(w in "a b c d e f g h" for w in words) / max(len(words), 1))
        return out

    return reward


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    torch.set_num_threads(1)
    return {family: save_model(family, tmp_path_factory.mktemp(family)) for family in ("gpt2", "llama")}


def config(cls, tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, num_generations=2, max_completion_length=5,
        max_steps=1, learning_rate=1e-2, report_to="none", use_cpu=True, bf16=False, logging_steps=1,
        save_strategy="no", seed=0, temperature=1.0,
    )  # fmt: skip
    kwargs.update(overrides)
    return cls(**kwargs)


def make(kind: str, model_dir: str, tmp_path, *, gradlens: bool, callbacks=(), **overrides):
    from transformers import AutoTokenizer

    from gradlens.integrations.trl import GradlensGRPOTrainer, GradlensRLOOTrainer

    trainers = {"grpo": (trl.GRPOTrainer, GradlensGRPOTrainer, trl.GRPOConfig), "rloo": (trl.RLOOTrainer, GradlensRLOOTrainer, trl.RLOOConfig)}
    plain, recorded, config_cls = trainers[kind]
    extra = {k: overrides.pop(k) for k in ("peft_config", "gradlens_dir") if k in overrides}
    reward = reward_early_letters(overrides.pop("constant_prompts", ("p", "l")))
    cls = recorded if gradlens else plain
    return cls(
        model=model_dir, reward_funcs=reward, args=config(config_cls, tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"), callbacks=list(callbacks), **extra,
    )  # fmt: skip


def spy_micro_batches(trainer) -> list[dict]:
    """Every training micro-batch's prepared inputs (after generation), in order."""
    seen, compute_loss = [], trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        if model.training and torch.is_grad_enabled():
            seen.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inputs.items()})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    return seen


def keep_captures(monkeypatch) -> list:
    """The capture of every step the run log writes (the callback is asked to keep the pieces)."""
    kept, write_step = [], run_log.RunLog.write_step

    def spy(self, result, **kwargs):
        kept.append(result.capture)
        return write_step(self, result, **kwargs)

    monkeypatch.setattr(run_log.RunLog, "write_step", spy)
    return kept


def reference_gradients(trainer, batches: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Group -> parameter -> gradient, from TRL's own loss with the other rows' log-probs detached."""
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    params = trainable(model)
    original = trainer._get_per_token_logps_and_entropies
    out = {}
    for group in ("all", schema.POSITIVE, schema.NEGATIVE, schema.ZERO):
        total = {n: torch.zeros_like(p) for n, p in params}
        for inputs in batches:
            a = inputs["advantages"]
            keep = {"all": torch.ones_like(a, dtype=torch.bool), schema.POSITIVE: a > 0, schema.NEGATIVE: a < 0, schema.ZERO: a == 0}[group]

            def detached(*args, keep=keep, **kwargs):
                logps, entropies, aux = original(*args, **kwargs)
                rows = keep[:, None].to(logps.device)
                entropies = None if entropies is None else torch.where(rows, entropies, entropies.detach())
                return torch.where(rows, logps, logps.detach()), entropies, aux

            trainer._get_per_token_logps_and_entropies = detached
            loss = trainer.compute_loss(model, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()})
            if not trainer.loss_is_scaled_for_ga:  # RLOO: the Trainer divides the loss by the accumulation steps
                loss = loss / trainer.args.gradient_accumulation_steps
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            for (n, _), g in zip(params, grads):
                if g is not None:
                    total[n] += g
        out[group] = total
    trainer._get_per_token_logps_and_entropies = original
    return out


def flat_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def check_first_step(row, cap, ref) -> None:
    """The logged row and the capture's pieces against the reference gradients."""
    norms = {g: flat_norm(ref[g].values()) for g in ref}
    assert norms[schema.POSITIVE] > 0 and norms[schema.NEGATIVE] > 0  # a split that can fail
    for g in (schema.POSITIVE, schema.NEGATIVE):
        assert relative(row[schema.group_norm_column(g)], norms[g]) <= TOL, g
        pieces = cap.pieces(g)
        diff = flat_norm(pieces[n] - ref[g][n] for n in ref[g])
        assert diff <= TOL * norms[g], (g, diff / norms[g])
    zero = row[schema.group_norm_column(schema.ZERO)]
    assert abs(zero - norms[schema.ZERO]) <= TOL * max(norms["all"], 1e-12)
    dot = sum(float((ref[schema.POSITIVE][n].double() * ref[schema.NEGATIVE][n].double()).sum()) for n in ref["all"])
    assert abs(row[schema.GRAD_DOT] - dot) <= TOL * norms[schema.POSITIVE] * norms[schema.NEGATIVE]
    assert relative(row[schema.GRAD_RATIO], norms[schema.NEGATIVE] / norms[schema.POSITIVE]) <= 2 * TOL
    assert relative(row[schema.GRAD_NORM], norms["all"]) <= TOL
    # the groups add up to the plain gradient, parameter by parameter
    summed = {n: sum(cap.pieces(g).get(n, torch.zeros_like(t)) for g in (schema.POSITIVE, schema.NEGATIVE, schema.ZERO)) for n, t in ref["all"].items()}
    assert flat_norm(summed[n] - ref["all"][n] for n in ref["all"]) <= TOL * norms["all"]


CASES = {
    # family, trainer, TRL settings: loss types, generation across micro-batches, KL (zero-advantage rows)
    "gpt2-grpo-kl-entropy-ga-across-generations": ("gpt2", "grpo", dict(loss_type="grpo", beta=0.1, entropy_coef=0.05, gradient_accumulation_steps=2, steps_per_generation=1, constant_prompts=("p", "l", "e", "g"))),
    "llama-dapo-one-generation-two-micro": ("llama", "grpo", dict(loss_type="dapo", num_generations=4, gradient_accumulation_steps=2)),
    "gpt2-dr_grpo-iterations": ("gpt2", "grpo", dict(loss_type="dr_grpo", num_iterations=2, steps_per_generation=1, max_steps=2)),
    "llama-bnpo-entropy": ("llama", "grpo", dict(loss_type="bnpo", entropy_coef=0.05, constant_prompts=("p", "l", "e", "g"))),
    "gpt2-cispo": ("gpt2", "grpo", dict(loss_type="cispo")),
    "llama-sapo": ("llama", "grpo", dict(loss_type="sapo")),
    "gpt2-luspo-sequence-level": ("gpt2", "grpo", dict(loss_type="luspo", importance_sampling_level="sequence")),
    "llama-vespo": ("llama", "grpo", dict(loss_type="vespo", num_iterations=2, steps_per_generation=1, max_steps=2)),
    "gpt2-rloo-ga": ("gpt2", "rloo", dict(gradient_accumulation_steps=2, steps_per_generation=1)),
    "llama-rloo": ("llama", "rloo", dict(num_generations=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_split_matches_separate_autograd_passes(case, model_dirs, tmp_path, monkeypatch):
    from gradlens.integrations.trl import GradlensCallback

    family, kind, settings = CASES[case]
    captures = keep_captures(monkeypatch)
    callback = GradlensCallback(tmp_path / "run", capture_options={"keep_pieces": True})
    trainer = make(kind, model_dirs[family], tmp_path, gradlens=True, callbacks=[callback], **settings)
    batches = spy_micro_batches(trainer)
    trainer.train()
    run = load_run(tmp_path / "run")
    row = run.steps.iloc[0]
    first = [b for b in batches][: trainer.args.gradient_accumulation_steps]
    reference = make(kind, model_dirs[family], tmp_path / "ref", gradlens=False, **settings)
    check_first_step(row, captures[0], reference_gradients(reference, first))
    # counts: every completion of the step is in exactly one sign group
    rows = sum(int(b["advantages"].numel()) for b in first)
    if settings.get("entropy_coef"):  # the entropy bonus reaches zero-advantage rows: a third group with a gradient
        assert row[schema.COUNT_ZERO] > 0 and row[schema.group_norm_column(schema.ZERO)] > 0
    assert row[schema.COUNT_POSITIVE] + row[schema.COUNT_NEGATIVE] + row[schema.COUNT_ZERO] == rows
    assert run.config[schema.CONFIG_GROUPS] == [schema.POSITIVE, schema.NEGATIVE]
    assert run.config["loss"] == kind


def test_logs_reach_log_history_report_to_and_peft(model_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)
    trainer = make("grpo", model_dirs["gpt2"], tmp_path, gradlens=True, gradlens_dir=tmp_path / "run", max_steps=2,
                   peft_config=lora, loss_type="grpo", report_to=["tensorboard"])  # fmt: skip
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        for key in (schema.group_norm_column(schema.POSITIVE), schema.group_norm_column(schema.NEGATIVE), schema.GRAD_RATIO,
                    schema.GRAD_COSINE, schema.COUNT_POSITIVE, schema.PROMPT_GROUPS_MIXED, "reward"):  # fmt: skip
            assert key in h, key
    run = load_run(tmp_path / "run")
    assert len(run.steps) == 2 and run.summary["status"] == "complete"
    steps = run.steps
    # report_to: the Trainer's own TensorBoard events (under output_dir) carry the split of each logged step
    (events,) = {p.parent for p in (tmp_path / "trainer").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    for name in (schema.GRAD_RATIO, schema.group_norm_column(schema.NEGATIVE), schema.COUNT_POSITIVE):
        assert [e.value for e in acc.Scalars(f"train/{name}")] == pytest.approx([h[name] for h in logged], rel=1e-6, nan_ok=True), name
    # only LoRA weights train; with beta = 0 the zero-advantage rows carry no gradient, so
    # ||g||^2 = ||g+||^2 + ||g-||^2 + 2 <g+, g->
    for _, r in steps.iterrows():
        gp, gn = r[schema.group_norm_column(schema.POSITIVE)], r[schema.group_norm_column(schema.NEGATIVE)]
        assert (gp > 0) == (r[schema.COUNT_POSITIVE] > 0) and (gn > 0) == (r[schema.COUNT_NEGATIVE] > 0)
        assert r[schema.group_norm_column(schema.ZERO)] == 0
        assert relative(r[schema.GRAD_NORM] ** 2, gp**2 + gn**2 + 2 * r[schema.GRAD_DOT]) <= 1e-4
    assert any("lora" in layer for layer in run.layers[schema.LAYER].unique())
