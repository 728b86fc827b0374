"""``report.html``: one self-contained page per ``gradlens plot`` call.

It holds what the terminal printed and what the folder holds, in the order a
reader wants it: the warnings, the groups and their runs, the settings every
run shares and the ones that differ, the summary and comparison tables, and
every figure. Figures are embedded as data URIs (PNG, else SVG), the style is
inline, and there are no scripts or links to fetch, so the file opens offline
and can be mailed on its own. The contents list names every figure and table;
each named item is an element with that ``id`` in the page.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from ..analysis.groups import Grouping, differing_settings, flat_settings
from ..runs import Run
from .report import format_cell

REPORT = "report.html"
EMBEDDABLE = {".png": "image/png", ".svg": "image/svg+xml"}
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0 1em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.warn { background: #fff4e5; border-left: 4px solid #e69f00; padding: .4em .8em; margin: .3em 0; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; } .muted { color: #666; font-size: 13px; }
"""


@dataclass
class ReportContent:
    kind: str
    group_by: str
    groups: Mapping[str, Sequence[Run]]
    grouping: Grouping
    summary: pd.DataFrame
    tables: Mapping[str, pd.DataFrame | None] = field(default_factory=dict)
    figures: Sequence[Path] = ()
    warnings: Sequence[str] = ()
    smooth: int = 1
    ci: str = "bootstrap"


def _table(frame: pd.DataFrame, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False)
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _embedded_figures(paths: Sequence[Path]) -> tuple[dict[str, str], list[str]]:
    """name -> data URI (PNG preferred over SVG), and the names only written as PDF."""
    by_name: dict[str, dict[str, Path]] = {}
    for path in paths:
        by_name.setdefault(Path(path).stem, {})[Path(path).suffix.lower()] = Path(path)
    uris, pdf_only = {}, []
    for name, files in by_name.items():
        suffix = next((s for s in EMBEDDABLE if s in files), None)
        if suffix is None:
            pdf_only.append(name)
            continue
        data = base64.b64encode(files[suffix].read_bytes()).decode("ascii")
        uris[name] = f"data:{EMBEDDABLE[suffix]};base64,{data}"
    return uris, pdf_only


def _settings_tables(groups: Mapping[str, Sequence[Run]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(settings all runs share, one row per run with the settings that differ between runs)."""
    runs = [run for members in groups.values() for run in members]
    differ = differing_settings(runs)
    first = flat_settings(runs[0].config) if runs else {}
    shared = pd.DataFrame([{"setting": k, "value": v} for k, v in first.items() if k not in differ])
    rows = []
    for label, members in groups.items():
        for run in members:
            flat = flat_settings(run.config)
            rows.append({"group": label, "run": run.name, "seed": flat.get("seed", ""), **{k: flat.get(k, "(missing)") for k in differ}})
    return shared, pd.DataFrame(rows)


def render(content: ReportContent) -> str:
    """The report's HTML text."""
    uris, pdf_only = _embedded_figures(content.figures)
    warnings = list(content.warnings) + [f"figure {name!r} was written as PDF only and is not embedded" for name in pdf_only]
    shared, per_run = _settings_tables(content.groups)
    tables: dict[str, tuple[str, pd.DataFrame]] = {"table-summary": ("Summary (one row per group)", content.summary)}
    comparison = content.tables.get("comparison")
    if comparison is not None and not comparison.empty:
        what = "percentile bootstrap" if content.ci == "bootstrap" else "t (Welch's, or paired t)"
        tables["table-comparison"] = (f"Comparison with the baseline group (95 % {what} interval; p_holm: Holm-adjusted)", comparison)
    for name, frame in content.tables.items():
        if name != "comparison" and frame is not None and not frame.empty:
            tables[f"table-{name}"] = (f"Table: {name}", frame)
    tables["table-runs-settings"] = ("Settings that differ between runs", per_run)
    tables["table-shared-settings"] = ("Settings every run shares", shared)

    n_runs = sum(len(r) for r in content.groups.values())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>gradlens report: {n_runs} {html.escape(content.kind)} run(s)</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>gradlens report: {n_runs} {html.escape(content.kind)} run(s) in {len(content.groups)} group(s)</h1>",
        f'<p class="muted">grouped by {html.escape(content.group_by)} · written {time.strftime("%Y-%m-%d %H:%M:%S")} · '
        f"smoothing for drawing: {'off' if content.smooth <= 1 else f'rolling median over {content.smooth} steps'}</p>",
        '<nav><h2>Contents</h2><ul id="contents">',
    ]
    for table_id, (title, _) in tables.items():
        parts.append(f'<li><a href="#{table_id}">{html.escape(title)}</a></li>')
    for name in uris:
        parts.append(f'<li><a href="#figure-{html.escape(name)}">Figure: {html.escape(name)}</a></li>')
    parts.append("</ul></nav>")
    parts.append("<h2>Warnings</h2>")
    parts += [f'<div class="warn">{html.escape(w)}</div>' for w in warnings] or ['<p class="muted">none</p>']
    parts.append("<h2>Groups</h2><ul>")
    for label, members in content.groups.items():
        parts.append(f"<li><b>{html.escape(label)}</b>: {len(members)} run(s): {html.escape(', '.join(r.name for r in members))}</li>")
    parts.append("</ul>")
    for label, diff in content.grouping.differing.items():
        verb = "were split into the groups above" if content.grouping.split else "were pooled (forced by --group-by)"
        keys = ", ".join(f"{k} ({' | '.join(map(str, v))})" for k, v in diff.items())
        parts.append(f'<div class="warn">runs of {html.escape(label)} differ in {html.escape(keys)} and {verb}</div>')
    for table_id, (title, frame) in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(_table(frame, table_id))
    parts.append("<h2>Figures</h2>")
    for name, uri in uris.items():
        parts.append(
            f'<figure id="figure-{html.escape(name)}"><img alt="{html.escape(name)}" src="{uri}">'
            f"<figcaption>{html.escape(name)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(content: ReportContent, out: Path) -> Path:
    """Write ``out/report.html`` (replacing the one an earlier call wrote there)."""
    path = Path(out) / REPORT
    path.write_text(render(content), encoding="utf-8")
    return path

