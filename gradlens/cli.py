"""The ``gradlens`` command: a thin dispatcher over one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
Imports are lazy so ``gradlens --help`` starts fast and ``plot`` never imports
training code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "record": ("gradlens.record.command", "train DPO / Balanced-DPO / AdaDPO and record chosen vs rejected gradients"),
    "plot": ("gradlens.plot.command", "summarise and plot one or many runs"),
    "langevin": ("gradlens.langevin.command", "run ULA on a target and track KL(p_k || p*) exactly"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradlens", description="Gradient dynamics of preference optimisation and Langevin sampling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only import the module that will run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["record"]  # the built-in default job
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
