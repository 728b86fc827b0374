"""End to end: `gradlens record` two tiny tabular runs per loss (two seeds each), then `gradlens plot` them."""

from __future__ import annotations

import pandas as pd
import torch
from PIL import Image

from gradlens.cli import main

# Figures a tabular run must produce (the reward-KL frontier is a tiny-gpt2 figure; see test_plot_command.py).
EXPECTED_FIGURES = ("norms", "ratio", "layer_heatmap", "logps", "pw_over_pl", "rewards", "kl_to_optimum", "cosine", "loss")
EXPECTED_COLUMNS = (
    "group", "n_seeds", "steps", "ratio_median", "ratio_iqr", "ratio_final", "mean_log_ratio", "dominated_frac",
    "onset_step", "cosine_median", "log_pw_over_pl_final", "chosen_logp_fall_frac", "chosen_logp_change",
    "loss_final", "loss_spikes", "grad_norm_spikes", "loss_final_seed_sd", "kl_to_optimum_final",
)  # fmt: skip


def test_record_then_plot(tmp_path, capsys):
    torch.set_num_threads(1)
    runs = tmp_path / "runs"
    for loss in ("dpo", "balanced"):
        for seed in (0, 1):
            argv = ["record", "--env", "tabular", "--loss", loss, "--seed", str(seed), "--steps", "20", "--out", str(runs / f"{loss}-s{seed}")]
            assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()

    out = tmp_path / "figures"
    assert main(["plot", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "ratio_median" in printed.out, printed.err

    for name in EXPECTED_FIGURES:
        path = out / f"{name}.png"
        assert path.is_file(), f"{name}.png missing; stderr:\n{printed.err}"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
        assert 600 <= width <= 6000 and 350 <= height <= 6000, f"{name}.png is {width}x{height}"
        assert path.stat().st_size > 10_000

    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["group"]) == ["balanced", "dpo"]
    assert summary["n_seeds"].tolist() == [2, 2]
    assert summary["steps"].tolist() == [20, 20]
    missing = [c for c in EXPECTED_COLUMNS if c not in summary.columns]
    assert not missing, missing
    assert (out / "summary.md").read_text(encoding="utf-8").count("\n") == 2 + len(summary)
    assert len(pd.read_csv(out / "runs.csv")) == 4
