"""One builder for the rows a finished preference step adds to its run directory.

``gradlens record`` (``record/loop.py``) and the trainer integrations
(``integrations/run_log.py``) both turn a step -- its per-pair loss diagnostics
and its gradient capture -- into a steps.csv row, that row's ``nonfinite`` flag
and its layers.csv rows here, so both write the same numbers under the same
names (``schema``). The writer (``preference_log``) only appends what it is given.

The rules, stated once:

* means over pairs are taken in float64 over every pair of the step (all
  micro-batches, all processes);
* ``rewards/accuracies`` is NaN when a reward is NaN (``losses.reward_accuracy``);
* ``nonfinite`` is 1 when the loss is not finite or, on a recorded step, the
  whole, chosen or rejected gradient norm is not finite; on a step that was not
  recorded the gradient columns are NaN because nothing was measured, and do
  not count;
* layers.csv's columns are ``schema.CHOSEN_SQ``, ``schema.REJECTED_SQ`` and
  ``schema.DOT`` whatever the capture's two groups are called.

Only the writers of preference runs import this module; the readers of run
directories (analysis, plots) never do, so they never load torch through it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ..losses import reward_accuracy
from ..pairs import CHOSEN, REJECTED
from . import schema

if TYPE_CHECKING:
    from ..gradients import Capture
    from ..losses import PreferenceLossOutput

# The norms whose non-finite value marks a recorded step as non-finite.
_CHECKED_NORMS = (schema.GRAD_NORM, schema.GRAD_NORM_CHOSEN, schema.GRAD_NORM_REJECTED)


def pair_columns(outputs: Sequence[PreferenceLossOutput], chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, float]:
    """The per-pair diagnostics of a step's loss outputs (one per micro-batch) as steps.csv means.

    ``chosen_logps``/``rejected_logps``: the policy's sequence log-probs of every pair of the step.
    """
    cat = lambda name: torch.cat([getattr(o, name).reshape(-1).double() for o in outputs])  # noqa: E731
    chosen, rejected = cat("chosen_rewards"), cat("rejected_rewards")
    return {
        schema.REWARDS_CHOSEN: chosen.mean().item(),
        schema.REWARDS_REJECTED: rejected.mean().item(),
        schema.REWARDS_MARGINS: (chosen - rejected).mean().item(),
        schema.REWARDS_ACCURACIES: reward_accuracy(chosen, rejected),
        schema.LOGPS_CHOSEN: chosen_logps.double().mean().item(),
        schema.LOGPS_REJECTED: rejected_logps.double().mean().item(),
        schema.LOG_PW_OVER_PL: cat("log_pw_over_pl").mean().item(),
        schema.SIGMOID_NEG_U: cat("sigmoid_neg_u").mean().item(),
        schema.WEIGHT_CHOSEN: cat("weight_chosen").mean().item(),
        schema.WEIGHT_REJECTED: cat("weight_rejected").mean().item(),
    }


def gradient_columns(cap: Capture | None, pair: tuple[str, str] = (CHOSEN, REJECTED), extra_groups: Sequence[str] = ()) -> dict[str, float]:
    """The split's columns for ``pair`` = (chosen-like group, rejected-like group); NaN without a capture."""
    extra = {schema.group_norm_column(g): math.nan for g in extra_groups}
    if cap is None:
        return {**{c: math.nan for c in schema.GRADIENT_COLUMNS}, **extra}
    a, b = pair
    for name in (a, b, *extra_groups):
        if name not in cap.groups.names:
            raise ValueError(f"the batch's row groups are {list(cap.groups.names)}; gradlens logs group {name!r}")
    out = {
        schema.GRAD_NORM: cap.norm(), schema.GRAD_NORM_CHOSEN: cap.norm(a), schema.GRAD_NORM_REJECTED: cap.norm(b),
        schema.GRAD_DOT: cap.dot(a, b), schema.GRAD_COSINE: cap.cosine(a, b), schema.GRAD_RATIO: cap.ratio(b, a),
    }  # fmt: skip
    out.update({schema.group_norm_column(g): cap.norm(g) for g in extra_groups})
    return out


def nonfinite_flag(row: Mapping[str, Any], *, recorded: bool) -> int:
    """1 when the row's loss, or (``recorded``) one of its gradient norms, is not finite."""
    checked = [row[schema.LOSS], *(row[c] for c in _CHECKED_NORMS if recorded)]
    return int(not all(math.isfinite(v) for v in checked))


def step_row(
    step: int,
    *,
    loss: float,
    lr: float,
    pairs: Mapping[str, float],
    capture: Capture | None,
    pair: tuple[str, str] = (CHOSEN, REJECTED),
    extra_groups: Sequence[str] = (),
    nonfinite: bool = False,
) -> dict[str, Any]:
    """A steps.csv row: ``loss`` (the value the step logs as its loss), ``pairs`` (``pair_columns``, or {}
    when the trainer has no pairs), the split of ``capture`` (None: a step that was not recorded) and the
    ``nonfinite`` flag; ``nonfinite=True`` marks the step whatever the row's values (e.g. one micro-batch's loss)."""
    row: dict[str, Any] = {schema.STEP: step, schema.LOSS: loss, schema.LR: lr, **pairs}
    row.update(gradient_columns(capture, pair, extra_groups))
    row[schema.NONFINITE] = int(nonfinite) or nonfinite_flag(row, recorded=capture is not None)
    return row


def layer_rows(cap: Capture, pair: tuple[str, str] = (CHOSEN, REJECTED)) -> dict[str, dict[str, float]]:
    """layers.csv rows of one step: per layer, the squared norms of the two groups' gradients and their dot."""
    a, b = pair
    return {
        layer: {schema.CHOSEN_SQ: v[f"{a}_sq"], schema.REJECTED_SQ: v[f"{b}_sq"], schema.DOT: v["dot"]}
        for layer, v in cap.layer_table(a, b).items()
    }
