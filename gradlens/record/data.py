"""User preference files: JSONL, CSV or Parquet in TRL's standard or conversational format.

Standard: ``{"prompt": str, "chosen": str, "rejected": str}``.
Conversational: the same keys, each a list of ``{"role": str, "content": str}``
messages (``chosen``/``rejected`` hold the assistant turn(s)). CSV holds the
standard format only.

Every problem is reported with the file, the line (JSONL, CSV) or row (Parquet,
1-based) and what is wrong; up to ``MAX_REPORTED`` problems are listed at once.
Pairs whose chosen equals rejected carry no preference signal: they are skipped
with a warning that gives the count and where they are.
"""

from __future__ import annotations

import csv
import io
import json
import math
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

FIELDS = ("prompt", "chosen", "rejected")
SUFFIXES = (".jsonl", ".csv", ".parquet")
MAX_REPORTED = 10

Text = str | list  # a string, or a list of {role, content} messages


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: Text
    chosen: Text
    rejected: Text
    where: str  # "line 12" / "row 3": where the pair is in its file


@dataclass(frozen=True)
class PreferenceData:
    path: Path
    records: list[PreferenceRecord]
    conversational: bool
    skipped_identical: int


class _Problems:
    """Collects problems so the user can fix several at once."""

    def __init__(self, path: Path):
        self.path = path
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.items.append(f"{self.path}: {where}: {problem}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_REPORTED]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        header = "" if len(self.items) == 1 else f"{len(self.items)} problems in {self.path}:\n  "
        raise ValueError(header + "\n  ".join(shown) + tail)


def _decode(raw: bytes, path: Path, where_of_offset) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise ValueError(f"{path}: {where_of_offset(exc.start)}: bytes are not valid UTF-8 (byte 0x{bad}); save the file as UTF-8") from exc


def _line_of(raw: bytes, offset: int) -> str:
    newline = b"\n"
    return f"line {raw.count(newline, 0, offset) + 1}"


def _iter_jsonl(path: Path, problems: _Problems) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"line {number}"
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            problems.add(where, f"bytes are not valid UTF-8 (byte 0x{line[exc.start:exc.start + 1].hex()} at column {exc.start + 1})")
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.add(where, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except RecursionError:
            problems.add(where, "not usable JSON (nested too deeply)")
            continue
        except ValueError as exc:  # e.g. an integer longer than Python converts (4300 digits)
            problems.add(where, f"not usable JSON ({exc})")
            continue
        yield where, value


def _iter_csv(path: Path, problems: _Problems) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    text = _decode(raw, path, lambda offset: _line_of(raw, offset))
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a long prompt is a valid field; restored below
    try:
        yield from _csv_rows(path, text, problems)
    except csv.Error as exc:  # e.g. a NUL byte
        raise ValueError(f"{path}: not a readable CSV file: {exc}") from None
    finally:
        csv.field_size_limit(limit)


def _csv_rows(path: Path, text: str, problems: _Problems) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    missing = [name for name in ("chosen", "rejected", "prompt") if name not in header]
    if missing:
        raise ValueError(f"{path}: line 1 (header): missing column(s) {missing}; the header must name prompt, chosen and rejected (found {header})")
    index = {name: header.index(name) for name in FIELDS}
    line_before = reader.line_num
    for cells in reader:
        where = f"line {line_before + 1}"
        line_before = reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            problems.add(where, f"has {len(cells)} cells but the header has {len(header)}")
            continue
        yield where, {name: cells[i] for name, i in index.items()}


def _iter_parquet(path: Path, problems: _Problems) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'gradlens[parquet]')") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: not a readable Parquet file: {exc}") from exc
    missing = [name for name in ("chosen", "rejected", "prompt") if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {table.column_names}")
    for number, row in enumerate(table.select(list(FIELDS)).to_pylist(), start=1):
        yield f"row {number}", row


_READERS = {".jsonl": _iter_jsonl, ".csv": _iter_csv, ".parquet": _iter_parquet}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_value(name: str, value: Any) -> tuple[Text | None, str | None, str | None]:
    """-> (value, format 'standard'/'conversational', problem)."""
    if isinstance(value, bytes):  # binary Parquet columns
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, None, f"'{name}' bytes are not valid UTF-8 (byte 0x{value[exc.start:exc.start + 1].hex()})"
    if isinstance(value, str):
        if not value.strip():
            return None, None, f"'{name}' is an empty string"
        if not _is_utf8(value):
            return None, None, f"'{name}' holds an unpaired surrogate (such as \\ud800), which is not text"
        return value, "standard", None
    if isinstance(value, list):
        if not value:
            return None, None, f"'{name}' is an empty list of messages"
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                return None, None, f"'{name}' message {i} is not a {{'role': str, 'content': str}} object (got {message!r:.80})"
        if not all(_is_utf8(m["role"]) and _is_utf8(m["content"]) for m in value):
            return None, None, f"'{name}' messages hold an unpaired surrogate (such as \\ud800), which is not text"
        if not any(m["content"].strip() for m in value):
            return None, None, f"'{name}' messages have only empty content"
        return [{"role": m["role"], "content": m["content"]} for m in value], "conversational", None
    kind = "null" if _is_missing(value) else type(value).__name__
    return None, None, (
        f"'{name}' has the wrong type ({kind}); expected a string (standard format) "
        "or a list of {'role', 'content'} messages (conversational format)"
    )


def _check_record(obj: Any, nulls_are_missing: bool) -> tuple[dict | None, str | None, str | None]:
    """-> (values, 'standard' | 'conversational', problem)."""
    if not isinstance(obj, dict):
        return None, None, f"expected an object with {list(FIELDS)}, got {type(obj).__name__}"
    absent = [name for name in FIELDS if name not in obj or (nulls_are_missing and _is_missing(obj[name]))]
    if absent:
        return None, None, f"missing {' and '.join(repr(a) for a in absent)} field{'s' if len(absent) > 1 else ''}"
    values, found = {}, set()
    for name in FIELDS:
        value, fmt, problem = _check_value(name, obj[name])
        if problem:
            return None, None, problem
        values[name] = value
        found.add(fmt)
    if len(found) > 1:
        return None, None, "mixes strings and message lists; use one format (standard or conversational) for prompt, chosen and rejected"
    return values, found.pop(), None


def load_preferences(path: str | Path) -> PreferenceData:
    """Read and validate a preference file; see the module docstring."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        broken = " (a link to a missing file)" if path.is_symlink() else ""
        raise ValueError(f"{path}: preference data file not found{broken}") from None
    except OSError as exc:  # ELOOP: a symbolic link loop; EACCES
        raise ValueError(f"{path}: cannot be opened: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path}: is a directory; --data takes a .jsonl, .csv or .parquet file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: not a regular file (a pipe, socket or device); --data takes a .jsonl, .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ValueError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; use one of {list(SUFFIXES)}")
    problems = _Problems(path)
    records: list[PreferenceRecord] = []
    identical: list[str] = []
    first_of_format: dict[str, str] = {}  # 'standard'/'conversational' -> where first seen
    try:
        for where, obj in _READERS[suffix](path, problems):
            # JSON null is a value of the wrong type; CSV/Parquet have no other way to say "missing".
            values, fmt, problem = _check_record(obj, nulls_are_missing=suffix != ".jsonl")
            if problem is None and first_of_format and fmt not in first_of_format:
                other, other_where = next(iter(first_of_format.items()))
                problem = f"uses the {fmt} format but {other_where} uses the {other} format; one file must use one format"
            if problem is not None:
                problems.add(where, problem)
                continue
            first_of_format.setdefault(fmt, where)
            if values["chosen"] == values["rejected"]:
                identical.append(where)
                continue
            records.append(PreferenceRecord(values["prompt"], values["chosen"], values["rejected"], where))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    problems.raise_if_any()
    if identical:
        shown = ", ".join(identical[:5]) + (", ..." if len(identical) > 5 else "")
        warnings.warn(f"{path}: skipped {len(identical)} pair(s) whose chosen equals rejected ({shown})", UserWarning, stacklevel=2)
    if not records:
        reason = f"{len(identical)} had chosen equal to rejected" if identical else "the file is empty"
        raise ValueError(f"{path}: no usable preference pairs ({reason})")
    return PreferenceData(path, records, conversational="conversational" in first_of_format, skipped_identical=len(identical))
