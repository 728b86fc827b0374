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
import warnings
from pathlib import Path
from typing import Iterable, Mapping

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


class CsvTable:
    """One append-only CSV file whose columns are fixed by its header."""

    def __init__(self, path: str | os.PathLike, columns: Iterable[str] | None = None):
        self.path = Path(path)
        self.columns: list[str] | None = list(columns) if columns is not None else None
        self._file = None
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "r", encoding="utf-8") as f:
                header = f.readline().rstrip("\n").split(",")
            self.columns = header
            self._repair_partial_tail()

    def _repair_partial_tail(self) -> None:
        """Cut a partial last line (a killed writer) so appends start on a fresh line."""
        with open(self.path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            f.truncate(data.rfind(b"\n") + 1)

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8", newline="")
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
        f.write("".join(chunks))
        f.flush()

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
        index = lines[0].decode("utf-8").rstrip("\r\n").split(",").index(step_column)
        kept = [lines[0]] + [line for line in lines[1:] if int(next(csv.reader([line.decode("utf-8")]))[index]) <= last_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_table(path: str | os.PathLike, *, quiet: bool = False) -> pd.DataFrame:
    """Read a gradlens CSV table; a partial last line is dropped with a warning."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame()
    data = path.read_bytes()
    if not data:
        return pd.DataFrame()
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        line_no = data.count(b"\n", 0, cut) + 1
        if not quiet:
            warnings.warn(
                f"{path}: line {line_no} is incomplete (the run was probably killed while writing it); "
                f"it was dropped and the {line_no - 2} complete rows are used",
                TruncatedRowWarning,
                stacklevel=2,
            )
        data = data[:cut]
    if not data:
        return pd.DataFrame()
    try:
        return pd.read_csv(io.BytesIO(data), keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise RunFormatError(f"{path}: not a readable gradlens table: {exc}") from exc
