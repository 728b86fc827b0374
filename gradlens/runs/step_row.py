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
* the split's columns are named after the run's two groups (``schema.split_columns``:
  ``grad_norm/chosen`` and ``grad_norm/rejected`` for DPO's pair, ``grad_norm/positive``
  and ``grad_norm/negative`` for GRPO's); a group with no row in the step has a gradient of
  exactly 0 (the recorder may report float rounding for a group it takes as a remainder);
* ``nonfinite`` is 1 when the loss is not finite or, on a recorded step, the
  whole gradient norm or one of the two groups' is not finite; on a step that was not
  recorded the gradient columns are NaN because nothing was measured, and do
  not count;
* layers.csv's columns are ``schema.CHOSEN_SQ``, ``schema.REJECTED_SQ`` and
  ``schema.DOT`` whatever the capture's two groups are called (the first and the second).

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


def gradient_columns(
    cap: Capture | None, pair: tuple[str, str] = (CHOSEN, REJECTED), extra_groups: Sequence[str] = (), *, empty: Sequence[str] = ()
) -> dict[str, float]:
    """The split's columns for ``pair`` = (first group, second group); NaN without a capture.
    Groups in ``empty`` had no rows in the step: their gradient is exactly zero."""
    names = schema.split_columns(pair)
    extra = {schema.group_norm_column(g): math.nan for g in extra_groups}
    if cap is None:
        return {**{c: math.nan for c in names}, **extra}
    a, b = pair
    for name in (a, b, *extra_groups):
        if name not in cap.groups.names:
            raise ValueError(f"the batch's row groups are {list(cap.groups.names)}; gradlens logs group {name!r}")
    norm = lambda g: 0.0 if g in empty else cap.norm(g)  # noqa: E731
    na, nb = norm(a), norm(b)
    dot = 0.0 if a in empty or b in empty else cap.dot(a, b)
    cosine = dot / (na * nb) if na * nb > 0 else math.nan
    ratio = nb / na if na > 0 else (math.nan if nb == 0 or math.isnan(nb) else math.inf)  # as Capture.ratio
    out = dict(zip(names, (cap.norm(), na, nb, dot, cosine, ratio)))
    out.update({schema.group_norm_column(g): norm(g) for g in extra_groups})
    return out


def nonfinite_flag(row: Mapping[str, Any], *, recorded: bool, pair: tuple[str, str] = (CHOSEN, REJECTED)) -> int:
    """1 when the row's loss, or (``recorded``) one of its gradient norms (whole, first, second group), is not finite."""
    checked = [row[schema.LOSS], *(row[c] for c in schema.split_columns(pair)[:3] if recorded)]
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
    empty: Sequence[str] = (),
) -> dict[str, Any]:
    """A steps.csv row: ``loss`` (the value the step logs as its loss), ``pairs`` (``pair_columns``, or {}
    when the trainer has no pairs), the split of ``capture`` (None: a step that was not recorded) and the
    ``nonfinite`` flag; ``nonfinite=True`` marks the step whatever the row's values (e.g. one micro-batch's loss)."""
    row: dict[str, Any] = {schema.STEP: step, schema.LOSS: loss, schema.LR: lr, **pairs}
    row.update(gradient_columns(capture, pair, extra_groups, empty=empty))
    row[schema.NONFINITE] = int(nonfinite) or nonfinite_flag(row, recorded=capture is not None, pair=pair)
    return row


def layer_rows(cap: Capture, pair: tuple[str, str] = (CHOSEN, REJECTED), *, empty: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """layers.csv rows of one step: per layer, the squared norms of the two groups' gradients and their dot
    (0 for a group in ``empty``: it had no rows in the step)."""
    a, b = pair
    zero_a, zero_b = a in empty, b in empty
    return {
        layer: {
            schema.CHOSEN_SQ: 0.0 if zero_a else v[f"{a}_sq"],
            schema.REJECTED_SQ: 0.0 if zero_b else v[f"{b}_sq"],
            schema.DOT: 0.0 if zero_a or zero_b else v["dot"],
        }
        for layer, v in cap.layer_table(a, b).items()
    }
