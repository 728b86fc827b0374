"""`gradlens plot` output that cannot mislead: no silent pooling, honest
intervals in the table, one colour per group, truthful captions and axes,
the default output folder, smoothing, the self-contained report, and a
torch-free Langevin plot."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest

from gradlens.analysis import group_runs
from gradlens.analysis.compare import NOTE_NO_SPREAD
from gradlens.plot import preference
from gradlens.plot.command import default_smooth
from gradlens.plot.registry import KindPlotter, PlotOptions, register_plotter
from gradlens.plot.style import line_style, plt
from gradlens.runs import RunWriter, find_runs, load_run, schema
from test_plot_command import plot, write_run


def _runs(root: Path):
    return [load_run(p) for p in find_runs(root)]


def test_runs_differing_in_settings_are_split_and_named(tmp_path, capsys):
    write_run(tmp_path / "a", seed=0, lr=1e-6, data="a.jsonl")
    write_run(tmp_path / "b", seed=1, lr=1e-3, data="b.jsonl")
    write_run(tmp_path / "c", loss="balanced", seed=0, lr=1e-6, data="a.jsonl")
    assert plot(tmp_path, "--out", tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert "differ in settings other than the seed" in captured.err
    assert "lr 1e-06 | 0.001" in captured.err and "data a.jsonl | b.jsonl" in captured.err
    groups = pd.read_csv(tmp_path / "out" / "summary.csv")["group"].tolist()
    assert "dpo [lr=1e-06, data=a.jsonl]" in groups and "dpo [lr=0.001, data=b.jsonl]" in groups
    assert "balanced" in groups and "dpo" not in groups


def test_group_by_forces_pooling_and_still_names_the_differences(tmp_path, capsys):
    write_run(tmp_path / "a", seed=0, lr=1e-6)
    write_run(tmp_path / "b", seed=1, lr=1e-3)
    assert plot(tmp_path, "--group-by", "loss", "--out", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "--group-by loss pools runs whose settings differ" in err and "lr 1e-06 | 0.001" in err
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["group"].tolist() == ["dpo"] and summary["n_seeds"].tolist() == [2]


def test_one_seed_comparison_has_no_interval_and_the_table_says_why(tmp_path, capsys):
    write_run(tmp_path / "dpo", seed=0)
    write_run(tmp_path / "bal", loss="balanced", seed=0)
    assert plot(tmp_path, "--out", tmp_path / "out") == 0
    out = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert table["ci_low"].isna().all() and table["ci_high"].isna().all()
    assert (table["ci_note"] == "no interval: fewer than 2 seeds").all()
    assert "no interval: fewer than 2 seeds" in (tmp_path / "out" / "comparison.md").read_text()
    assert "no interval: fewer than 2 seeds" in out
    assert "paired by seed" in out


def test_few_seeds_are_rough_paired_and_holm_adjusted(tmp_path, capsys):
    for seed in (0, 1, 2):
        write_run(tmp_path / f"dpo{seed}", seed=seed)
        write_run(tmp_path / f"bal{seed}", loss="balanced", seed=seed)
    assert plot(tmp_path, "--out", tmp_path / "out", "--ci", "t") == 0
    out = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    # Metrics identical in every seed (e.g. a step count) have no spread: no interval, marked so.
    spread = table["ci_note"] == "rough: fewer than 5 seeds"
    assert spread.any() and table["paired"].all()
    assert (table.loc[~spread, "ci_note"] == NOTE_NO_SPREAD).all() and table.loc[~spread, "ci_low"].isna().all()
    assert (table["ci"] == "t").all() and "p_holm" in table.columns
    assert "t interval" in out and "balanced vs dpo: paired by seed" in out and "p_holm" in out


def _line_colors(fig) -> dict[str, tuple[str, str]]:
    """legend text -> (hex colour, line style) over every axis of the figure."""
    found = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = line.get_label()
            if not label.startswith("_"):
                found[f"{ax.get_title()}|{label}"] = (mcolors.to_hex(line.get_color()), line.get_linestyle())
    return found


def test_one_colour_per_group_and_line_style_per_side(tmp_path):
    for loss in ("dpo", "balanced"):
        for seed in (0, 1):
            write_run(tmp_path / f"{loss}{seed}", loss=loss, seed=seed, steps=10)
    groups = group_runs(_runs(tmp_path))
    options = PlotOptions(out=tmp_path)
    expected = {g: mcolors.to_hex(line_style(g, list(groups))["color"]) for g in groups}
    assert expected["dpo"] != expected["balanced"]
    for draw in (preference.fig_ratio, preference.fig_loss, preference.fig_cosine, preference.fig_norms, preference.fig_logps):
        fig = draw(groups, options)
        try:
            for key, (color, style) in _line_colors(fig).items():
                title, label = key.split("|")
                group = next((g for g in groups if title.startswith(g + " (") or label.startswith(g + " (")), None)
                if group is None:
                    continue  # reference lines (rho = 1)
                assert color == expected[group], (draw.__name__, key)
                if "chosen" in key.split("|")[1]:
                    assert style == "-", key
                if "rejected" in key.split("|")[1]:
                    assert style == "--", key
        finally:
            plt.close(fig)


def test_captions_match_what_is_drawn_and_axes_read_well(tmp_path):
    write_run(tmp_path / "dpo", seed=0, steps=10)
    write_run(tmp_path / "bal", loss="balanced", seed=0, steps=10)
    groups = group_runs(_runs(tmp_path))
    fig = preference.fig_ratio(groups, PlotOptions(out=tmp_path))
    try:
        caption = " ".join(t.get_text() for t in fig.texts)
        assert "band" not in caption and "faint" not in caption and "single run" in caption
        ax = fig.axes[0]
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert labels and all("10^" not in t and "\\times" not in t and "×" not in t for t in labels), labels
        assert any(t in ("1", "2", "5", "10", "0.5") for t in labels), labels
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "dpo (1 run)" in legend and not [t for t in legend if "=" in t and "ρ" not in t]
    finally:
        plt.close(fig)
    fig = preference.fig_pw_over_pl(groups, PlotOptions(out=tmp_path))
    try:
        assert "log" in fig._suptitle.get_text().lower() and "ln" in fig.axes[0].get_ylabel()
    finally:
        plt.close(fig)
    fig = preference.fig_layer_heatmap(groups, PlotOptions(out=tmp_path))
    try:
        assert any("ln ρ" in ax.get_ylabel() for ax in fig.axes)  # the colour bar names its log base
    finally:
        plt.close(fig)
    smoothed = preference.fig_loss(groups, PlotOptions(out=tmp_path, smooth=25))
    try:
        assert "rolling median over 25 steps" in " ".join(t.get_text() for t in smoothed.texts)
    finally:
        plt.close(smoothed)


def test_default_smoothing_and_smooth_zero(tmp_path, capsys):
    short, long = write_run(tmp_path / "short", steps=20), write_run(tmp_path / "long", seed=1, steps=1200, layers=False, evals=False)
    assert default_smooth([load_run(short)]) == 1 and default_smooth([load_run(long)]) == 6
    assert plot(long, "--out", tmp_path / "auto") == 0
    assert "rolling median over 6 steps" in (tmp_path / "auto" / "report.html").read_text()
    assert plot(long, "--out", tmp_path / "raw", "--smooth", "0") == 0
    assert "smoothing for drawing: off" in (tmp_path / "raw" / "report.html").read_text()


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.links, self.images, self.external = set(), [], {}, []
        self._figure = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "figure":
            self._figure = a.get("id")
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if tag == "img":
            self.images[self._figure] = a.get("src", "")
        for key in ("src", "href"):
            if key in a and not a[key].startswith(("#", "data:")):
                self.external.append(a[key])
        if tag in ("script", "link"):
            self.external.append(tag)


def test_report_html_is_self_contained_and_embeds_everything_it_names(tmp_path, monkeypatch, capsys):
    for loss, seed, lr in (("dpo", 0, 0.05), ("dpo", 1, 0.01), ("balanced", 0, 0.05)):
        write_run(tmp_path / "runs" / f"{loss}{seed}", loss=loss, seed=seed, steps=8, lr=lr, layers=False)
    monkeypatch.chdir(tmp_path)
    assert plot("runs") == 0
    report = tmp_path / "runs" / "gradlens-plots" / "report.html"
    text = report.read_text(encoding="utf-8")
    page = _Collector()
    page.feed(text)
    assert not page.external, page.external  # opens offline: nothing to fetch
    assert page.links and set(page.links) <= page.ids  # every named figure and table is in the page
    figures = [link for link in page.links if link.startswith("figure-")]
    pngs = sorted(p.stem for p in report.parent.glob("*.png"))
    assert sorted(f.removeprefix("figure-") for f in figures) == pngs
    for name in figures:
        assert page.images[name].startswith("data:image/png;base64,") and len(page.images[name]) > 1000
    for table in ("table-summary", "table-comparison", "table-runs-settings", "table-shared-settings"):
        assert table in page.links, table
    assert "runs of dpo differ in lr" in text  # the settings that differ, and what was done about it
    assert "differ in settings other than the seed" in text  # the warnings as printed


def test_registry_refuses_a_second_plotter_for_a_kind():
    from gradlens.plot.registry import get_plotter

    get_plotter("preference")
    with pytest.raises(ValueError, match="already registered"):
        register_plotter("preference", KindPlotter(summarize=lambda g, o: pd.DataFrame(), figures=lambda g, o: []))


def test_langevin_plot_never_imports_torch_and_uses_a_log_iteration_axis(tmp_path):
    from gradlens.runs import langevin_schema as C

    run = tmp_path / "lang"
    writer = RunWriter(run, {"mode": C.MODE_RUN, "label": "gauss d10", "target": "gaussian", "h": 0.01, "seed": 0}, kind=schema.KIND_LANGEVIN)
    for k in [0, 1, 3, 10, 30, 100, 300, 1000, 3000]:
        writer.log_step({C.STEP: k, C.KL: 5.0 / (1 + k), C.KL_STATIONARY: 0.001})
    writer.write_summary({"kl0": 5.0})
    writer.close()
    script = (
        "import sys, json\n"
        "from gradlens.cli import main\n"
        f"rc = main(['plot', {str(run)!r}, '--out', {str(tmp_path / 'out')!r}])\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "torch": False}, done.stderr
    assert (tmp_path / "out" / "langevin_kl.png").is_file()
    from gradlens.plot import langevin as L

    fig, (ax, ax2) = plt.subplots(1, 2)
    try:
        assert L._iteration_axis(ax, [np.array([0.0, 1, 10, 1000])]) and ax.get_xscale() == "symlog"
        assert not L._iteration_axis(ax2, [np.array([0.0, 10, 50])]) and ax2.get_xscale() == "linear"
    finally:
        plt.close(fig)
    groups = {"gauss d10": [load_run(run)]}
    assert list(groups) == list(group_runs([load_run(run)], "label"))  # a legend entry is the label, not "label=..."
