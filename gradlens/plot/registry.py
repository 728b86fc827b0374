"""Plotters keyed by run kind ("preference", "langevin", ...).

`gradlens plot` groups the runs it is given, checks they are all of one kind,
and hands them to that kind's plotter. A new run kind adds one module that
calls ``register_plotter`` and one entry in ``PLOTTER_MODULES`` below, which maps the
kind to that module so that `get_plotter` can import it on first use (the plotting
modules are imported lazily, so only the kinds being plotted are loaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from ..runs import Run

# group label -> runs in that group (e.g. "dpo" -> [seed0, seed1, ...])
RunGroups = dict[str, list[Run]]


@dataclass
class PlotOptions:
    out: Path
    formats: list[str] = field(default_factory=lambda: ["png"])
    smooth: int = 1            # rolling-median window for drawing step series; 1: raw
    group_by: str = "loss"
    ci: str = "bootstrap"      # interval of the comparison table: "bootstrap" or "t"


@dataclass
class KindPlotter:
    # One row per group; printed to the terminal and written as CSV + Markdown.
    summarize: Callable[[RunGroups, PlotOptions], pd.DataFrame]
    # Writes figures under options.out, returns their paths (one per format).
    figures: Callable[[RunGroups, PlotOptions], list[Path]]
    # How a run's group label is derived when --group-by is not given.
    default_group_by: str = "loss"
    # A config key whose values the plotter keeps apart itself (see analysis.groups.split_by_settings).
    split_within: str | None = None


PLOTTERS: dict[str, KindPlotter] = {}

# Modules that register plotters; imported lazily by `get_plotter`.
PLOTTER_MODULES = {"preference": "gradlens.plot.preference", "langevin": "gradlens.plot.langevin"}


def register_plotter(kind: str, plotter: KindPlotter) -> None:
    """Add the plotter for runs of ``kind``; a kind has one plotter, so a second registration raises."""
    if kind in PLOTTERS:
        raise ValueError(f"a plotter for run kind {kind!r} is already registered")
    PLOTTERS[kind] = plotter


def get_plotter(kind: str) -> KindPlotter:
    if kind not in PLOTTERS and kind in PLOTTER_MODULES:
        import importlib

        importlib.import_module(PLOTTER_MODULES[kind])
    if kind not in PLOTTERS:
        raise ValueError(f"no plotter for runs of kind {kind!r}; known kinds: {sorted(PLOTTER_MODULES)}")
    return PLOTTERS[kind]
