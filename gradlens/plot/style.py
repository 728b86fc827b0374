"""One look for every gradlens figure: colour-blind-safe palette, readable sizes,
and the colour conventions experiment scripts share (``line_style``)."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # figures are files; never need a display

import matplotlib.pyplot as plt  # noqa: E402

# Okabe & Ito (2008) colour-blind-safe palette.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
# A colour means one group in every figure: the methods gradlens ships, and the variants
# the experiment scripts compare (named as the scripts name them), keep theirs in every
# report and experiment; other groups take the remaining colours in order. Defined here
# once, so that a method cannot get one colour in one experiment and another in the next.
METHOD_COLORS = {
    "dpo": "#0072B2",
    "balanced": "#D55E00",
    "adadpo": "#009E73",
    "balanced-tm": "#56B4E9",  # Balanced-DPO on per-token-mean log-probs
    "tau0.25": "#CC79A7",  # a ∝ p^τ weightings between DPO (τ=0) and Balanced-DPO (τ=1)
    "tau0.5": "#E69F00",
    "norm": "#000000",  # parameter-space norm-balancing, whole model
    "norm-layer": "#888888",  # ... per parameter tensor (a grey outside the palette)
}
# Chosen and rejected are told apart by line style, never by colour.
SIDE_LINESTYLES = {"chosen": "-", "rejected": "--"}

RC = {
    "figure.figsize": (7.0, 4.2),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}


def apply_style() -> None:
    plt.rcParams.update(RC)


def color_for(index: int) -> str:
    """The index-th palette colour (for series that are not groups, e.g. a sweep's eps values)."""
    return PALETTE[index % len(PALETTE)]


def group_colors(labels: Sequence[str]) -> dict[str, str]:
    """One colour per group label: a shipped method's own colour when its name is the
    label (and no other label shares that name), otherwise the next unused palette colour."""
    labels = list(dict.fromkeys(labels))
    base = [label.split(" [", 1)[0] for label in labels]
    out: dict[str, str] = {}
    for label, name in zip(labels, base):
        if name in METHOD_COLORS and base.count(name) == 1:
            out[label] = METHOD_COLORS[name]
    free = [c for c in PALETTE if c not in out.values()]
    for label in labels:
        if label not in out:
            out[label] = free.pop(0) if free else PALETTE[len(out) % len(PALETTE)]
    return out


def line_style(group: str, groups: Sequence[str], side: str | None = None) -> dict[str, str]:
    """Matplotlib keywords for one group's line: its colour among ``groups``, and for a
    chosen/rejected series the side's line style (solid chosen, dashed rejected)."""
    if side is not None and side not in SIDE_LINESTYLES:
        raise ValueError(f"side {side!r}: choose from {', '.join(SIDE_LINESTYLES)}")
    return {"color": group_colors(groups)[group], "linestyle": SIDE_LINESTYLES.get(side, "-")}
