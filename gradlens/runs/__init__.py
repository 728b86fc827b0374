"""Run directories: the on-disk contract shared by `record`, `langevin`, `plot` and TensorBoard.

This package imports nothing from training, analysis or plotting code.
"""

from . import schema
from .lock import RunLock, RunLockedError
from .run_dir import (
    Run, RunContents, RunWriter, check_overwritable, find_runs, is_complete, is_run_dir, load_run, lock_run_dir, prepare_run_dir,
    release_run_dir, run_contents, run_status, write_json_atomic,
)
from .tables import CsvTable, RunFormatError, TruncatedRowWarning, read_table

__all__ = [
    "schema",
    "Run",
    "RunContents",
    "RunLock",
    "RunLockedError",
    "check_overwritable",
    "is_complete",
    "run_contents",
    "run_status",
    "RunWriter",
    "CsvTable",
    "RunFormatError",
    "TruncatedRowWarning",
    "find_runs",
    "is_run_dir",
    "load_run",
    "lock_run_dir",
    "prepare_run_dir",
    "read_table",
    "release_run_dir",
    "write_json_atomic",
]
