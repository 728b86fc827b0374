"""Drawing helpers shared by the plotters: seeds as faint lines, the median
across seeds as a line, the interquartile range as a band; smoothing and
downsampling for drawing only (metrics always use every step)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import ticker

from ..analysis.seeds import row_quantiles, seed_matrix
from .style import apply_style, plt

# A line never needs more points than a figure has pixels across.
MAX_POINTS = 2000
SEED_ALPHA = 0.25
BAND_ALPHA = 0.22
CAPTION = "line: median over seeds · band: interquartile range · faint lines: individual seeds"


def legend_label(group: str, n: int) -> str:
    return f"{group} (n={n})"


def smooth_columns(matrix: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling median per column (drawing only); NaN/inf are skipped."""
    if window <= 1 or matrix.size == 0:
        return matrix
    frame = pd.DataFrame(np.where(np.isfinite(matrix), matrix, np.nan))
    return frame.rolling(window, center=True, min_periods=1).median().to_numpy()


def draw_index(n: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """Evenly strided indices (always with the last one) so a line has at most ~max_points points."""
    if n <= max_points:
        return np.arange(n)
    stride = int(np.ceil(n / max_points))
    return np.unique(np.r_[np.arange(0, n, stride), n - 1])


def draw_seeds(
    ax,
    frames: Sequence[pd.DataFrame],
    column: str,
    *,
    color: str,
    label: str,
    smooth: int = 1,
    positive: bool = False,
    linestyle: str = "-",
) -> bool:
    """Draw one group's column: faint seeds, IQR band and median. Returns False when no run had data.

    ``positive`` drops values <= 0 (they have no place on a log axis).
    """
    frames = [f for f in frames if f is not None and not f.empty and column in f.columns]
    if not frames:
        return False
    steps, matrix = seed_matrix(frames, column)
    matrix = np.where(np.isfinite(matrix), matrix, np.nan)
    if positive:
        matrix = np.where(matrix > 0, matrix, np.nan)
    if not np.isfinite(matrix).any():
        return False
    matrix = smooth_columns(matrix, smooth)
    q25, median, q75 = row_quantiles(matrix, [0.25, 0.5, 0.75])
    idx = draw_index(steps.size)
    x = steps[idx]
    if matrix.shape[1] > 1:
        for j in range(matrix.shape[1]):
            ax.plot(x, matrix[idx, j], color=color, alpha=SEED_ALPHA, linewidth=0.7, linestyle=linestyle)
        ax.fill_between(x, q25[idx], q75[idx], color=color, alpha=BAND_ALPHA, linewidth=0)
    ax.plot(x, median[idx], color=color, linewidth=1.8, linestyle=linestyle, label=label)
    return True


def panel_grid(n_panels: int, *, width: float = 5.2, height: float = 3.6, sharey: bool = True):
    """A figure with one axis per panel (at most 3 per row); unused axes removed."""
    apply_style()
    ncols = min(max(n_panels, 1), 3)
    nrows = int(np.ceil(max(n_panels, 1) / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, sharey=sharey, layout="constrained"
    )
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.remove()
    return fig, flat[:n_panels]


def single_axis(width: float = 7.5, height: float = 4.4):
    apply_style()
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    return fig, ax


def step_axis(ax, label: str = "optimizer step") -> None:
    """Label the x axis and write large step numbers compactly (20k, 1M) so ticks never collide."""
    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6, integer=True))
    ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))


def add_legend(ax, **kwargs) -> None:
    """A legend when the axis has labelled artists (no matplotlib warning otherwise)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**{"loc": "best", **kwargs})


def finish(fig, title: str, caption: str | None = CAPTION) -> None:
    fig.suptitle(title, fontsize=13)
    if caption:
        # Outside the constrained layout; savefig's tight bbox still includes it.
        fig.text(0.5, -0.01, caption, ha="center", va="top", fontsize=8, color="#444444")


def save_figure(fig, out: Path, name: str, formats: Sequence[str]) -> list[Path]:
    """Write ``out/name.<format>`` for every format and close the figure."""
    paths = []
    try:
        for fmt in formats:
            path = Path(out) / f"{name}.{fmt}"
            fig.savefig(path, format=fmt)
            paths.append(path)
    finally:
        plt.close(fig)
    return paths
