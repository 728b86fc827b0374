"""Run directories: the on-disk contract shared by `record`, `langevin`, `plot` and TensorBoard.

This package imports nothing from training, analysis or plotting code.
"""

from . import schema
from .run_dir import Run, RunWriter, find_runs, is_run_dir, load_run, prepare_run_dir, write_json_atomic
from .tables import CsvTable, RunFormatError, TruncatedRowWarning, read_table

__all__ = [
    "schema",
    "Run",
    "RunWriter",
    "CsvTable",
    "RunFormatError",
    "TruncatedRowWarning",
    "find_runs",
    "is_run_dir",
    "load_run",
    "prepare_run_dir",
    "read_table",
    "write_json_atomic",
]
