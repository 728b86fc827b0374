"""`gradlens fetch NAME`: download, verify and cache a registered pretrained model (see ``gradlens.pretrained.fetch``)."""

from __future__ import annotations

import argparse
import sys

from .fetch import cache_root, fetch
from .sources import SOURCES, get_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = f"the cache is {cache_root()} (GRADLENS_CACHE or XDG_CACHE_HOME moves it)"
    parser.add_argument("name", choices=sorted(SOURCES), help="; ".join(f"{s.name}: {s.description}" for s in SOURCES.values()))


def main(args: argparse.Namespace) -> int:
    try:
        fetch(get_source(args.name), log=lambda line: print(line, file=sys.stderr))
    except ValueError as exc:
        print(f"gradlens fetch: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a read-only cache directory
        print(f"gradlens fetch: error: {getattr(exc, 'filename', None) or cache_root()}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
