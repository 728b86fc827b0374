"""Convergence from the evals table: steps until held-out preference accuracy
reaches a level, KL(pi || pi*) for tabular runs (pi* is known exactly), and
true reward against KL to the reference for tiny-gpt2 runs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..runs import schema
from ..numerics import loglog_slope  # noqa: F401  (re-exported: analysis.loglog_slope)
from .finite import as_float_array, column, first_finite, last_finite

# Short names for the evals.csv columns used here (defined in the run schema).
PREF_ACCURACY = schema.EVAL_PREF_ACCURACY
TRAIN_PAIR_ACCURACY = schema.EVAL_TRAIN_PAIR_ACCURACY
KL_TO_OPTIMUM = schema.EVAL_KL_TO_OPTIMUM
OOD_MASS = schema.EVAL_OOD_MASS
TRUE_REWARD = schema.EVAL_TRUE_REWARD
KL_TO_REF = schema.EVAL_KL_TO_REF


def steps_to_level(evals: pd.DataFrame, level: float, column_name: str = PREF_ACCURACY) -> int | None:
    """The first evaluated step at which ``column_name`` >= ``level``; None if never (or no column)."""
    values = column(evals, column_name)
    if values is None:
        return None
    reached = np.flatnonzero(values >= level)
    return int(as_float_array(evals[schema.STEP])[reached[0]]) if reached.size else None


def kl_to_optimum_stats(evals: pd.DataFrame) -> dict[str, float]:
    """Initial, final and minimum KL(pi_theta || pi*) (nats), the final OOD mass when logged,
    and the count of non-finite KL values. Empty when the column is absent."""
    kl = column(evals, KL_TO_OPTIMUM)
    if kl is None:
        return {}
    finite = kl[np.isfinite(kl)]
    out = {
        "kl_to_optimum_initial": first_finite(kl),
        "kl_to_optimum_final": last_finite(kl),
        "kl_to_optimum_min": float(finite.min()) if finite.size else float("nan"),
        "kl_to_optimum_nonfinite": int(kl.size - finite.size),
    }
    ood = column(evals, OOD_MASS)
    if ood is not None:
        out["ood_mass_final"] = last_finite(ood)
    return out


def reward_kl_frontier(evals: pd.DataFrame) -> pd.DataFrame:
    """Evaluations as (step, kl_to_ref, true_reward) sorted by KL, with ``on_frontier``
    marking the points no other point beats (higher reward at lower or equal KL)."""
    kl, reward = column(evals, KL_TO_REF), column(evals, TRUE_REWARD)
    if kl is None or reward is None:
        raise ValueError(f"evals table needs {KL_TO_REF!r} and {TRUE_REWARD!r} for a reward-KL frontier")
    frame = pd.DataFrame({schema.STEP: as_float_array(evals[schema.STEP]), "kl_to_ref": kl, "true_reward": reward})
    frame = frame[np.isfinite(kl) & np.isfinite(reward)].sort_values(["kl_to_ref", "true_reward"], ascending=[True, False])
    best_before = frame["true_reward"].cummax().shift(1, fill_value=-np.inf)
    frame["on_frontier"] = frame["true_reward"] > best_before
    return frame.reset_index(drop=True)


def reward_kl_stats(evals: pd.DataFrame) -> dict[str, float]:
    """Final true reward and KL to the reference, the best true reward seen, and
    the reward gained per nat of KL at the end. Empty when the columns are absent."""
    kl, reward = column(evals, KL_TO_REF), column(evals, TRUE_REWARD)
    if kl is None or reward is None:
        return {}
    final_kl = last_finite(kl)
    gain = last_finite(reward) - first_finite(reward)
    return {
        "true_reward_final": last_finite(reward),
        "true_reward_max": float(np.nanmax(np.where(np.isfinite(reward), reward, np.nan))) if np.isfinite(reward).any() else float("nan"),
        "kl_to_ref_final": final_kl,
        "reward_gain_per_kl": gain / final_kl if final_kl > 0 else float("nan"),
        "reward_kl_nonfinite": int((~np.isfinite(kl) | ~np.isfinite(reward)).sum()),
    }


def accuracy_stats(evals: pd.DataFrame, level: float = 0.9) -> dict[str, float]:
    """Final held-out preference accuracy and the steps until it reaches ``level`` (NaN: never).

    A run evaluated on its training pairs reports ``train_pair_accuracy_final``
    instead: that number says nothing about held-out pairs."""
    out: dict[str, float] = {}
    training = column(evals, TRAIN_PAIR_ACCURACY)
    if training is not None:
        out["train_pair_accuracy_final"] = last_finite(training)
    accuracy = column(evals, PREF_ACCURACY)
    if accuracy is None:
        return out
    reached = steps_to_level(evals, level)
    out.update({"pref_accuracy_final": last_finite(accuracy), f"steps_to_acc_{level:g}": float("nan") if reached is None else float(reached)})
    return out
