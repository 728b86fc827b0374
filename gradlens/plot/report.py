"""Summary tables: printed to the terminal and written as CSV and Markdown."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd


def format_cell(value) -> str:
    """Integers as integers, floats to 4 significant digits, NaN as ``nan``."""
    if value is None:
        return ""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(format_cell(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(frame: pd.DataFrame, out: Path, name: str) -> list[Path]:
    """``out/name.csv`` (full precision) and ``out/name.md``."""
    csv_path, md_path = Path(out) / f"{name}.csv", Path(out) / f"{name}.md"
    frame.to_csv(csv_path, index=False)
    md_path.write_text(to_markdown(frame), encoding="utf-8")
    return [csv_path, md_path]


def terminal_table(frame: pd.DataFrame, key: str) -> str:
    """One column per row of ``frame`` (named by ``key``), one line per metric:
    a summary with many metrics and few groups stays readable in a terminal."""
    cells = {str(row[key]): [format_cell(row[c]) for c in frame.columns if c != key] for _, row in frame.iterrows()}
    metrics = [c for c in frame.columns if c != key]
    table = pd.DataFrame(cells, index=metrics)
    return table.to_string()
