"""``gradlens plot``: summary tables and figures from one or many run directories.

Finds the runs, groups them by a config key (the loss by default), and hands
them to their kind's plotter (``registry.py``); runs of several kinds (preference
and Langevin) are plotted kind by kind, each in its own folder ``OUT/KIND/``.
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
from ..runs import Run, RunFormatError, find_runs, is_run_dir, load_run, run_status, schema
from ..runs.run_dir import missing_folders, remove_empty_folders
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
                str(run_path).encode("utf-8")
            except UnicodeEncodeError:  # bytes of another encoding: every table, figure and report names the run
                shown = os.fsencode(run_path).decode("utf-8", errors="backslashreplace")
                problems.append(f"{shown}: the run's path is not valid UTF-8, so it cannot be named in tables and the report; "
                                "rename it (e.g. mv with a UTF-8 name) to plot it")
                continue
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
        run.summary  # read now: whether a run has ended decides whether it is compared
    except RunFormatError as exc:
        return str(exc)
    if steps.empty:
        return f"{run.path}: no complete step rows yet; skipped"
    return None


def _leave_out_unfinished(runs: list[Run]) -> list[Run]:
    """Runs still going or killed (no summary.json) are left out when other runs have ended:
    their last values are from fewer steps, and pooled with finished runs they would be
    averaged as if they were comparable. Without any finished run, all are kept, and said so."""
    unfinished = [run for run in runs if run_status(run.path) is None]
    if not unfinished:
        return runs
    described = "; ".join(f"{run.path} ({_steps_logged(run)})" for run in unfinished[:5]) + (" ..." if len(unfinished) > 5 else "")
    if len(unfinished) == len(runs):
        _warn(f"no run here has finished (no summary.json: still running, or killed): {described}; each is summarised "
              "at its last logged step, so compare them with care")
        return runs
    _warn(f"left out {len(unfinished)} run(s) that have not finished (no summary.json: still running, or killed), "
          f"so that only finished runs are compared: {described}; plot them on their own to see them")
    return [run for run in runs if run not in unfinished]


def _steps_logged(run: Run) -> str:
    steps = run.steps
    last = int(steps[schema.STEP].iloc[-1]) if schema.STEP in steps.columns and len(steps) else None
    asked = run.config.get("steps")
    return f"{len(steps)} step rows" + (f", last step {last}" if last is not None else "") + (f", of {asked} asked for" if isinstance(asked, int) else "")


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
    """``--out`` never is, contains or lies inside a run directory: plot never writes into a run.

    The path is resolved first (``realpath``): a link to a run, or a path through one, is a run too.
    """
    absolute = Path(os.path.realpath(out))
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
    from ..analysis.groups import Grouping, describe_differences, group_runs, keep_pairs_apart, one_run_per_seed, split_by_settings

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
    grouping.groups, repeated = one_run_per_seed(grouping.groups)
    for label, pairs in repeated.items():
        for kept, left_out in pairs:
            _warn(f"group {label!r}: {left_out.path} repeats seed {kept.config.get('seed')!r} of {kept.path}; copies of one "
                  "seed are not independent seeds, so each seed is counted once and the repeat is left out")
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
    by_kind: dict[str, list[Run]] = {}
    for run in readable:
        by_kind.setdefault(run.kind, []).append(run)
    if len(by_kind) == 1:
        kind, runs_of_kind = by_kind.popitem()
        return _plot_kind(kind, runs_of_kind, formats, out, args)
    # Runs of different kinds share no figure or metric: each kind gets its own folder and report.
    print(f"runs of {len(by_kind)} kinds ({', '.join(sorted(by_kind))}): each kind is plotted in its own folder of {out}/")
    codes = []
    for kind, runs_of_kind in sorted(by_kind.items()):
        print(f"\n=== {kind}: {out / kind}/")
        codes.append(_plot_kind(kind, runs_of_kind, formats, out / kind, args))
    return 0 if 0 in codes else EXIT_NOTHING_PLOTTED


def _plot_kind(kind: str, readable: list[Run], formats: list[str], out: Path, args: argparse.Namespace) -> int:
    """Summary, tables, figures and report.html of runs of one kind, in ``out``."""
    readable = _leave_out_unfinished(readable)
    try:
        plotter = get_plotter(kind)
    except (ValueError, ImportError) as exc:
        _error(f"cannot plot runs of kind {kind!r}: {exc}")
        return EXIT_NOTHING_PLOTTED
    try:
        groups, group_by, grouping = _group(readable, plotter, args)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_NOTHING_PLOTTED
    smooth = default_smooth(readable) if args.smooth is None else max(args.smooth, 1)
    options = PlotOptions(out=out, formats=formats, smooth=smooth, group_by=group_by, ci=args.ci)
    made = missing_folders(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _error(f"--out {out}: cannot create it: {exc.strerror or exc}")
        return EXIT_USAGE
    code = EXIT_NOTHING_PLOTTED
    try:
        code = _write_outputs(kind, plotter, grouping, options)
        return code
    finally:
        if code != 0:  # nothing plotted: the folders this call created go again, if still empty
            remove_empty_folders(made)


def _write_outputs(kind: str, plotter, grouping, options: PlotOptions) -> int:
    """The summary, tables, figures and report.html of ``grouping.groups`` in ``options.out``; the exit status."""
    from .html import ReportContent, write_report
    from .report import terminal_table, write_table

    groups, group_by, out = grouping.groups, options.group_by, options.out
    try:
        summary = plotter.summarize(groups, options)
    except ValueError as exc:
        _error(f"cannot summarise these runs: {exc}")
        return EXIT_NOTHING_PLOTTED
    # Plotters may attach more tables and the columns worth printing (see preference.py).
    extra = summary.attrs.pop("tables", {})
    shown_columns = summary.attrs.pop("terminal_columns", None) or list(summary.columns)
    written = write_table(summary, out, "summary")
    print(f"{sum(len(runs) for runs in groups.values())} {kind} run(s) in {len(groups)} group(s), grouped by {group_by!r}\n")
    if not summary.empty:
        print(terminal_table(summary[shown_columns], shown_columns[0]))
        print(f"(all columns: {out / 'summary.csv'})")
    comparison = extra.get("comparison")
    if comparison is not None and not comparison.empty:
        _print_comparison(comparison, options.ci)
    for name, table in extra.items():
        if table is not None and not table.empty:
            written += write_table(table, out, name)

    figures = plotter.figures(groups, options)
    content = ReportContent(
        kind=kind, group_by=group_by, groups=groups, grouping=grouping, summary=summary, tables=extra,
        figures=figures, warnings=list(_WARNINGS), smooth=options.smooth, ci=options.ci,
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
