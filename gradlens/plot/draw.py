"""Drawing helpers shared by the plotters: seeds as faint lines, the median
across seeds as a line, the interquartile range as a band (both only with two
or more seeds); captions that say exactly that; ratio axes with plain ticks;
smoothing and downsampling for drawing only (metrics always use every step)."""

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


def legend_label(group: str, n: int) -> str:
    """``dpo (3 seeds)``, ``dpo (1 run)``."""
    return f"{group} ({n} seeds)" if n != 1 else f"{group} (1 run)"


def seeds_caption(counts: Sequence[int], smooth: int = 1) -> str:
    """What a figure drawn by ``draw_seeds`` shows, for the seed counts it had: no
    band or faint lines are promised for groups with one run, and smoothing is named."""
    counts = [n for n in counts if n > 0]
    several = [n for n in counts if n > 1]
    if not several:
        parts = ["line: the single run of each group" if len(counts) > 1 else "line: one run"]
    else:
        parts = ["line: median over seeds", "band: interquartile range over seeds", "faint lines: individual seeds"]
        if len(several) < len(counts):
            parts.append("groups with one run: that run only")
    if smooth > 1:
        parts.append(f"smoothed for drawing: rolling median over {smooth} steps (--smooth 0: raw)")
    return " · ".join(parts)


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


def _plain_number(value: float, _pos=None) -> str:
    return f"{value:g}"


def ratio_axis(ax, axis: str = "y") -> None:
    """A log axis (ratios, norms) with plain ticks (0.5, 1, 2, 5, 10), never "3×10⁰" or "6×10⁻¹"."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(ticker.FuncFormatter(_plain_number))
    target.set_minor_formatter(ticker.NullFormatter())


def add_legend(ax, **kwargs) -> None:
    """A legend when the axis has labelled artists (no matplotlib warning otherwise)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**{"loc": "best", **kwargs})


def finish(fig, title: str, caption: str | None) -> None:
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
