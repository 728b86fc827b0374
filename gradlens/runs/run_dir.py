"""Create, resume and read run directories (see ``format.py`` for the layout)."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from . import schema
from .tables import CsvTable, RunFormatError, read_table


def _jsonable(value):
    """JSON has no NaN/inf: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temp file and rename it, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def environment_versions() -> dict[str, str]:
    """Versions that decide whether two runs are comparable."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "platform": sys.platform}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a core dependency
        versions["transformers"] = "not installed"
    try:
        from importlib.metadata import version

        versions["gradlens"] = version("gradlens")
    except Exception:  # pragma: no cover - running from a source tree
        versions["gradlens"] = "source"
    return versions


def prepare_run_dir(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check what may be done to ``path`` before anything is written there.

    An existing run directory is never touched unless ``resume`` or ``overwrite``
    says so; the error names the directory and both flags.
    """
    path = Path(path)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    exists = path.exists() and any(path.iterdir()) if path.is_dir() else path.exists()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory")
    if resume:
        if not (path / schema.CONFIG).exists():
            raise ValueError(f"{path}: nothing to resume (no {schema.CONFIG}); drop --resume to start a new run")
        return path
    if exists and not overwrite:
        raise ValueError(
            f"{path}: run directory already exists and is not empty; "
            "pass --resume to continue it or --overwrite to replace it (it was left unchanged)"
        )
    if exists and overwrite:
        import shutil

        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunWriter:
    """Writes one run directory: config, the three tables, and the summary.

    TensorBoard output is separate (``TensorBoardLogger``) so that the CSV logs
    have no dependency on TensorBoard being importable.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any], *, kind: str, resume: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            header = {"schema_version": schema.SCHEMA_VERSION, "kind": kind, "config": dict(config), "versions": environment_versions()}
            write_json_atomic(self.path / schema.CONFIG, header)
        self.steps = CsvTable(self.path / schema.STEPS)
        self.layers = CsvTable(self.path / schema.LAYERS)
        self.evals = CsvTable(self.path / schema.EVALS)

    def log_step(self, row: Mapping[str, Any]) -> None:
        self.steps.append(row)

    def log_layers(self, step: int, layers: Mapping[str, Mapping[str, float]]) -> None:
        self.layers.append_many({schema.STEP: step, schema.LAYER: name, **values} for name, values in layers.items())

    def log_eval(self, row: Mapping[str, Any]) -> None:
        self.evals.append(row)

    def truncate_after(self, step: int) -> None:
        """Resume support: drop rows logged after the checkpoint at ``step``."""
        for table in (self.steps, self.layers, self.evals):
            table.keep_steps_upto(step)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json_atomic(self.path / schema.SUMMARY, summary)

    def close(self) -> None:
        for table in (self.steps, self.layers, self.evals):
            table.close()


@dataclass
class Run:
    """A run directory read back. Tables are loaded lazily (layers can be large)."""

    path: Path
    kind: str
    config: dict
    versions: dict
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def _table(self, filename: str) -> pd.DataFrame:
        if filename not in self._cache:
            self._cache[filename] = read_table(self.path / filename)
        return self._cache[filename]

    @property
    def steps(self) -> pd.DataFrame:
        return self._table(schema.STEPS)

    @property
    def layers(self) -> pd.DataFrame:
        return self._table(schema.LAYERS)

    @property
    def evals(self) -> pd.DataFrame:
        return self._table(schema.EVALS)

    @property
    def summary(self) -> dict | None:
        path = self.path / schema.SUMMARY
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    @property
    def complete(self) -> bool:
        return (self.path / schema.SUMMARY).exists()


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / schema.CONFIG).is_file()


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory; clear errors for a missing path or a non-run directory."""
    path = Path(path)
    if not path.exists():
        raise RunFormatError(f"{path}: no such run directory")
    if not path.is_dir():
        raise RunFormatError(f"{path}: not a directory")
    config_path = path / schema.CONFIG
    if not config_path.is_file():
        raise RunFormatError(f"{path}: not a gradlens run (no {schema.CONFIG}); record one with `gradlens record`")
    try:
        header = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFormatError(f"{config_path}: not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or "kind" not in header:
        raise RunFormatError(f"{config_path}: missing the 'kind' field; not a gradlens run config")
    return Run(path=path, kind=header["kind"], config=header.get("config", {}), versions=header.get("versions", {}))


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories at ``root`` itself or anywhere below it, sorted by path."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    return sorted(p.parent for p in root.rglob(schema.CONFIG) if p.parent != root and schema.CHECKPOINTS not in p.parts)
