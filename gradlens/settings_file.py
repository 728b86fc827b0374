"""Reading the settings file of ``--config`` (``record`` and ``langevin``): TOML,
JSON or YAML.

Only the file format lives here: each command checks the names and types of
the settings against its own options. Every problem is one ValueError naming
the file (and the line, where the parser knows it). YAML is read with
``safe_load``'s constructor: plain data only, never Python objects.

What no command can use is refused here, for every format, before any value
reaches a command (whose messages may show it): nesting deeper than
``MAX_DEPTH``, YAML aliases that would expand to more than ``MAX_YAML_NODES``
values (a "billion laughs" file), whole numbers beyond 64 bits, and strings
with a NUL character or an unpaired surrogate. Messages show at most
``SHOWN_CHARS`` characters of a value (``shown``), never a value whole.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

MAX_DEPTH = 32            # tables within tables; no setting nests more than a few levels
MAX_YAML_NODES = 100_000  # values a YAML file may expand to through its aliases
MAX_INT = 2**63           # no setting takes a whole number of more than 64 bits
SHOWN_CHARS = 60
# Settings that name files or directories: a leading ~ means the home directory, as it does in
# a shell (which expands it in flags, but never inside a file).
PATH_SETTINGS = frozenset({"out", "data", "model", "eval_data", "mean", "cov", "init_mean", "init_cov", "output_dir", "logging_dir"})


def shown(value: Any) -> str:
    """``repr(value)`` cut to SHOWN_CHARS characters, for messages (values of checked depth and size only)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The top-level table of a .toml, .json, .yaml or .yml file, keys as written."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    data = _parse_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a table/object of settings")
    _check_values(data, path)
    return {key: _expand_home(key, value) for key, value in data.items()}


def _expand_home(key: Any, value: Any) -> Any:
    if str(key).replace("-", "_") in PATH_SETTINGS and isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    return value


def _check_values(data: dict, path: Path) -> None:
    """Refuse deep nesting, huge integers, NUL and unpaired surrogates, naming the setting.

    Iterative (an explicit stack), so no nesting can exhaust Python's recursion limit.
    """
    stack: list[tuple[str, Any, int]] = [(str(k), v, 1) for k, v in data.items()]
    while stack:
        name, value, depth = stack.pop()
        where = f"{path}: setting {shown(name)}"
        if depth > MAX_DEPTH:
            raise ValueError(f"{where}: nested more than {MAX_DEPTH} levels deep; no setting nests like this")
        if isinstance(value, dict):
            stack.extend((f"{name}.{k}", v, depth + 1) for k, v in value.items())
            for key in value:
                _check_text(str(key), f"{path}: a key in setting {shown(name)}")
        elif isinstance(value, list):
            stack.extend((f"{name}[{i}]", v, depth + 1) for i, v in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_INT:
            raise ValueError(f"{where}: a whole number of {len(str(abs(value)))} digits; no setting takes one beyond 64 bits")
        elif isinstance(value, str):
            _check_text(value, where)
    for key in data:
        _check_text(str(key), f"{path}: a setting name")


def _check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise ValueError(f"{where}: holds a NUL character (\\x00), which no path or name may contain")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where}: holds an unpaired surrogate ({text[exc.start]!r} at character {exc.start}), which is not text") from None


def _expanded_size(root) -> int:
    """How many values the node graph ``root`` holds once every alias is expanded.

    An alias shares its anchor's node, so a 600-byte file can describe 10^9 values;
    sizes are memoised per node, so this costs one visit per distinct node.
    """
    import yaml

    size: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if children_done:
            size[id(node)] = 1 + sum(size.get(id(c), MAX_YAML_NODES) for c in children)
            if size[id(node)] > MAX_YAML_NODES:
                return size[id(node)]
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
    return size.get(id(root), 0)


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml

    loader = yaml.SafeLoader(text)  # plain data only, never Python objects
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node) > MAX_YAML_NODES:
            raise ValueError(
                f"{path}: its aliases (*name) expand to more than {MAX_YAML_NODES:,} values; refused (no settings file needs that many)"
            )
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"{path}: {where}not valid YAML: {getattr(exc, 'problem', None) or shown(str(exc))}") from None
    finally:
        loader.dispose()


def _parse_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise ValueError(f"{path}: config files must end in .toml, .json, .yaml or .yml, not {path.suffix or '(no suffix)'!r}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        return _parse_text(text, suffix, path)
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to read (settings nest at most {MAX_DEPTH} levels)") from None


def _parse_text(text: str, suffix: str, path: Path) -> Any:
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise ValueError(f"{path}: not usable JSON: {str(exc)[:100]}") from None
    if suffix in (".yaml", ".yml"):
        return _parse_yaml(text, path)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message carries the line and column
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
