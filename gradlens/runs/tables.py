"""Append-only CSV tables that survive SIGKILL, and their tolerant reader.

A row is formatted completely in memory and written with a single ``write`` +
``flush``; the operating system keeps what was written when the process dies.
The reader accepts a partial last line (the row in flight when a run was killed),
drops it and warns with the file and line number. Nothing is ever unpickled.
"""

from __future__ import annotations

import csv
import io
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd


class RunFormatError(ValueError):
    """A file of a run directory is missing or malformed."""


class TruncatedRowWarning(UserWarning):
    """The last line of a table was cut off (a killed run); it was dropped."""


def _format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        # float(): numpy >= 2 reprs np.float64 (a float subclass) as "np.float64(...)".
        return repr(float(value)) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, int):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return _format_value(value.item())
    text = str(value)
    if any(c in text for c in ',"\n\r'):
        text = '"' + text.replace('"', '""') + '"'
    return text


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def named_os_error(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` with ``path`` as its file name when it has none (a failed write() names no file)."""
    if exc.filename:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path)) if exc.errno else OSError(exc.errno, str(exc), str(path))


def open_nofollow(path: str | os.PathLike, mode: str):
    """``open(path, mode)`` ("a", "wb", "rb+") that refuses a link at ``path`` (OSError ELOOP):
    a planted link must never redirect a run's writes to a file outside it."""
    flags = {"a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "rb+": os.O_RDWR}[mode]
    fd = os.open(path, flags | _NOFOLLOW, 0o644)
    try:
        return os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if "b" not in mode else {}))
    except BaseException:
        os.close(fd)
        raise


class CsvTable:
    """One append-only CSV file whose columns are fixed by its header."""

    def __init__(self, path: str | os.PathLike, columns: Iterable[str] | None = None):
        self.path = Path(path)
        self.columns: list[str] | None = list(columns) if columns is not None else None
        self._file = None
        if self.path.exists() and self.path.stat().st_size > 0:
            self._repair_partial_tail()  # first: a header cut off by a kill is no header
            with open(self.path, "r", encoding="utf-8") as f:
                header = f.readline().rstrip("\n")
            if header:
                self.columns = header.split(",")

    def _repair_partial_tail(self) -> None:
        """Cut a partial last line (a killed writer) so appends start on a fresh line."""
        with open_nofollow(self.path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            f.truncate(data.rfind(b"\n") + 1)

    def _open(self):
        if self._file is None:
            self._file = open_nofollow(self.path, "a")
        return self._file

    def append(self, row: Mapping[str, object]) -> None:
        self.append_many([row])

    def append_many(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Write rows in one ``write`` call, so a kill leaves whole rows only (but the last)."""
        rows = list(rows)
        if not rows:
            return
        f = self._open()
        chunks = []
        if self.columns is None:
            self.columns = list(rows[0].keys())
        if f.tell() == 0:
            chunks.append(",".join(self.columns) + "\n")
        for row in rows:
            unknown = set(row) - set(self.columns)
            if unknown:
                raise RunFormatError(f"{self.path}: unknown columns {sorted(unknown)}; the header is fixed to {self.columns}")
            chunks.append(",".join(_format_value(row.get(c)) for c in self.columns) + "\n")
        try:
            f.write("".join(chunks))
            f.flush()
        except OSError as exc:  # EFBIG, ENOSPC: write() names no file, so name it here
            raise named_os_error(exc, self.path) from None

    def keep_steps_upto(self, last_step: int, step_column: str = "step") -> None:
        """Drop rows after ``last_step`` (used by resume) by an atomic rewrite.

        Kept rows are copied byte for byte: re-formatting them through pandas would
        change floats (numpy 2 reprs them as ``np.float64(...)``). A partial last
        line is dropped.
        """
        self.close()
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
        if not lines:
            return
        steps = table_steps(self.path, step_column)
        kept = [lines[0]] + [line for line, step in zip(lines[1:], steps) if step <= last_step]
        tmp = self.path.with_suffix(".tmp")
        with open_nofollow(tmp, "wb") as f:
            f.write(b"".join(kept))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:  # the flush of a failed write, again
                raise named_os_error(exc, self.path) from None


def check_header(path: str | os.PathLike, columns: Iterable[str]) -> None:
    """RunFormatError when table ``path`` exists but its header lacks a column a writer will append
    (a table of an older gradlens): found before a resume cuts or appends anything."""
    path = Path(path)
    if not path.exists():
        return
    data = _read_bytes(path)
    if b"\n" not in data:  # no complete header (a kill while writing it): the writer starts the table again
        return
    first = data.split(b"\n", 1)[0]
    try:
        header = next(csv.reader([first.decode("utf-8")])) if first else []
    except (UnicodeDecodeError, csv.Error, StopIteration):
        raise RunFormatError(f"{path}: line 1 (header): not a readable gradlens table header") from None
    missing = [c for c in columns if c not in header]
    if header and missing:
        raise RunFormatError(
            f"{path}: line 1 (header): no {', '.join(repr(c) for c in missing[:5])} column(s): written by an older gradlens, whose "
            "tables this one cannot continue, so nothing was changed; record the run again (--overwrite, or a new --out)"
        )


def table_steps(path: str | os.PathLike, step_column: str = "step") -> list[int]:
    """The step of every complete row, in file order; RunFormatError names the line of a bad one.

    Resume calls this on every table before it changes anything, so a table it
    could not cut back is reported instead of half-rewritten.
    """
    path = Path(path)
    data = _read_bytes(path)
    data = data[: data.rfind(b"\n") + 1]
    if not data:
        return []
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise RunFormatError(f"{path}: not a readable gradlens table: {exc}") from None
    if step_column not in rows[0]:
        raise RunFormatError(f"{path}: line 1 (header): no {step_column!r} column (found {rows[0][:8]})")
    index = rows[0].index(step_column)
    steps = []
    for number, cells in enumerate(rows[1:], start=2):
        try:
            steps.append(int(cells[index]))
        except (IndexError, ValueError):
            raise RunFormatError(f"{path}: line {number}: the {step_column!r} value is not a whole number ({cells[index] if index < len(cells) else 'missing'!r})") from None
    return steps


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise RunFormatError(f"{path}: is a directory, not a gradlens table")
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the reader forever
            raise RunFormatError(f"{path}: not a regular file (a FIFO, socket or device); gradlens reads only files")
        return path.read_bytes()
    except OSError as exc:
        raise RunFormatError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _short_lines(path: Path, data: bytes, width: int) -> list[int]:
    """Line numbers (1-based) of rows whose field count differs from the header's."""
    if b'"' in data:  # quoted fields may hold commas or newlines: left to the CSV parser
        return []
    counts = [line.count(b",") + 1 for line in data.split(b"\n")[:-1]]
    return [i + 1 for i, n in enumerate(counts) if i > 0 and n != width]


def read_table(path: str | os.PathLike, *, quiet: bool = False) -> pd.DataFrame:
    """Read a gradlens CSV table.

    A partial last line (a killed run) and rows with the wrong number of fields
    (a line cut in the middle of a file) are dropped with a warning naming the
    file and the lines; everything else that is wrong raises RunFormatError.
    """
    path = Path(path)
    if not path.exists():
        return pd.DataFrame()
    data = _read_bytes(path)
    if not data:
        return pd.DataFrame()
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        line_no = data.count(b"\n", 0, cut) + 1
        if not quiet:
            kept = "the header is incomplete, so no rows are used" if line_no == 1 else f"it was dropped and the {line_no - 2} complete rows are used"
            warnings.warn(
                f"{path}: line {line_no} is incomplete (the run was probably killed while writing it); {kept}",
                TruncatedRowWarning,
                stacklevel=2,
            )
        data = data[:cut]
    if not data:
        return pd.DataFrame()
    width = data[: data.index(b"\n")].count(b",") + 1
    bad = _short_lines(path, data, width)
    if bad:
        if not quiet:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            warnings.warn(
                f"{path}: line(s) {shown} do not have the header's {width} fields (cut or damaged); they were dropped",
                TruncatedRowWarning,
                stacklevel=2,
            )
        drop = set(bad)
        data = b"".join(line + b"\n" for i, line in enumerate(data.split(b"\n")[:-1], start=1) if i not in drop)
    try:
        return pd.read_csv(io.BytesIO(data), keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise RunFormatError(f"{path}: not a readable gradlens table: {exc}") from exc


# ---------------------------------------------------------------- what a cell may hold

MAX_STEP = 2**53  # steps are whole numbers a float64 holds exactly


def data_line_numbers(path: str | os.PathLike) -> list[int]:
    """The file line on which each row ``read_table`` returns starts (1-based; the header is line 1).

    Used only to name the line of a bad cell, so it reads the file again.
    """
    path = Path(path)
    data = _read_bytes(path)
    data = data[: data.rfind(b"\n") + 1]
    if not data:
        return []
    if b'"' in data:  # quoted fields may span lines: let the CSV module count
        reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace"), newline=""))
        starts, line = [], 1
        for _ in reader:
            starts.append(line)
            line = reader.line_num + 1
        return starts[1:]
    width = data[: data.index(b"\n")].count(b",") + 1
    drop = set(_short_lines(path, data, width))
    return [i for i in range(2, data.count(b"\n") + 1) if i not in drop]


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_cells(
    frame: pd.DataFrame, path: str | os.PathLike, *, text_columns=(), flag_columns=(), step_column: str = "step"
) -> None:
    """RunFormatError naming the file, the line and the column of the first cell that is not what
    gradlens writes: a step that is not a whole number from 0 to 2^53, a flag other than 0 or 1,
    or text in a number column. Nothing is coerced: a misread cell would be a silent wrong number.

    Empty cells and ``nan``/``inf`` are numbers (gradlens writes them); ``text_columns`` hold names.
    """
    for name in frame.columns:
        if name in text_columns:
            continue
        raw = frame[name]
        if pd.api.types.is_bool_dtype(raw):
            numbers = None
        elif pd.api.types.is_numeric_dtype(raw):
            numbers = raw.astype("float64")
        else:  # text (object or string dtype): which cells are numbers?
            numbers = pd.to_numeric(raw, errors="coerce")
        if numbers is None:  # pandas read True/False: no gradlens column holds those
            bad = np.ones(len(raw), dtype=bool)
            what = "is not a number"
        elif name == step_column:
            values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(values) | (values != np.floor(values)) | (values < 0) | (values >= MAX_STEP)
            what = "is not a step (a whole number from 0)"
        else:
            values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
            bad = np.isnan(values) & raw.notna().to_numpy()  # text that is no number
            what = "is not a number"
            if name in flag_columns:
                with np.errstate(invalid="ignore"):
                    bad |= ~np.isnan(values) & (values != 0) & (values != 1)
                what = "is not a flag (0 or 1)"
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            lines = data_line_numbers(path)
            line = f"line {lines[row]}" if row < len(lines) else f"data row {row + 1}"
            value = raw.iloc[row]
            value = "(empty)" if pd.isna(value) and name == step_column else _shown(value if isinstance(value, str) else str(value))
            raise RunFormatError(f"{path}: {line}: {name!r} value {value} {what}; refused rather than misread "
                                 f"({int(bad.sum())} such cell(s) in this column)")
