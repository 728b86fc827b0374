"""TensorBoard output: scalars under the run-log names, per-layer ln rho as
scalars, and a custom_scalars dashboard.

Two constraints shape the dashboard:

* TensorBoard colours lines by run, so two series of one run on one chart share
  a colour. Chosen and rejected therefore get separate charts, side by side,
  with the ratio or the margin beside them; no chart holds both.
* A chart whose tags a run never logs is an empty box. Charts listed as
  optional (the evaluation section: each environment logs different metrics)
  are kept only when the first row touching them has one of their tags; the
  dashboard is written then (or at ``close``).

rho is written as ``ln rho`` (natural log, the base of every gradlens plot and
table) under ``layer_ln_ratio/<layer>``: one scalar chart per layer, grouped
in one section, instead of single-value histograms that render as spikes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Mapping, Sequence

from . import schema
from .tables import named_os_error

Layout = list[tuple[str, list[tuple[str, list[str]]]]]
LAYER_PREFIX = "layer_ln_ratio"

# (category, [(chart title, [tag regexes])]) -- the dashboard a user sees first.
PREFERENCE_LAYOUT: Layout = [
    (
        "gradlens: chosen vs rejected",
        [
            ("|g_chosen| (chosen gradient norm)", [f"^{schema.GRAD_NORM_CHOSEN}$"]),
            ("|g_rejected| (rejected gradient norm)", [f"^{schema.GRAD_NORM_REJECTED}$"]),
            ("rho = |g_rejected| / |g_chosen| (> 1: rejected dominates)", [f"^{schema.GRAD_RATIO}$"]),
            ("log p chosen", [f"^{schema.LOGPS_CHOSEN}$"]),
            ("log p rejected", [f"^{schema.LOGPS_REJECTED}$"]),
            ("reward margin: rewards/chosen - rewards/rejected", [f"^{schema.REWARDS_MARGINS}$"]),
            ("rewards/chosen", [f"^{schema.REWARDS_CHOSEN}$"]),
            ("rewards/rejected", [f"^{schema.REWARDS_REJECTED}$"]),
            ("cosine(g_chosen, g_rejected)", [f"^{schema.GRAD_COSINE}$"]),
            ("|g| (whole gradient)", ["^grad_norm$"]),
            ("loss", ["^loss$"]),
            ("reward accuracy (training batch)", [f"^{schema.REWARDS_ACCURACIES}$"]),
        ],
    )
]

REWEIGHTING_LAYOUT: Layout = [
    (
        "gradlens: reweighting",
        [
            ("Balanced-DPO weight a_w (1 for DPO)", [f"^{schema.WEIGHT_CHOSEN}$"]),
            ("Balanced-DPO weight a_l (1 for DPO)", [f"^{schema.WEIGHT_REJECTED}$"]),
            ("mean ln(p_w / p_l)", [f"^{schema.LOG_PW_OVER_PL}$"]),
            ("mean sigma(-u): DPO's per-pair coefficient", [f"^{schema.SIGMOID_NEG_U}$"]),
            ("dot(g_chosen, g_rejected)", [f"^{schema.GRAD_DOT}$"]),
        ],
    )
]

# Charts of evaluation metrics; only those whose tags a run logs are shown.
EVAL_LAYOUT: Layout = [
    (
        "gradlens: evaluation",
        [
            ("true reward of samples", [f"^{schema.EVAL_TRUE_REWARD}$"]),
            ("KL to the reference", [f"^{schema.EVAL_KL_TO_REF}$"]),
            ("KL to the optimum pi*", [f"^{schema.EVAL_KL_TO_OPTIMUM}$"]),
            ("log p chosen (evaluation pairs)", [f"^{schema.EVAL_LOGPS_CHOSEN}$"]),
            ("log p rejected (evaluation pairs)", [f"^{schema.EVAL_LOGPS_REJECTED}$"]),
            ("reward margin (evaluation pairs)", [f"^{schema.EVAL_MARGIN}$"]),
            ("preference accuracy (held-out pairs)", [f"^{schema.EVAL_PREF_ACCURACY}$"]),
            ("training-pair accuracy (no held-out data given)", [f"^{schema.EVAL_TRAIN_PAIR_ACCURACY}$"]),
            ("probability mass on responses in no pair", [f"^{schema.EVAL_OOD_MASS}$"]),
            ("mean sample length", [f"^{schema.EVAL_SAMPLE_LENGTH}$"]),
        ],
    )
]

def split_layout(first: str, second: str) -> Layout:
    """The split's charts for a run whose two groups are not chosen/rejected (desirable/undesirable,
    positive/negative advantage): ``PREFERENCE_LAYOUT``'s gradient charts titled with the run's own
    group names, and the rows of each group per step."""
    g1, g2 = schema.group_norm_column(first), schema.group_norm_column(second)
    return [
        (
            f"gradlens: {first} vs {second}",
            [
                (f"|g_{first}| ({first} gradient norm)", [f"^{g1}$"]),
                (f"|g_{second}| ({second} gradient norm)", [f"^{g2}$"]),
                (f"rho = |g_{second}| / |g_{first}| (> 1: {second} dominates)", [f"^{schema.GRAD_RATIO}$"]),
                (f"cosine(g_{first}, g_{second})", [f"^{schema.GRAD_COSINE}$"]),
                (f"dot(g_{first}, g_{second})", [f"^{schema.GRAD_DOT}$"]),
                ("|g| (whole gradient)", ["^grad_norm$"]),
                ("loss", ["^loss$"]),
                (f"{first} rows per step", [f"^{schema.group_count_column(first)}$"]),
                (f"{second} rows per step", [f"^{schema.group_count_column(second)}$"]),
            ],
        )
    ]


# Runs split by the sign of an advantage (GRPO, RLOO): what else their steps.csv holds.
ADVANTAGE_LAYOUT: Layout = [
    (
        "gradlens: advantages",
        [
            ("zero-advantage rows per step", [f"^{schema.COUNT_ZERO}$"]),
            ("|g_zero| (KL or entropy terms only)", [f"^{schema.group_norm_column(schema.ZERO)}$"]),
            ("mean advantage of the positive rows", [f"^{schema.ADVANTAGE_POSITIVE_MEAN}$"]),
            ("mean advantage of the negative rows", [f"^{schema.ADVANTAGE_NEGATIVE_MEAN}$"]),
            ("prompt groups with both signs", [f"^{schema.PROMPT_GROUPS_MIXED}$"]),
            ("prompt groups with no learning signal (all advantages 0)", [f"^{schema.PROMPT_GROUPS_NO_SIGNAL}$"]),
        ],
    )
]


def filter_layout(layout: Layout, tags: set[str]) -> Layout:
    """``layout`` with only the charts that match at least one of ``tags``; empty categories dropped."""
    kept = []
    for category, charts in layout:
        live = [(title, regexes) for title, regexes in charts if any(re.search(r, t) for r in regexes for t in tags)]
        if live:
            kept.append((category, live))
    return kept


def layer_ln_ratios(layers: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``layer_ln_ratio/<layer>`` -> ln rho of that layer (0.5 ln(rejected_sq / chosen_sq)),
    for the layers where both squared norms are finite and positive."""
    out = {}
    for name, v in layers.items():
        chosen, rejected = v[schema.CHOSEN_SQ], v[schema.REJECTED_SQ]
        if chosen > 0 and rejected > 0 and math.isfinite(chosen) and math.isfinite(rejected):
            out[f"{LAYER_PREFIX}/{name}"] = 0.5 * math.log(rejected / chosen)
    return out


class TensorBoardLogger:
    """Thin wrapper over ``torch.utils.tensorboard.SummaryWriter``.

    ``layout`` is always shown; ``optional_layout`` charts only when their tags
    are logged (decided by the first row that has any of them)."""

    def __init__(
        self,
        logdir: str | os.PathLike,
        layout: Sequence = PREFERENCE_LAYOUT,
        *,
        purge_step: int | None = None,
        optional_layout: Sequence = (),
    ):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step makes TensorBoard hide events a resumed run logs again.
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)
        self.layout, self.optional = list(layout), list(optional_layout)
        # A resumed run keeps the dashboard its first launch wrote (one layout per run).
        self._layout_pending = purge_step is None and bool(self.layout or self.optional)
        self._optional_regexes = [r for _, charts in self.optional for _, regexes in charts for r in regexes]
        if self._layout_pending and not self.optional:
            self._write_layout(set())

    def _write_layout(self, tags: set[str]) -> None:
        full = self.layout + filter_layout(self.optional, tags)
        if full:
            self.writer.add_custom_scalars({category: {title: ["Multiline", regexes] for title, regexes in charts} for category, charts in full})
        self._layout_pending = False

    @contextlib.contextmanager
    def _naming_the_file(self):
        """A failed write (EFBIG, ENOSPC) names the event file: TensorBoard's own error names none."""
        try:
            yield
        except OSError as exc:
            try:
                name = self.writer._get_file_writer().event_writer._file_name
            except Exception:  # noqa: BLE001 - a private attribute of tensorboard's writer; the folder will do
                name = self.writer.log_dir
            raise named_os_error(exc, name) from None

    def scalars(self, step: int, values: Mapping[str, object]) -> None:
        with self._naming_the_file():
            self._scalars(step, values)

    def _scalars(self, step: int, values: Mapping[str, object]) -> None:
        tags = set()
        for tag, value in values.items():
            if tag == schema.STEP or value is None or isinstance(value, str):
                continue
            self.writer.add_scalar(tag, float(value), global_step=step)
            tags.add(tag)
        if self._layout_pending and any(re.search(r, t) for r in self._optional_regexes for t in tags):
            self._write_layout(tags)

    def layer_ratios(self, step: int, layers: Mapping[str, Mapping[str, float]]) -> None:
        """Per-layer ln rho as scalars, one chart per layer under ``layer_ln_ratio/``."""
        with self._naming_the_file():
            for tag, value in layer_ln_ratios(layers).items():
                self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        with self._naming_the_file():
            self.writer.flush()

    def close(self) -> None:
        with self._naming_the_file():
            if self._layout_pending:
                self._write_layout(set())
            self.writer.close()
