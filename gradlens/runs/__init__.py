"""Run directories: the on-disk contract shared by `record`, `langevin`, `plot` and TensorBoard.

This package imports nothing from training, analysis or plotting code.
"""

from . import schema
from .lock import RunLock, RunLockedError
from .run_dir import (
    Run, RunContents, RunWriter, check_continuable_by, check_name_lengths, check_no_links, check_not_inside_a_run, check_overwritable,
    find_runs, is_complete, is_run_dir, load_run, lock_run_dir, own_checkpoint_files, prepare_run_dir, release_run_dir, replaced_path,
    restore_replaced, run_contents, run_status, write_json_atomic,
)
from .tables import CsvTable, RunFormatError, TruncatedRowWarning, read_table

__all__ = [
    "schema",
    "Run",
    "RunContents",
    "RunLock",
    "RunLockedError",
    "check_continuable_by",
    "check_name_lengths",
    "check_no_links",
    "check_not_inside_a_run",
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
    "own_checkpoint_files",
    "lock_run_dir",
    "prepare_run_dir",
    "replaced_path",
    "restore_replaced",
    "read_table",
    "release_run_dir",
    "write_json_atomic",
]
