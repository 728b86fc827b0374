"""TensorBoard output: scalars under the run-log names, ratio histograms, and a
custom_scalars layout that puts chosen and rejected on one chart."""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from . import schema

# (category, [(chart title, [tag regexes])]) -- the dashboard a user sees first.
PREFERENCE_LAYOUT: list[tuple[str, list[tuple[str, list[str]]]]] = [
    (
        "gradlens: chosen vs rejected",
        [
            ("gradient norms: chosen vs rejected", [schema.GRAD_NORM_CHOSEN, schema.GRAD_NORM_REJECTED, "^grad_norm$"]),
            ("ratio rho = |g_rejected| / |g_chosen|", [schema.GRAD_RATIO]),
            ("cosine(g_chosen, g_rejected)", [schema.GRAD_COSINE]),
            ("rewards: chosen, rejected, margins", [schema.REWARDS_CHOSEN, schema.REWARDS_REJECTED, schema.REWARDS_MARGINS]),
            ("log-probs: chosen vs rejected", [schema.LOGPS_CHOSEN, schema.LOGPS_REJECTED]),
            ("loss and accuracy", ["^loss$", schema.REWARDS_ACCURACIES]),
        ],
    )
]

REWEIGHTING_LAYOUT = [
    (
        "gradlens: reweighting",
        [
            ("Balanced-DPO weights a_w, a_l (1 for DPO)", [schema.WEIGHT_CHOSEN, schema.WEIGHT_REJECTED]),
            ("mean log(p_w / p_l)", [schema.LOG_PW_OVER_PL]),
            ("mean sigma(-u): DPO's per-pair coefficient", [schema.SIGMOID_NEG_U]),
            ("dot(g_chosen, g_rejected)", [schema.GRAD_DOT]),
        ],
    )
]

# `gradlens record`'s evaluations (each environment fills the charts it has names for).
EVAL_LAYOUT = [
    (
        "gradlens: evaluation",
        [
            ("true reward of samples", [f"^{schema.EVAL_TRUE_REWARD}$"]),
            ("KL to the reference / to the optimum", [f"^{schema.EVAL_KL_TO_REF}$", f"^{schema.EVAL_KL_TO_OPTIMUM}$"]),
            ("held-out log-probs: chosen vs rejected", [f"^{schema.EVAL_LOGPS_CHOSEN}$", f"^{schema.EVAL_LOGPS_REJECTED}$"]),
            ("held-out preference accuracy", [f"^{schema.EVAL_PREF_ACCURACY}$"]),
            ("probability mass on responses in no pair (tabular)", [f"^{schema.EVAL_OOD_MASS}$"]),
        ],
    ),
]


class TensorBoardLogger:
    """Thin wrapper over ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, logdir: str | os.PathLike, layout: Sequence = PREFERENCE_LAYOUT, *, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step makes TensorBoard hide events a resumed run logs again.
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)
        if layout and purge_step is None:
            self.writer.add_custom_scalars(
                {category: {title: ["Multiline", tags] for title, tags in charts} for category, charts in layout}
            )

    def scalars(self, step: int, values: Mapping[str, object]) -> None:
        for tag, value in values.items():
            if tag == schema.STEP or value is None or isinstance(value, str):
                continue
            self.writer.add_scalar(tag, float(value), global_step=step)

    def ratio_histograms(self, step: int, layers: Mapping[str, Mapping[str, float]]) -> None:
        """Per-layer histograms of log10 rho (one histogram per layer, over time)."""
        logs = []
        for name, v in layers.items():
            chosen, rejected = v[schema.CHOSEN_SQ], v[schema.REJECTED_SQ]
            if chosen > 0 and rejected > 0 and math.isfinite(chosen) and math.isfinite(rejected):
                value = 0.5 * math.log10(rejected / chosen)
                logs.append(value)
                self.writer.add_histogram(f"layer_log10_ratio/{name}", np.array([value]), global_step=step)
        if logs:
            self.writer.add_histogram("layer_log10_ratio/all_layers", np.asarray(logs), global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
