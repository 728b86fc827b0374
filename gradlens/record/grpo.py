"""`gradlens record --loss grpo`: GRPO on the built-in toy task, the positive/negative split on every step.

One optimizer step, top to bottom:
1. every ``iterations`` steps, a new generation batch: ``batch_size`` prompts, each with
   ``num_generations`` completions sampled from the current policy; the verifier scores
   them; advantages are normalised within each prompt group,
   A = (r - mean_group r) / (std_group r + 1e-4), as TRL's GRPO does (``scale_rewards="group"``);
   the policy's log-probs (and the reference's, with ``kl > 0``) are kept, detached;
2. the clipped GRPO objective on that batch, TRL's ``loss_type="grpo"``: per token
   -min(ρ_t A, clip(ρ_t, 1-ε, 1+ε) A) + kl · k3(π_ref/π_θ), ρ_t = π_θ/π_old, averaged over
   each completion's tokens, then over completions;
3. one backward with the recorder's row groups = the signs of A (``gradlens.advantages``),
   so the step's gradient is split exactly into positive-, zero- and negative-advantage
   completions, then the optimizer step.

With ``iterations`` = 1 (the default) π_old = π_θ and the clip never binds; with more,
the same batch serves that many optimizer steps and the clip acts, as in TRL's
``num_iterations``. Rows are built by ``gradlens.runs.step_row`` and the advantage counts by
``gradlens.advantages``, as for ``GradlensGRPOTrainer``, so both write the same columns.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..advantages import ZERO, advantage_groups, advantage_metrics
from ..gradients.recorder import GradientRecorder
from ..runs import lock_run_dir, release_run_dir, schema
from ..runs.preference_log import PreferenceRunLog
from ..runs.step_row import layer_rows, step_row
from . import grpo_task as task

COLUMNS = (*schema.ADVANTAGE_STEP_COLUMNS, schema.group_norm_column(ZERO))

STD_EPS = 1e-4  # TRL's GRPO: advantages / (std + 1e-4)


@dataclass(frozen=True)
class GRPOSettings:
    """What one GRPO run on the toy task does."""

    seed: int = 0
    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 8          # prompts per generation batch
    num_generations: int = 8     # completions per prompt (a prompt group)
    epsilon: float = 0.2         # the clip range of the ratio
    kl: float = 0.0              # KL coefficient (TRL's beta; 0 = no reference model, TRL's default)
    iterations: int = 1          # optimizer steps per generation batch (TRL's num_iterations)
    eval_every: int = 25
    layers_every: int = 1

    def validate(self) -> "GRPOSettings":
        for name in ("steps", "batch_size", "iterations", "layers_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 (advantages compare completions of one prompt), got {self.num_generations}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if not (math.isfinite(self.kl) and self.kl >= 0):
            raise ValueError(f"kl must be 0 or more, got {self.kl}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be 0 or more, got {self.eval_every}")
        return self


@dataclass
class GenerationBatch:
    """One generation batch: rows are completions, ``num_generations`` consecutive rows per prompt."""

    prompts: torch.Tensor       # (rows, 3)
    completions: torch.Tensor   # (rows, ANSWER_TOKENS)
    rewards: torch.Tensor       # (rows,)
    advantages: torch.Tensor    # (rows,)
    prompt_ids: torch.Tensor    # (rows,) which prompt group
    old_logps: torch.Tensor     # (rows, ANSWER_TOKENS) π_old, detached
    ref_logps: torch.Tensor | None


def group_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(r - group mean) / (group std + 1e-4), groups of ``num_generations`` consecutive rows."""
    grouped = rewards.reshape(-1, num_generations)
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, keepdim=True)  # unbiased std, as TRL
    return ((grouped - mean) / (std + STD_EPS)).reshape(-1)


@torch.no_grad()
def generate(policy: nn.Module, reference: nn.Module | None, s: GRPOSettings, generator: torch.Generator, first_id: int) -> GenerationBatch:
    prompts = task.sample_prompts(s.batch_size, generator).repeat_interleave(s.num_generations, dim=0)
    completions = task.sample(policy, prompts, generator)
    rewards = task.verifier_reward(prompts, completions)
    prompt_ids = first_id + torch.arange(s.batch_size).repeat_interleave(s.num_generations)
    return GenerationBatch(
        prompts=prompts, completions=completions, rewards=rewards, advantages=group_advantages(rewards, s.num_generations),
        prompt_ids=prompt_ids, old_logps=task.completion_logps(policy, prompts, completions),
        ref_logps=task.completion_logps(reference, prompts, completions) if reference is not None else None,
    )  # fmt: skip


def grpo_loss(logps: torch.Tensor, batch: GenerationBatch, s: GRPOSettings) -> torch.Tensor:
    """TRL's ``loss_type="grpo"`` objective from per-token log-probs (rows, tokens)."""
    a = batch.advantages[:, None]
    ratio = torch.exp(logps - batch.old_logps)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - s.epsilon, 1 + s.epsilon) * a)
    if s.kl > 0:
        delta = batch.ref_logps - logps
        per_token = per_token + s.kl * (torch.exp(delta) - delta - 1)
    return per_token.mean(dim=1).mean()  # fixed-length completions: every token counts


def record_grpo(s: GRPOSettings, run_dir: str | Path, *, log: Callable[[str], None] = print, tensorboard: bool = True,
                overwrite: bool = False, config: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train and record one run into ``run_dir``; returns its last steps.csv row."""
    s.validate()
    policy = task.build_policy(s.seed)
    reference = copy.deepcopy(policy).requires_grad_(False) if s.kl > 0 else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.lr)
    generator = torch.Generator().manual_seed(s.seed)
    full_config = {"env": "toy-grpo", "loss": "grpo", schema.CONFIG_GROUPS: list(schema.ADVANTAGE_GROUPS),
                   **asdict(s), **(config or {})}  # fmt: skip
    lock, path = lock_run_dir(run_dir, overwrite=overwrite)  # one writer; refuses what gradlens did not write
    try:
        out = PreferenceRunLog(path, full_config, columns=COLUMNS, tensorboard=tensorboard, evals=s.eval_every > 0)
    except BaseException:
        release_run_dir(lock)
        raise
    recorder = GradientRecorder(policy)
    status, message, stopped, row, t0 = schema.STATUS_COMPLETE, "", None, {}, time.perf_counter()
    evaluate = lambda at: out.log_eval({schema.STEP: at, schema.EVAL_TRUE_REWARD: task.greedy_reward(policy, torch.device("cpu"))})  # noqa: E731
    try:
        batch = None
        for step in range(s.steps):
            if s.eval_every and step % s.eval_every == 0:
                evaluate(step)
            if step % s.iterations == 0:
                batch = generate(policy, reference, s, generator, first_id=step * s.batch_size)
            row = _train_step(policy, optimizer, recorder, out, batch, s, step)
            if row[schema.NONFINITE]:
                status, stopped = schema.STATUS_NONFINITE, step
                message = f"step {step}: the loss or the gradient is not finite (loss={row[schema.LOSS]}); the run stopped"
                log(message)
                break
        else:
            if s.eval_every:
                evaluate(s.steps)
        out.finish(status=status, message=message, steps=s.steps, wall_time_s=time.perf_counter() - t0, stopped_at_step=stopped)
    finally:
        recorder.close()
        out.close()  # a killed or failed run keeps every row it logged
        release_run_dir(lock)
    return row


def _train_step(policy, optimizer, recorder: GradientRecorder, out: PreferenceRunLog, batch: GenerationBatch, s: GRPOSettings, step: int) -> dict:
    groups = advantage_groups(batch.advantages)
    with recorder.capture(groups=groups, num_rows=batch.advantages.numel()) as cap:
        loss = grpo_loss(task.completion_logps(policy, batch.prompts, batch.completions), batch, s)
        loss.backward()
    counts = {schema.group_count_column(g): float(len(rows)) for g, rows in groups.items()}
    metrics = {**counts, **advantage_metrics([batch.advantages], [batch.prompt_ids]), schema.REWARD_MEAN: batch.rewards.double().mean().item()}
    empty = [g for g, rows in groups.items() if len(rows) == 0]  # exactly zero gradient, whatever the rounding
    row = step_row(step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"], pairs=metrics, capture=cap,
                   pair=schema.ADVANTAGE_GROUPS, extra_groups=(ZERO,), empty=empty)  # fmt: skip
    layers = layer_rows(cap, schema.ADVANTAGE_GROUPS, empty=empty) if step % s.layers_every == 0 else None
    row = out.log_step(row, layers=layers, unattributed=cap.unattributed)
    if not row[schema.NONFINITE]:
        optimizer.step()  # never apply a non-finite update
    optimizer.zero_grad(set_to_none=True)
    return row
