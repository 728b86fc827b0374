"""Rows scored by an advantage (GRPO, RLOO): the row groups by sign, and the step's counts.

Policy-gradient losses weight each sampled completion by its advantage. A
completion with a positive advantage is pushed up, one with a negative advantage
is pushed down, and one with advantage exactly 0 gets gradient only from terms
that do not depend on the advantage (a KL penalty, an entropy bonus). These are
the three row groups gradlens splits such a gradient into. Rows whose advantage
is NaN are in no group: they count in the whole gradient only.

Completions of one prompt form a *prompt group* (GRPO's group of
``num_generations``); ``advantage_metrics`` counts, over a step, how many prompt
groups had both signs and how many had no learning signal at all.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .runs import schema

POSITIVE, NEGATIVE, ZERO = schema.POSITIVE, schema.NEGATIVE, schema.ZERO
# Order matters to the recorder: the last group of a partition is the total minus the others.
# Negative rows are last because they are present in every step with any learning signal.
GROUP_ORDER = (POSITIVE, ZERO, NEGATIVE)


def advantage_groups(advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row indices of each sign, for ``GradientRecorder.capture(groups=...)``; groups may be empty."""
    if advantages.dim() != 1:
        raise ValueError(
            f"gradlens splits completions by the sign of one advantage per completion, got advantages of shape "
            f"{tuple(advantages.shape)} (per-token advantages have no single sign per row)"
        )
    a = advantages.detach().cpu()
    masks = {POSITIVE: a > 0, ZERO: a == 0, NEGATIVE: a < 0}
    return {name: masks[name].nonzero().flatten() for name in GROUP_ORDER}


def advantage_metrics(advantages: Sequence[torch.Tensor], prompt_ids: Sequence[torch.Tensor]) -> dict[str, float]:
    """The step's counts and mean advantage per sign, from its micro-batches' advantages and prompt-group ids."""
    if not advantages:
        return {}
    a = torch.cat([t.detach().reshape(-1).double().cpu() for t in advantages])
    prompts = torch.cat([t.detach().reshape(-1).cpu() for t in prompt_ids]) if prompt_ids else None
    pos, neg, zero = a > 0, a < 0, a == 0
    nan = float("nan")
    out = {
        schema.COUNT_POSITIVE: float(pos.sum()),
        schema.COUNT_NEGATIVE: float(neg.sum()),
        schema.COUNT_ZERO: float(zero.sum()),
        schema.ADVANTAGE_POSITIVE_MEAN: a[pos].mean().item() if pos.any() else nan,
        schema.ADVANTAGE_NEGATIVE_MEAN: a[neg].mean().item() if neg.any() else nan,
    }
    if prompts is None or prompts.numel() != a.numel():
        return out
    ids, which = torch.unique(prompts, return_inverse=True)
    n = ids.numel()
    per_pos = torch.zeros(n).index_add_(0, which, pos.float())
    per_neg = torch.zeros(n).index_add_(0, which, neg.float())
    per_zero = torch.zeros(n).index_add_(0, which, zero.float())
    size = torch.zeros(n).index_add_(0, which, torch.ones(a.numel()))
    out.update({
        schema.PROMPT_GROUPS: float(n),
        schema.PROMPT_GROUPS_MIXED: float(((per_pos > 0) & (per_neg > 0)).sum()),
        schema.PROMPT_GROUPS_NO_SIGNAL: float((per_zero == size).sum()),
        schema.POSITIVE_PER_PROMPT: per_pos.mean().item(),
        schema.NEGATIVE_PER_PROMPT: per_neg.mean().item(),
    })  # fmt: skip
    return out
