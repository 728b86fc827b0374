"""Drawing helpers and table formatting (no figures saved)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradlens.plot.draw import MAX_POINTS, draw_index, draw_seeds, smooth_columns
from gradlens.plot.report import format_cell, terminal_table, to_markdown
from gradlens.plot.style import plt


def test_draw_index_downsamples_but_keeps_the_ends():
    assert draw_index(10).tolist() == list(range(10))
    idx = draw_index(100_000)
    assert len(idx) <= MAX_POINTS + 1 and idx[0] == 0 and idx[-1] == 99_999
    assert np.all(np.diff(idx) > 0)


def test_smoothing_is_a_rolling_median_that_skips_nonfinite():
    matrix = np.array([[1.0], [100.0], [3.0], [np.inf], [5.0]])
    smoothed = smooth_columns(matrix, 3)
    assert smoothed[:, 0].tolist() == [50.5, 3.0, 51.5, 4.0, 5.0]
    assert smooth_columns(matrix, 1) is matrix


def test_draw_seeds_draws_median_band_and_seeds_and_skips_empty():
    fig, ax = plt.subplots()
    frames = [pd.DataFrame({"step": np.arange(5), "x": np.arange(5.0) + k}) for k in range(3)]
    assert draw_seeds(ax, frames, "x", color="#000000", label="dpo (n=3)")
    assert len(ax.lines) == 4 and len(ax.collections) == 1  # 3 faint seeds + median, 1 IQR band
    assert ax.lines[-1].get_ydata().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert not draw_seeds(ax, frames, "absent", color="#000000", label="x")
    assert not draw_seeds(ax, [pd.DataFrame({"step": [0], "x": [-1.0]})], "x", color="#000000", label="x", positive=True)
    plt.close(fig)


def test_table_formatting():
    assert [format_cell(v) for v in (3, 3.0, 0.123456, float("nan"), float("inf"), np.int64(2), True, "wte")] == [
        "3", "3", "0.1235", "nan", "inf", "2", "yes", "wte",
    ]  # fmt: skip
    frame = pd.DataFrame({"group": ["dpo", "balanced"], "ratio_median": [3.0, 1.25]})
    assert to_markdown(frame).splitlines() == ["| group | ratio_median |", "|---|---|", "| dpo | 3 |", "| balanced | 1.25 |"]
    text = terminal_table(frame, "group")
    assert text.splitlines()[0].split() == ["dpo", "balanced"] and "ratio_median" in text
