"""One row builder: `gradlens record` and the trainer integrations write the same rows for the same step.

The record path is the real ``record.loop._train_step`` on the tabular environment;
the trainer path is the real ``integrations.run_log.RunLog``, fed the very capture
and loss output that step made. Both files are compared as text, byte for byte,
with finite rewards and with a NaN reward (``rewards/accuracies`` must be NaN in both).
"""

from __future__ import annotations

import contextlib
import copy
import math

import pandas as pd
import pytest
import torch

from gradlens.gradients import GradientRecorder
from gradlens.integrations.run_log import RunLog, preference_metrics
from gradlens.integrations.stepper import MicroBatch, StepResult
from gradlens.record import loop
from gradlens.record.config import RecordConfig, to_dict, validate, with_env_defaults
from gradlens.record.envs import build_env
from gradlens.runs import prepare_run_dir, schema
from gradlens.runs.preference_log import PreferenceRunLog

BATCH = 6


def _record_step(monkeypatch, nan_pair: int | None):
    """One real `gradlens record` step; returns its output and the capture and loss output it made."""
    cfg = validate(with_env_defaults(RecordConfig(env="tabular", loss="balanced", batch_size=BATCH, steps=1, optimizer="sgd")))
    env = build_env(cfg, log=lambda _: None)
    policy = copy.deepcopy(env.policy)
    reference = copy.deepcopy(env.policy).requires_grad_(False)
    recorder = GradientRecorder(policy)
    seen = {}
    real_capture, real_loss = recorder.capture, loop.preference_loss

    @contextlib.contextmanager
    def capture(*args, **kwargs):
        with real_capture(*args, **kwargs) as cap:
            seen["capture"] = cap
            yield cap

    def preference_loss(chosen, rejected, ref_chosen, ref_rejected, **kwargs):
        if nan_pair is not None:
            ref_chosen = ref_chosen.clone()
            ref_chosen[nan_pair] = math.nan  # one pair's reward is NaN
        out = real_loss(chosen, rejected, ref_chosen, ref_rejected, **kwargs)
        seen.update(out=out, chosen_logps=chosen.detach(), rejected_logps=rejected.detach())
        return out

    monkeypatch.setattr(recorder, "capture", capture)
    monkeypatch.setattr(loop, "preference_loss", preference_loss)
    ctx = loop.StepContext(
        cfg=cfg, policy=policy, env=env, recorder=recorder, reference_logps=loop.ReferenceLogps(env, reference, torch.device("cpu")),
        order=loop.PairOrder(env.num_pairs(), BATCH, cfg.seed, cfg.shuffle), optimizer=loop.build_optimizer(cfg, policy.parameters()),
        device=torch.device("cpu"),
    )  # fmt: skip
    try:
        done = loop._train_step(ctx, 0)
    finally:
        recorder.close()
    return cfg, done, seen


@pytest.mark.parametrize("nan_pair", [None, 2])
def test_record_and_trainer_write_identical_rows(tmp_path, monkeypatch, nan_pair):
    cfg, done, seen = _record_step(monkeypatch, nan_pair)
    config = to_dict(cfg)

    recorded = prepare_run_dir(tmp_path / "record")
    out = PreferenceRunLog(recorded, config, tensorboard=False)
    out.log_step(done.row, layers=done.layers, unattributed=done.unattributed)  # as record_run writes it
    out.close()

    # The trainer path: one micro-batch whose (GA-scaled, here unscaled) loss is the step's DPO loss.
    notes = {"pairs": seen["out"], "chosen_logps": seen["chosen_logps"], "rejected_logps": seen["rejected_logps"]}
    result = StepResult(0, seen["capture"], [MicroBatch(seen["out"].dpo_loss, notes)])
    log = RunLog(tmp_path / "trainer", config, columns=schema.PREFERENCE_STEP_COLUMNS, tensorboard=False)
    log.write_step(result, lr=done.row[schema.LR], metrics=preference_metrics(result))
    log.close()

    for table in (schema.STEPS, schema.LAYERS):
        assert (recorded / table).read_text() == (tmp_path / "trainer" / table).read_text(), table
    row = pd.read_csv(recorded / schema.STEPS).iloc[0]
    assert len(pd.read_csv(recorded / schema.LAYERS)) >= 1
    if nan_pair is None:
        assert row[schema.NONFINITE] == 0 and 0.0 <= row[schema.REWARDS_ACCURACIES] <= 1.0
        assert math.isfinite(row[schema.GRAD_NORM])
    else:
        assert math.isnan(row[schema.REWARDS_ACCURACIES]) and math.isnan(row[schema.REWARDS_CHOSEN])
        assert row[schema.NONFINITE] == 1
