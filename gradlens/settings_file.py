"""Reading the TOML or JSON settings file of ``--config`` (``record`` and ``langevin``).

Only the file format lives here: each command checks the names and types of
the settings against its own options. Every problem is one ValueError naming
the file (and the line, where the parser knows it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The top-level table of a .toml or .json file; keys with ``-`` become ``_``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ValueError(f"{path}: config files must end in .toml or .json, not {path.suffix or '(no suffix)'!r}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from exc
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # its message carries the line and column
            raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a table/object of settings")
    return {str(key).replace("-", "_"): value for key, value in data.items()}
