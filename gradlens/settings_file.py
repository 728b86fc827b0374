"""Reading the settings file of ``--config`` (``record`` and ``langevin``): TOML,
JSON or YAML.

Only the file format lives here: each command checks the names and types of
the settings against its own options. Every problem is one ValueError naming
the file (and the line, where the parser knows it). YAML is read with
``safe_load``: plain data only, never Python objects.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The top-level table of a .toml, .json, .yaml or .yml file, keys as written."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    data = _parse_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a table/object of settings")
    return data


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)  # safe_load builds plain data only, never Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"{path}: {where}not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc


def _parse_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise ValueError(f"{path}: config files must end in .toml, .json, .yaml or .yml, not {path.suffix or '(no suffix)'!r}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from exc
    if suffix in (".yaml", ".yml"):
        return _parse_yaml(text, path)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message carries the line and column
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
