"""The ``gradlens`` command: a thin dispatcher over one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
Imports are lazy so ``gradlens --help`` starts fast and ``plot`` never imports
training code. Bare ``gradlens`` prints this help: a training job starts only
when asked for (``gradlens record`` runs the built-in one).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
import warnings

SUBCOMMANDS = {
    "record": ("gradlens.record.command", "train DPO / Balanced-DPO / AdaDPO and record chosen vs rejected gradients"),
    "plot": ("gradlens.plot.command", "summarise and plot one or many runs"),
    "langevin": ("gradlens.langevin.command", "run ULA on a target and track KL(p_k || p*) exactly"),
}
EPILOG = "start here: `gradlens record` runs the built-in job (DPO then Balanced-DPO on tiny-gpt2), then `gradlens plot runs`"


def _version() -> str:
    from . import __version__

    return __version__


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and its subcommand parsers (only the chosen one gets its options)."""
    parser = argparse.ArgumentParser(
        prog="gradlens", description="Gradient dynamics of preference optimisation and Langevin sampling.", epilog=EPILOG
    )
    parser.add_argument("--version", action="version", version=f"gradlens {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parsers = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only import the module that will run
            importlib.import_module(module).add_arguments(p)
        parsers[name] = p
    return parser, parsers


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """One line per warning: what happened, never the Python file and source line that reported it."""
    what = "warning" if issubclass(category, UserWarning) else f"warning ({category.__name__})"
    return f"gradlens: {what}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; warnings print as one line each while it runs."""
    original, thread_hook = warnings.formatwarning, threading.excepthook
    warnings.formatwarning = _format_warning
    threading.excepthook = _thread_error
    try:
        return _main(argv)
    finally:
        warnings.formatwarning, threading.excepthook = original, thread_hook


def _thread_error(args) -> None:
    """An error in a background writer (TensorBoard's) is one line; the command then reports it, naming the file."""
    where = f"{args.exc_value.filename}: " if isinstance(args.exc_value, OSError) and args.exc_value.filename else ""
    print(f"gradlens: error in a background writer: {where}{args.exc_value}", file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser(argv)
    if not argv:
        parser.print_help()
        return 0
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if unknown:
        # The subcommand's usage, not the top level's: that is where the flag was looked for.
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
