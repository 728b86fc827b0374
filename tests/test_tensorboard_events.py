"""TensorBoard event files of `gradlens record`, read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from gradlens.cli import main
from gradlens.runs import schema
from gradlens.record.loop import STEP_COLUMNS

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

JOB = ["record", "--env", "tabular", "--loss", "dpo", "--quiet", "--eval-every", "3"]


def _accumulator(path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _layout(acc: EventAccumulator) -> layout_pb2.Layout:
    (event,) = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())


def _charts(acc: EventAccumulator) -> dict[str, dict[str, list[str]]]:
    layout = _layout(acc)
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


def test_scalars_layer_ratios_and_layout(tmp_path):
    out = tmp_path / "run"
    assert main([*JOB, "--steps", "6", "--out", str(out)]) == 0
    acc = _accumulator(out)
    tags = acc.Tags()
    scalar_tags = set(tags["scalars"])
    assert set(STEP_COLUMNS) - {schema.STEP} <= scalar_tags  # the same names as steps.csv
    assert {"eval/kl_to_optimum", "eval/ood_mass", "eval/true_reward", "eval/pref_accuracy"} <= scalar_tags
    # Per-layer ln rho: scalars grouped under one prefix, no single-value histograms.
    assert "layer_ln_ratio/logits" in scalar_tags and not [t for t in tags["histograms"] if "ratio" in t]
    layers = pd.read_csv(out / schema.LAYERS)
    logits = layers[layers[schema.LAYER] == "logits"]
    expected = 0.5 * np.log(logits[schema.REJECTED_SQ].to_numpy() / logits[schema.CHOSEN_SQ].to_numpy())
    assert [e.value for e in acc.Scalars("layer_ln_ratio/logits")] == pytest.approx(expected, rel=1e-5)

    steps = pd.read_csv(out / schema.STEPS)
    for tag in (schema.GRAD_NORM_CHOSEN, schema.GRAD_NORM_REJECTED, schema.GRAD_RATIO, schema.REWARDS_MARGINS):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(6))
        assert [e.value for e in events] == pytest.approx(steps[tag].tolist(), rel=1e-6, abs=1e-12)
    assert [e.step for e in acc.Scalars("eval/kl_to_optimum")] == [0, 3, 6]

    categories = _charts(acc)
    charts = categories["gradlens: chosen vs rejected"]
    # TensorBoard colours by run: chosen and rejected never share a chart, the ratio sits beside them.
    for title, regexes in (c for section in categories.values() for c in section.items()):
        joined = " ".join(regexes)
        assert not ("chosen" in joined and "rejected" in joined), title
    titles = list(charts)
    assert titles[:3] == [t for t in titles if "g_chosen" in t or "g_rejected" in t][:3]
    assert charts[titles[2]] == [f"^{schema.GRAD_RATIO}$"]
    assert "gradlens: reweighting" in categories
    # Every chart of the dashboard has a tag the run logged.
    every_tag = scalar_tags
    for section in categories.values():
        for title, regexes in section.items():
            assert any(re.search(r, t) for r in regexes for t in every_tag), title
    evaluation = categories["gradlens: evaluation"]
    assert "probability mass on responses in no pair" in evaluation  # tabular logs eval/ood_mass
    assert not [t for t in evaluation if "sample length" in t or "training-pair" in t]


def test_evaluation_section_shows_only_logged_metrics(tmp_path):
    from gradlens.runs.tensorboard import EVAL_LAYOUT, PREFERENCE_LAYOUT, TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, PREFERENCE_LAYOUT, optional_layout=EVAL_LAYOUT)
    logger.scalars(0, {schema.LOSS: 0.7})  # a training row does not decide the evaluation section
    logger.scalars(0, {schema.STEP: 0, "eval/true_reward": 1.0, "eval/kl_to_ref": 0.0, "eval/train_pair_accuracy": 0.5})
    logger.scalars(1, {"eval/ood_mass": 0.1})  # later rows do not rewrite the dashboard
    logger.close()
    evaluation = _charts(_accumulator(tmp_path))["gradlens: evaluation"]
    assert list(evaluation) == ["true reward of samples", "KL to the reference", "training-pair accuracy (no held-out data given)"]
    assert not [t for t in evaluation if "held-out" in t and "no held-out" not in t]


def test_resumed_run_shows_each_step_once(tmp_path):
    out = tmp_path / "run"
    assert main([*JOB, "--steps", "4", "--checkpoint-every", "2", "--out", str(out)]) == 0
    assert main([*JOB, "--steps", "8", "--checkpoint-every", "2", "--out", str(out), "--resume"]) == 0
    acc = _accumulator(out)
    assert [e.step for e in acc.Scalars(schema.LOSS)] == list(range(8))
    assert [e.step for e in acc.Scalars("eval/kl_to_optimum")] == [0, 3, 6, 8]  # the first launch's final eval at 4 is purged
    _layout(acc)  # still exactly one layout
