"""TensorBoard event files of `gradlens record`, read back with tensorboard's EventAccumulator."""

from __future__ import annotations

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


def test_scalars_histograms_and_layout(tmp_path):
    out = tmp_path / "run"
    assert main([*JOB, "--steps", "6", "--out", str(out)]) == 0
    acc = _accumulator(out)
    tags = acc.Tags()
    scalar_tags = set(tags["scalars"])
    assert set(STEP_COLUMNS) - {schema.STEP} <= scalar_tags  # the same names as steps.csv
    assert {"eval/kl_to_optimum", "eval/ood_mass", "eval/true_reward", "eval/pref_accuracy"} <= scalar_tags
    assert {"layer_log10_ratio/logits", "layer_log10_ratio/all_layers"} <= set(tags["histograms"])

    steps = pd.read_csv(out / schema.STEPS)
    for tag in (schema.GRAD_NORM_CHOSEN, schema.GRAD_NORM_REJECTED, schema.GRAD_RATIO, schema.REWARDS_MARGINS):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(6))
        assert [e.value for e in events] == pytest.approx(steps[tag].tolist(), rel=1e-6, abs=1e-12)
    assert [e.step for e in acc.Scalars("eval/kl_to_optimum")] == [0, 3, 6]

    layout = _layout(acc)
    categories = {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}
    charts = categories["gradlens: chosen vs rejected"]
    assert charts["gradient norms: chosen vs rejected"][:2] == [schema.GRAD_NORM_CHOSEN, schema.GRAD_NORM_REJECTED]
    assert charts["ratio rho = |g_rejected| / |g_chosen|"] == [schema.GRAD_RATIO]
    assert charts["rewards: chosen, rejected, margins"] == [schema.REWARDS_CHOSEN, schema.REWARDS_REJECTED, schema.REWARDS_MARGINS]
    assert "gradlens: evaluation" in categories and "gradlens: reweighting" in categories


def test_resumed_run_shows_each_step_once(tmp_path):
    out = tmp_path / "run"
    assert main([*JOB, "--steps", "4", "--checkpoint-every", "2", "--out", str(out)]) == 0
    assert main([*JOB, "--steps", "8", "--checkpoint-every", "2", "--out", str(out), "--resume"]) == 0
    acc = _accumulator(out)
    assert [e.step for e in acc.Scalars(schema.LOSS)] == list(range(8))
    assert [e.step for e in acc.Scalars("eval/kl_to_optimum")] == [0, 3, 6, 8]  # the first session's final eval at 4 is purged
    _layout(acc)  # still exactly one layout
