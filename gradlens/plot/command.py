"""``gradlens plot``: summary tables and figures from one or many run directories.

Finds the runs, checks they are all of one kind, groups them by a config key
(the loss by default), and hands them to that kind's plotter (``registry.py``).
Runs of one group that differ in a setting other than the seed are not pooled:
they are split into groups named by those settings, and the differences are
printed (``--group-by`` forces a grouping, and still names the differences).
Everything goes to one folder (by default ``gradlens-plots/`` beside the runs,
never ``./figures``): figures, CSV/Markdown tables and a self-contained
``report.html``. Problems with single inputs are reported and skipped; the exit
status is non-zero only when nothing could be plotted.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from ..analysis.compare import CI_METHODS
from ..runs import Run, RunFormatError, find_runs, is_run_dir, load_run
from .registry import PlotOptions, get_plotter

FORMATS = ("png", "svg", "pdf")
DEFAULT_RUNS = "runs"
DEFAULT_OUT_NAME = "gradlens-plots"  # created beside the runs; never ./figures, which projects commit
EXIT_NOTHING_PLOTTED = 1
EXIT_USAGE = 2
# --smooth default: raw below SMOOTH_FROM steps; above, a window keeping ~SMOOTH_POINTS medians per line.
SMOOTH_FROM = 1000
SMOOTH_POINTS = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="*", metavar="RUN_OR_DIR",
        help=f"run directories, or directories to search for runs (default: ./{DEFAULT_RUNS})",
    )  # fmt: skip
    parser.add_argument(
        "--out", default=None, metavar="DIR",
        help=f"where figures, tables and report.html go (default: {DEFAULT_OUT_NAME}/ in the folder holding the runs; printed)",
    )  # fmt: skip
    parser.add_argument("--format", default="png", help="comma-separated figure formats: png,svg,pdf (default: png)")
    parser.add_argument(
        "--group-by", default=None, metavar="KEY",
        help="config key that defines a group, dotted keys allowed (default: loss); forces this grouping: runs of a group "
        "are pooled as seeds even when other settings differ (the differences are printed). Without it, such runs are split.",
    )  # fmt: skip
    parser.add_argument(
        "--smooth", type=int, default=None, metavar="N",
        help=f"rolling median over N steps, for drawing only; 0 or 1: off (default: off below {SMOOTH_FROM} steps, "
        f"else steps/{SMOOTH_POINTS}; named in each caption)",
    )  # fmt: skip
    parser.add_argument(
        "--ci", choices=CI_METHODS, default="bootstrap",
        help="interval of the comparison table: percentile bootstrap or t (Welch's; paired t when paired by seed) (default: bootstrap)",
    )  # fmt: skip


# Warnings of this call, for report.html as well as the terminal.
_WARNINGS: list[str] = []


def _error(message: str) -> None:
    print(f"gradlens plot: error: {message}", file=sys.stderr)
    _WARNINGS.append(f"error: {message}")


def _warn(message: str) -> None:
    print(f"gradlens plot: warning: {message}", file=sys.stderr)
    _WARNINGS.append(message)


def default_out(paths: list[str]) -> Path:
    """``gradlens-plots/`` in the folder that holds the runs: the folder searched, or a
    named run's parent; the deepest folder shared by all of them."""
    folders = [Path(p).parent if is_run_dir(p) else Path(p) for p in paths]
    common = Path(os.path.commonpath([str(f.absolute()) for f in folders])) if folders else Path(DEFAULT_RUNS)
    try:
        common = common.relative_to(Path.cwd())
    except ValueError:
        pass
    return common / DEFAULT_OUT_NAME


def default_smooth(runs: list[Run]) -> int:
    """Raw lines for short runs; for long noisy ones a window keeping ~SMOOTH_POINTS medians."""
    longest = max((len(run.steps) for run in runs), default=0)
    return 1 if longest < SMOOTH_FROM else max(1, longest // SMOOTH_POINTS)


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise ValueError(f"--format {text!r}: choose from {','.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(formats))


def collect_runs(paths: list[str]) -> tuple[list[Run], list[str]]:
    """Open every run named or found below ``paths``; problems are returned, not raised."""
    runs, problems, seen = [], [], set()
    for text in paths:
        path = Path(text)
        if not path.exists():
            problems.append(f"{path}: no such file or directory")
            continue
        if not path.is_dir():
            problems.append(f"{path}: not a directory (give a run directory or a folder of runs)")
            continue
        found = find_runs(path)
        if not found:
            problems.append(f"{path}: not a gradlens run and holds no runs (no config.json in it or below it)")
            continue
        for run_path in found:
            key = run_path.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                runs.append(load_run(run_path))
            except RunFormatError as exc:
                problems.append(str(exc))
    return runs, problems


def _read_tables(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """Read every table now, so that format problems and truncated rows are
    reported before any output; drop runs without step rows."""
    kept, problems = [], []
    for run in runs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            problem = _load_tables(run)
        _report_warnings(caught)
        if problem:
            problems.append(problem)
        else:
            kept.append(run)
    return kept, problems


def _load_tables(run: Run) -> str | None:
    try:
        steps = run.steps
        run.layers
        run.evals
    except RunFormatError as exc:
        return str(exc)
    if steps.empty:
        return f"{run.path}: no complete step rows yet; skipped"
    return None


def _mixed_kinds_message(runs: list[Run]) -> str:
    by_kind: dict[str, list[str]] = {}
    for run in runs:
        by_kind.setdefault(run.kind, []).append(str(run.path))
    parts = [f"{kind}: {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}" for kind, paths in sorted(by_kind.items())]
    return "runs of different kinds cannot be plotted together (" + "; ".join(parts) + "); plot each kind in its own call"


def _report_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Tell the user about problems in the data (e.g. a truncated last line); re-emit the rest."""
    shown = set()
    for w in caught:
        if issubclass(w.category, UserWarning):
            text = str(w.message)
            if text not in shown:
                shown.add(text)
                _warn(text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_out(out: Path) -> None:
    """``--out`` never is, contains or lies inside a run directory: plot never writes into a run."""
    absolute = Path(os.path.abspath(out))
    for place in (absolute, *absolute.parents):
        if is_run_dir(place):
            where = "is" if place == absolute else f"lies inside the run {place}, which"
            raise ValueError(f"--out {out}: {where} a gradlens run directory; plot writes only outside runs (e.g. --out plots)")
    if absolute.exists() and not absolute.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if absolute.is_dir():
        inside = find_runs(absolute)
        if inside:
            raise ValueError(f"--out {out}: holds gradlens run(s) ({inside[0]}{' ...' if len(inside) > 1 else ''}); plot writes only outside runs")


def main(args: argparse.Namespace) -> int:
    _WARNINGS.clear()
    paths = list(args.paths) or [DEFAULT_RUNS]
    out = Path(args.out) if args.out else default_out(paths)
    try:
        formats = parse_formats(args.format)
        check_out(out)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if args.smooth is not None and args.smooth < 0:
        _error(f"--smooth {args.smooth}: must be a whole number >= 0 (0 or 1: no smoothing)")
        return EXIT_USAGE
    if not args.paths and not Path(DEFAULT_RUNS).is_dir():
        _error(f"no ./{DEFAULT_RUNS} directory here; record runs with `gradlens record` or pass run directories")
        return EXIT_NOTHING_PLOTTED

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            return _plot(paths, formats, out, args)
    finally:
        _report_warnings(caught)


def _group(readable: list[Run], plotter, args: argparse.Namespace):
    """(groups, group_by, Grouping): the plotter's default key split on differing
    settings, or the --group-by key pooled as asked; differences are always printed."""
    from ..analysis.groups import Grouping, describe_differences, group_runs, keep_pairs_apart, split_by_settings

    group_by = args.group_by or plotter.default_group_by
    groups = group_runs(readable, group_by)
    if args.group_by:
        split = split_by_settings(groups, key=group_by, within=plotter.split_within)
        grouping = Grouping(groups, split.differing, split=False)
        for line in describe_differences(grouping.differing):
            _warn(f"--group-by {group_by} pools runs whose settings differ (not only the seed): {line}")
    else:
        grouping = split_by_settings(groups, key=group_by, within=plotter.split_within)
        for line in describe_differences(grouping.differing):
            _warn(f"runs of group {line.split(':', 1)[0]!r} differ in settings other than the seed, so they are "
                  f"plotted as separate groups (pass --group-by {group_by} to pool them):{line.split(':', 1)[1]}")
    grouping.groups, apart = keep_pairs_apart(grouping.groups)
    for label in apart:
        _warn(f"runs of group {label!r} split different pairs of groups (e.g. chosen/rejected and positive/negative); "
              "they are never pooled, and are plotted as separate groups")
    return grouping.groups, group_by, grouping


def _print_comparison(comparison, ci: str) -> None:
    what = "95% percentile-bootstrap interval" if ci == "bootstrap" else "95% t interval (Welch's, or paired t)"
    print(f"\nDifference from the baseline group (mean over seeds; {what}; p_holm: Holm-adjusted over this table):")
    paired = comparison.drop_duplicates("group")
    for _, row in paired.iterrows():
        how = "paired by seed (both groups hold the same seeds)" if row["paired"] else "unpaired (the groups hold different seeds)"
        print(f"  {row['group']} vs {row['baseline']}: {how}")
    preferred = ["group", "metric", "diff", "ci_low", "ci_high", "p_holm", "n_group", "n_baseline", "ci_note"]
    shown = comparison[[c for c in preferred if c in comparison.columns]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _plot(paths: list[str], formats: list[str], out: Path, args: argparse.Namespace) -> int:
    runs, problems = collect_runs(paths)
    readable, read_problems = _read_tables(runs)
    for problem in problems + read_problems:
        _error(problem)
    if not readable:
        _error("nothing to plot")
        return EXIT_NOTHING_PLOTTED
    kinds = {run.kind for run in readable}
    if len(kinds) > 1:
        _error(_mixed_kinds_message(readable))
        return EXIT_NOTHING_PLOTTED
    kind = kinds.pop()
    try:
        plotter = get_plotter(kind)
    except (ValueError, ImportError) as exc:
        _error(f"cannot plot runs of kind {kind!r}: {exc}")
        return EXIT_NOTHING_PLOTTED

    from .html import ReportContent, write_report
    from .report import terminal_table, write_table

    try:
        groups, group_by, grouping = _group(readable, plotter, args)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_NOTHING_PLOTTED
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _error(f"--out {out}: cannot create it: {exc.strerror or exc}")
        return EXIT_USAGE
    smooth = default_smooth(readable) if args.smooth is None else max(args.smooth, 1)
    options = PlotOptions(out=out, formats=formats, smooth=smooth, group_by=group_by, ci=args.ci)

    try:
        summary = plotter.summarize(groups, options)
    except ValueError as exc:
        _error(f"cannot summarise these runs: {exc}")
        return EXIT_NOTHING_PLOTTED
    # Plotters may attach more tables and the columns worth printing (see preference.py).
    extra = summary.attrs.pop("tables", {})
    shown_columns = summary.attrs.pop("terminal_columns", None) or list(summary.columns)
    written = write_table(summary, out, "summary")
    print(f"{len(readable)} {kind} run(s) in {len(groups)} group(s), grouped by {group_by!r}\n")
    if not summary.empty:
        print(terminal_table(summary[shown_columns], shown_columns[0]))
        print(f"(all columns: {out / 'summary.csv'})")
    comparison = extra.get("comparison")
    if comparison is not None and not comparison.empty:
        _print_comparison(comparison, args.ci)
    for name, table in extra.items():
        if table is not None and not table.empty:
            written += write_table(table, out, name)

    figures = plotter.figures(groups, options)
    content = ReportContent(
        kind=kind, group_by=group_by, groups=groups, grouping=grouping, summary=summary, tables=extra,
        figures=figures, warnings=list(_WARNINGS), smooth=smooth, ci=args.ci,
    )  # fmt: skip
    report = write_report(content, out)
    print(f"\nwrote {len(figures)} figure file(s), {len(written)} table file(s) and the report to {out}/")
    print(f"  report: {report}")
    for path in figures + written:
        print(f"  {path}")
    if not figures and summary.empty:
        _error("no figure or summary could be made from these runs")
        return EXIT_NOTHING_PLOTTED
    return 0
