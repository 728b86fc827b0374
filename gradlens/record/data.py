"""User preference data: JSONL, CSV, Parquet or a saved ``datasets`` directory, in TRL's formats.

Standard: ``{"prompt": str, "chosen": str, "rejected": str}``.
Conversational: the same keys, each a list of ``{"role": str, "content": str}``
messages (``chosen``/``rejected`` hold the assistant turn(s)). CSV holds the
standard format only.
Implicit prompt: only ``chosen`` and ``rejected``, both starting with the same
prompt; the shared prefix is split off exactly as TRL's ``extract_prompt`` does
(``maybe_extract_prompt`` also applies it when the prompt is a string but the
completions are message lists).
Other column names are mapped with ``Columns`` (``--prompt-column`` and friends).
A directory written by ``Dataset.save_to_disk`` (or a ``DatasetDict``'s, whose
``train`` split is used) is read with ``datasets.load_from_disk``.

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
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write into their directory.
DATASET_MARKERS = ("state.json", "dataset_dict.json")
DATASET_SPLIT = "train"

Text = str | list  # a string, or a list of {role, content} messages


@dataclass(frozen=True)
class Columns:
    """Which column of the file holds the prompt, the chosen and the rejected response."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    def of(self, field: str) -> str:
        return getattr(self, field)

    def select(self, obj: dict) -> dict:
        """The record under gradlens's field names (columns the file lacks stay absent)."""
        return {field: obj[self.of(field)] for field in FIELDS if self.of(field) in obj}


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
    implicit_prompts: int = 0  # pairs whose prompt was split off chosen/rejected (TRL's extract_prompt)


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


def _iter_csv(path: Path, problems: _Problems, columns: Columns) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    text = _decode(raw, path, lambda offset: _line_of(raw, offset))
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a long prompt is a valid field; restored below
    try:
        yield from _csv_rows(path, text, problems, columns)
    except csv.Error as exc:  # e.g. a NUL byte
        raise ValueError(f"{path}: not a readable CSV file: {exc}") from None
    finally:
        csv.field_size_limit(limit)


def _csv_rows(path: Path, text: str, problems: _Problems, columns: Columns) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    missing = [columns.of(name) for name in ("chosen", "rejected") if columns.of(name) not in header]
    if missing:
        raise ValueError(
            f"{path}: line 1 (header): missing column(s) {missing}; the header must name the chosen and rejected "
            f"columns, and the prompt column unless the prompt is implicit (found {header})"
        )
    index = {columns.of(name): header.index(columns.of(name)) for name in FIELDS if columns.of(name) in header}
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


def _iter_parquet(path: Path, problems: _Problems, columns: Columns) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'gradlens[parquet]')") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: not a readable Parquet file: {exc}") from exc
    wanted = _present_columns(path, table.column_names, columns)
    for number, row in enumerate(table.select(wanted).to_pylist(), start=1):
        yield f"row {number}", row


def _present_columns(path: Path, found: list[str], columns: Columns) -> list[str]:
    """The file's columns gradlens reads; chosen and rejected must be among them, the prompt may be implicit."""
    missing = [columns.of(name) for name in ("chosen", "rejected") if columns.of(name) not in found]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {found}")
    return [columns.of(name) for name in FIELDS if columns.of(name) in found]


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / marker).is_file() for marker in DATASET_MARKERS)


def _iter_saved_dataset(path: Path, problems: _Problems, columns: Columns) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"{path}: reading a saved dataset directory needs the datasets package (pip install datasets)") from exc
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for damaged directories
        raise ValueError(f"{path}: not a readable saved dataset (datasets.load_from_disk failed: {exc})") from exc
    if isinstance(data, datasets.DatasetDict):
        if DATASET_SPLIT not in data:
            raise ValueError(f"{path}: a DatasetDict without a {DATASET_SPLIT!r} split (splits: {sorted(data)}); save the split to use")
        data = data[DATASET_SPLIT]
    wanted = _present_columns(path, list(data.column_names), columns)
    for number, row in enumerate(data.select_columns(wanted), start=1):
        yield f"row {number}", row


_READERS = {".jsonl": lambda path, problems, columns: _iter_jsonl(path, problems), ".csv": _iter_csv, ".parquet": _iter_parquet}


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
    if isinstance(value, float) and not math.isfinite(value):  # JSON's non-standard NaN / Infinity: a number, not a null
        kind = f"the number {value!r} ({'NaN' if math.isnan(value) else 'Infinity'} in the file)"
    else:
        kind = "null" if value is None else type(value).__name__
    return None, None, (
        f"'{name}' has the wrong type ({kind}); expected a string (standard format) "
        "or a list of {'role', 'content'} messages (conversational format)"
    )


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """(prompt, chosen, rejected) from an implicit-prompt pair, exactly as TRL 1.16's ``extract_prompt``:
    the longest common prefix (of characters, or of messages) is the prompt, except that a space
    just before the first difference stays with the completions."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # TRL: remove the space before the completion from the prompt
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _split_implicit(values: dict, columns: Columns) -> tuple[dict | None, str | None]:
    """Split the shared prompt off chosen and rejected; a problem if they share none."""
    chosen, rejected = values["chosen"], values["rejected"]
    if chosen == rejected:  # no preference signal; skipped (and counted) by the caller
        return {"prompt": chosen, "chosen": chosen, "rejected": rejected}, None
    if chosen[0] != rejected[0]:
        return None, (
            f"no {columns.prompt!r} field, and {columns.chosen!r} and {columns.rejected!r} do not start with a shared "
            "prompt (TRL's implicit-prompt format); add the prompt column or name it with --prompt-column"
        )
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    out = {}
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        value, _, problem = _check_value(columns.of(name), value)
        if problem:
            return None, f"after splitting off the shared prompt (TRL's implicit-prompt format): {problem}"
        out[name] = value
    return out, None


def _check_record(obj: Any, nulls_are_missing: bool, columns: Columns = Columns()) -> tuple[dict | None, str | None, str | None, bool]:
    """-> (values, 'standard' | 'conversational', problem, implicit prompt)."""
    if not isinstance(obj, dict):
        return None, None, f"expected an object with {[columns.of(n) for n in FIELDS]}, got {type(obj).__name__}", False
    obj = columns.select(obj)
    missing = lambda name: name not in obj or (nulls_are_missing and _is_missing(obj[name]))  # noqa: E731
    absent = [columns.of(name) for name in ("chosen", "rejected") if missing(name)]
    if absent:
        return None, None, f"missing {' and '.join(repr(a) for a in absent)} field{'s' if len(absent) > 1 else ''}", False
    names = ("chosen", "rejected") if missing("prompt") else FIELDS
    values, found = {}, {}
    for name in names:
        value, fmt, problem = _check_value(columns.of(name), obj[name])
        if problem:
            return None, None, problem, False
        values[name] = value
        found[name] = fmt
    # TRL's maybe_extract_prompt: a string prompt beside message-list completions is not the prompt.
    implicit = "prompt" not in values or (found["prompt"] == "standard" and found["chosen"] == "conversational")
    if len(set(found[n] for n in ("chosen", "rejected"))) > 1 or (not implicit and len(set(found.values())) > 1):
        return None, None, "mixes strings and message lists; use one format (standard or conversational) for prompt, chosen and rejected", False
    if implicit:
        values, problem = _split_implicit(values, columns)
        if problem:
            return None, None, problem, True
    return values, found["chosen"], None, implicit


def _reader(path: Path):
    """The row iterator for ``path`` and whether a null means "missing" there."""
    if is_saved_dataset(path):
        return _iter_saved_dataset, True
    if path.is_dir():
        raise ValueError(
            f"{path}: is a directory but not a saved dataset (no {' or '.join(DATASET_MARKERS)}); --data takes a "
            ".jsonl, .csv or .parquet file or a directory written by Dataset.save_to_disk"
        )
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ValueError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; use one of {list(SUFFIXES)} or a saved dataset directory")
    # JSON null is a value of the wrong type; CSV/Parquet have no other way to say "missing".
    return _READERS[suffix], suffix != ".jsonl"


def hub_hint(path: Path, *, where: str) -> None:
    """A Hub data set's name where a local path belongs: say how to save it once (gradlens never downloads)."""
    if path.exists() or path.suffix or path.is_absolute() or len(path.parts) != 2:
        return
    raise ValueError(
        f"{where} {str(path)!r} is not a local file or directory. It looks like a Hugging Face Hub data set; gradlens "
        f"never downloads. Save it once with: python -c \"from datasets import load_dataset; "
        f"load_dataset('{path.as_posix()}', split='train').save_to_disk('prefs')\" and give prefs instead"
    )


# config.json: the SHA-256 of each data file a run read ({"data": hex, "eval_data": hex}), so that
# --resume can refuse a file edited in place (same path, other pairs).
FINGERPRINT_KEY = "data_sha256"


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a data file, or of a saved dataset folder (its files' relative names and bytes, in order)."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode("utf-8", "surrogateescape") + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def data_fingerprints(files: dict[str, str | None]) -> dict[str, str]:
    """``{setting: sha256}`` for the data files that are set (e.g. ``{"data": cfg.data, "eval_data": cfg.eval_data}``)."""
    return {name: file_fingerprint(path) for name, path in files.items() if path and Path(path).exists()}


def changed_data(saved: dict[str, str], files: dict[str, str | None]) -> list[str]:
    """One line per data file whose contents differ from the fingerprint a run saved (files it saved none for are skipped)."""
    now = data_fingerprints({name: path for name, path in files.items() if name in saved})
    return [
        f"{files[name]}: its contents changed since the run was recorded (sha256 {saved[name][:12]}... then, "
        f"{now.get(name, 'missing')[:12]}... now)"
        for name in saved if now.get(name) != saved[name]
    ]


def load_preferences(path: str | Path, columns: Columns = Columns()) -> PreferenceData:
    """Read and validate a preference file or saved dataset; see the module docstring."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        broken = " (a link to a missing file)" if path.is_symlink() else ""
        if not broken:
            hub_hint(path, where="--data")
        raise ValueError(f"{path}: preference data file not found{broken}") from None
    except OSError as exc:  # ELOOP: a symbolic link loop; EACCES
        raise ValueError(f"{path}: cannot be opened: {exc.strerror or exc}") from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise ValueError(f"{path}: not a regular file (a pipe, socket or device); --data takes a .jsonl, .csv or .parquet file")
    read, nulls_are_missing = _reader(path)
    problems = _Problems(path)
    records: list[PreferenceRecord] = []
    identical: list[str] = []
    implicit_prompts = 0
    first_of_format: dict[str, str] = {}  # 'standard'/'conversational' -> where first seen
    try:
        for where, obj in read(path, problems, columns):
            values, fmt, problem, implicit = _check_record(obj, nulls_are_missing, columns)
            if problem is None and first_of_format and fmt not in first_of_format:
                other, other_where = next(iter(first_of_format.items()))
                problem = f"uses the {fmt} format but {other_where} uses the {other} format; one file must use one format"
            if problem is not None:
                problems.add(where, problem)
                continue
            first_of_format.setdefault(fmt, where)
            implicit_prompts += implicit
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
    return PreferenceData(
        path, records, conversational="conversational" in first_of_format, skipped_identical=len(identical),
        implicit_prompts=implicit_prompts,
    )  # fmt: skip
