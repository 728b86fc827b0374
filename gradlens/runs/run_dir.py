"""Create, resume and read run directories (see ``schema.py`` for the layout).

What "complete" means (``run_status``), which files belong to a run and may be
replaced by ``--overwrite`` (``run_contents``), and the checks made before
anything is written (``prepare_run_dir``) are defined here, once.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from . import schema
from .lock import RunLock, held_lock
from .tables import CsvTable, RunFormatError, check_cells, named_os_error, open_nofollow, read_table


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
    try:
        with open_nofollow(tmp, "wb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
            json.dump(_jsonable(obj), f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # EFBIG, ENOSPC: name the file
        raise named_os_error(exc, tmp) from None
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


# ---------------------------------------------------------------- what a run directory may hold
# --overwrite deletes these and nothing else; anything else in a run directory is
# the user's, and its presence makes --overwrite refuse.
_TOP_FILES = re.compile(
    r"^(config\.json|steps\.csv|layers\.csv|evals\.csv|rows\.csv|summary\.json)(\.tmp)?$"  # tables, JSON, their temp files
    r"|^(steps|layers|evals|rows)\.tmp$"  # CsvTable.keep_steps_upto's rewrite
    r"|^events\.out\.tfevents\..+$"  # TensorBoard
    r"|^" + re.escape(schema.LOCK) + r"$"
)
_CHECKPOINT_DIRS = re.compile(r"^step_\d+$|^\.step_\d+\.tmp$|^reference$")
_CHECKPOINT_FILES = re.compile(
    r"^(model\.safetensors|optimizer\.pt|state\.json)(\.tmp)?$"
    # record/checkpoint.save_hf_files: what save_pretrained writes for a model's config and its tokenizer
    r"|^(config|generation_config)\.json$"
    r"|^(tokenizer|special_tokens_map|added_tokens|vocab|merges|chat_template|spiece|sentencepiece)([._-].*)?$"
)
# A LoRA checkpoint's adapter/: what peft's save_pretrained writes, and the tokenizer.
_ADAPTER_DIR = "adapter"
_ADAPTER_FILES = re.compile(r"^adapter_(model\.safetensors|config\.json)$|^README\.md$|" + _CHECKPOINT_FILES.pattern)
# Present in a directory that was never started: a writer killed before config.json was in place.
_NOT_STARTED = {schema.LOCK, schema.CONFIG + ".tmp"}


@dataclass(frozen=True)
class RunContents:
    """What is inside a directory, split into the run format's files and everything else."""

    ours: list[Path]      # files the run format defines (what --overwrite may delete)
    foreign: list[Path]   # anything else: the user's files, other directories, links

    @property
    def started(self) -> bool:
        """False for an empty directory or one a writer left before config.json existed."""
        return bool(self.foreign) or any(p.name not in _NOT_STARTED for p in self.ours)


def run_contents(path: str | os.PathLike) -> RunContents:
    """Classify every entry of ``path`` (links are never followed and count as foreign)."""
    path = Path(path)
    ours, foreign = [], []
    for child in sorted(path.iterdir()):
        if child.is_symlink():
            foreign.append(child)
        elif child.is_file() and _TOP_FILES.match(child.name):
            ours.append(child)
        elif child.is_dir() and child.name == schema.CHECKPOINTS:
            for sub in sorted(child.iterdir()):
                if sub.is_symlink() or not sub.is_dir() or not _CHECKPOINT_DIRS.match(sub.name):
                    foreign.append(sub)
                    continue
                for item in sorted(sub.iterdir()):
                    if item.name == _ADAPTER_DIR and item.is_dir() and not item.is_symlink():
                        for file in sorted(item.iterdir()):
                            ok = file.is_file() and not file.is_symlink() and _ADAPTER_FILES.match(file.name)
                            (ours if ok else foreign).append(file)
                        continue
                    ok = item.is_file() and not item.is_symlink() and _CHECKPOINT_FILES.match(item.name)
                    (ours if ok else foreign).append(item)
        else:
            foreign.append(child)
    return RunContents(ours, foreign)


def own_checkpoint_files(path: str | os.PathLike) -> list[Path] | None:
    """The files of checkpoint directory ``path`` (its ``adapter/`` included) when it holds only
    what gradlens writes there, else None: a link, or anything else inside, makes it not gradlens's."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not _CHECKPOINT_DIRS.match(path.name):
        return None
    files = []
    for item in path.iterdir():
        inside = list(item.iterdir()) if item.name == _ADAPTER_DIR and item.is_dir() and not item.is_symlink() else [item]
        for file in inside:
            pattern = _ADAPTER_FILES if file.parent.name == _ADAPTER_DIR and file.parent != path else _CHECKPOINT_FILES
            if file.is_symlink() or not file.is_file() or not pattern.match(file.name):
                return None
            files.append(file)
    return files


def _listing(paths: list[Path], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_overwritable(path: str | os.PathLike) -> RunContents:
    """What --overwrite would delete in ``path``; ValueError if it is not only a gradlens run.

    Only a directory gradlens recognises as its own run (``config.json`` with a
    ``kind``, or a run that never got that far) may be replaced, and only the files
    of the run format; anything else makes the whole overwrite refuse.
    """
    path = Path(path)
    contents = run_contents(path)
    if contents.started and not _is_gradlens_config(path / schema.CONFIG):
        raise ValueError(
            f"{path}: --overwrite refused: this is not a gradlens run directory (no {schema.CONFIG} written by gradlens), "
            f"so nothing in it was deleted (it holds {_listing(sorted(path.iterdir()))}); choose another --out"
        )
    if contents.foreign:
        raise ValueError(
            f"{path}: --overwrite refused: the directory holds files that are not part of a gradlens run: "
            f"{_listing(contents.foreign)}; nothing was deleted. Move them away, or choose another --out"
        )
    here, run = Path(os.path.realpath(os.getcwd())), Path(os.path.realpath(path))
    if here == run or run in here.parents:
        # --overwrite renames the old run aside; the current directory would move with it.
        raise ValueError(f"{path}: --overwrite refused: it is (or holds) the current directory; run the command from "
                         "outside it. Nothing was deleted")
    return contents


def _is_gradlens_config(path: Path) -> bool:
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(header, dict) and header.get("kind") in (schema.KIND_PREFERENCE, schema.KIND_LANGEVIN) and isinstance(header.get("config"), dict)


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first: the folders creating ``path``
    will make, and so the only ones a command that fails may remove again."""
    missing, folder = [], Path(os.path.abspath(path))
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first, as ``missing_folders`` gives them) that is still empty."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def clear_run_files(path: str | os.PathLike, contents: RunContents | None = None) -> None:
    """Delete the run-format files of ``path`` (not the lock, not the directory)."""
    path = Path(path)
    contents = contents if contents is not None else check_overwritable(path)
    for file in contents.ours:
        if file.name != schema.LOCK or file.parent != path:
            file.unlink(missing_ok=True)
    checkpoints = path / schema.CHECKPOINTS
    if checkpoints.is_dir():
        for sub in checkpoints.iterdir():
            if (sub / _ADAPTER_DIR).is_dir():
                (sub / _ADAPTER_DIR).rmdir()
            sub.rmdir()  # empty now: check_overwritable refused anything foreign
        checkpoints.rmdir()


def check_no_links(path: str | os.PathLike) -> None:
    """ValueError naming the first link among the entries gradlens writes in run ``path``
    (its files, ``checkpoints/`` and each checkpoint's files): writing or pruning through a
    link would change files outside the run. gradlens follows no link out of a run directory."""
    path = Path(path)
    if not path.is_dir():
        return
    entries = list(path.iterdir())
    checkpoints = path / schema.CHECKPOINTS
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for sub in checkpoints.iterdir():
            entries.append(sub)
            if sub.is_dir() and not sub.is_symlink():
                entries.extend(sub.iterdir())
    for entry in sorted(entries):
        if entry.is_symlink():
            raise ValueError(f"{entry}: is a link (to {os.readlink(entry)}); gradlens follows no link in a run directory, "
                             "so it changed nothing: replace the link by the file, or remove it")


def check_continuable_by(path: str | os.PathLike, env: str | None, loss: Any = None) -> None:
    """ValueError unless the preference run at ``path`` may be continued by its own kind of writer:
    ``gradlens record`` (``env`` None) continues only runs it recorded, a trainer integration
    (``env`` "transformers" or "trl") only runs of that integration, and with the same ``loss``.
    Called before anything is cut back or deleted."""
    path = Path(path)
    header = read_json(path / schema.CONFIG)
    config = header.get("config") if isinstance(header, dict) else None
    if not isinstance(config, dict) or header.get("kind") != schema.KIND_PREFERENCE:
        raise ValueError(f"{path / schema.CONFIG}: not a preference run recorded by gradlens (kind "
                         f"{header.get('kind') if isinstance(header, dict) else None!r}); it was left unchanged")
    saved_env = config.get("env")
    writer = f"the {saved_env} trainer integration" if saved_env in schema.TRAINER_ENVS else "gradlens record"
    if env is None and saved_env in schema.TRAINER_ENVS:
        raise ValueError(f"{path}: recorded by {writer} (env {saved_env!r}), not by `gradlens record`, so --resume cannot "
                         "continue it; resume the trainer from its checkpoint instead (its run log continues this directory)")
    if env is not None and saved_env != env:
        raise ValueError(f"{path}: recorded by {writer} (env {saved_env!r}); a {env} trainer's run log continues only its own "
                         "runs, so nothing was cut or deleted: give the trainer another output directory")
    if env is not None and loss is not None and config.get("loss") != loss:
        raise ValueError(f"{path}: recorded with loss {config.get('loss')!r}, but this trainer logs {loss!r}; nothing was cut "
                         "or deleted: give the trainer another output directory")


def check_name_lengths(path: str | os.PathLike) -> None:
    """ValueError when a name in ``path`` is longer than its file system allows (255 bytes on most):
    found before anything is created, so a run that cannot start is refused, not begun."""
    absolute = Path(os.path.abspath(path))
    existing = next((p for p in (absolute, *absolute.parents) if p.exists()), Path("/"))
    try:
        limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no pathconf (Windows)
        limit = 255
    for part in absolute.relative_to(existing).parts if absolute != existing else ():
        size = len(os.fsencode(part))
        if size > limit:
            raise ValueError(f"{path}: the name {part[:40]!r}... is {size} bytes long, more than the {limit} this file system "
                             "allows; choose a shorter --out (nothing was created)")


def check_not_inside_a_run(path: str | os.PathLike) -> None:
    """ValueError when ``path`` lies inside another gradlens run (e.g. RUN/checkpoints/step_5): that
    run's --overwrite and checkpoint pruning would treat the new run's files as its own.
    Links are resolved first."""
    absolute = Path(os.path.realpath(path))
    for place in absolute.parents:
        if _is_gradlens_config(place / schema.CONFIG):
            raise ValueError(f"{path}: lies inside the gradlens run {place}; a run directory may not be placed in another run "
                             "(choose an --out outside it)")


# ---------------------------------------------------------------- --overwrite without a moment of loss
# The run being replaced is renamed aside (one rename: it is whole at either name) and deleted only
# once the new run has logged its first row. A kill in between leaves the old run whole beside the
# new one, and the next `gradlens record`/`langevin` on that directory puts it back.


def replaced_path(path: str | os.PathLike) -> Path:
    """Where --overwrite keeps the run it replaces until the new run has a row: ``.NAME.gradlens-replaced``."""
    path = Path(path)
    return path.with_name(f".{path.name}.gradlens-replaced")


def has_rows(path: str | os.PathLike) -> bool:
    """steps.csv holds at least one complete row."""
    steps = Path(path) / schema.STEPS
    try:
        return steps.is_file() and not steps.is_symlink() and steps.read_bytes().count(b"\n") >= 2
    except OSError:
        return False


def _fresh_directory(path: Path) -> None:
    path.mkdir()


def set_aside(path: Path, contents: RunContents) -> None:
    """Move the run at ``path`` aside and leave an empty directory (still locked) in its place."""
    aside = replaced_path(path)
    if aside.exists() or aside.is_symlink():
        if not has_rows(path):
            # An earlier --overwrite was cut short: the run aside holds the data, the one here none yet.
            check_overwritable(aside)
            clear_run_files(path, contents)
            return
        discard_replaced(path)  # the new run got its rows: what is aside is the stale old one
    os.rename(path, aside)
    try:
        _fresh_directory(path)
    except OSError:
        os.rename(aside, path)
        raise
    lock = held_lock(path)
    if lock is not None:
        lock.relock(aside / schema.LOCK)


def discard_replaced(path: str | os.PathLike) -> None:
    """Delete the run --overwrite set aside for ``path`` (its run files only; anything else keeps it)."""
    aside = replaced_path(path)
    if not aside.is_dir() or aside.is_symlink():
        return
    try:
        contents = check_overwritable(aside)
    except ValueError:
        return  # not only gradlens files: left alone
    clear_run_files(aside, contents)
    (aside / schema.LOCK).unlink(missing_ok=True)  # nobody holds it: the lock moved with relock
    if not any(aside.iterdir()):
        aside.rmdir()


def restore_replaced(path: str | os.PathLike) -> bool:
    """Put back a run that an interrupted --overwrite set aside, when its replacement has no row yet
    (and no writer holds it). True when it was restored."""
    path = Path(path)
    aside = replaced_path(path)
    if not aside.is_dir() or aside.is_symlink() or has_rows(path):
        return False
    if path.exists():
        try:
            contents = check_overwritable(path)
        except ValueError:
            return False
        try:
            with RunLock(path):
                clear_run_files(path, contents)
        except ValueError:  # a writer holds it: its --overwrite is under way
            return False
        if any(path.iterdir()):
            return False
        path.rmdir()
    os.rename(aside, path)
    warnings.warn(f"{path}: an interrupted --overwrite had set this run aside (as {aside.name}) before the new run logged a "
                  "row; it was put back", UserWarning, stacklevel=2)
    return True


def prepare_run_dir(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check what may be done to ``path`` and make it ready; refusals change nothing.

    * a missing or never-started directory (empty, or left by a writer killed
      before its config.json existed) is used as is;
    * an existing run is continued only with ``resume``, replaced only with
      ``overwrite`` -- which refuses when the directory is not a gradlens run or
      holds anything else, and sets the old run aside (``set_aside``) until the
      new run has logged its first row.
    """
    path = Path(path)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    check_not_inside_a_run(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory")
    if resume:
        if not (path / schema.CONFIG).exists():
            raise ValueError(f"{path}: nothing to resume (no {schema.CONFIG}); drop --resume to start a new run")
        check_no_links(path)
        return path
    contents = run_contents(path) if path.is_dir() else None
    if contents is not None and contents.started:
        if not overwrite:
            raise ValueError(
                f"{path}: run directory already exists and is not empty; "
                "pass --resume to continue it or --overwrite to replace it (it was left unchanged)"
            )
        set_aside(path, check_overwritable(path))
    elif contents is not None:
        for leftover in contents.ours:  # config.json.tmp of a run killed at its very start
            if leftover.name != schema.LOCK:
                leftover.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{path}: cannot create the run directory: {exc.strerror or exc}") from exc
    return path


def lock_run_dir(
    path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, recheck: Callable[[], None] | None = None
) -> tuple[RunLock, Path]:
    """Take ``path``'s writer lock, then check it (``recheck``) and prepare it (``prepare_run_dir``).

    Every writer of a run directory starts here, in this order: with the lock held,
    no other writer can change the directory between the checks and the first
    write. On any refusal the lock is released (``release_run_dir``) and nothing
    was written. The caller releases the lock when it is done.
    """
    lock = RunLock(path)
    try:
        lock.acquire()
    except OSError as exc:  # a read-only or full file system: nothing was written yet
        release_run_dir(lock)
        raise ValueError(f"{path}: cannot create or lock the run directory: {exc.strerror or exc}") from None
    except BaseException:  # another writer holds it
        release_run_dir(lock)
        raise
    try:
        if recheck is not None:
            recheck()
        return lock, prepare_run_dir(path, resume=resume, overwrite=overwrite)
    except BaseException:
        release_run_dir(lock)
        raise


def release_run_dir(lock: RunLock) -> None:
    """Release the writer lock; a directory the lock created and nothing filled goes again (a refused start leaves none)."""
    lock.release()
    if lock.created_dir and lock.run_dir.is_dir() and not any(lock.run_dir.iterdir()):
        lock.run_dir.rmdir()


def _summary(path: Path) -> dict | None:
    try:
        data = read_json(run_file(path, schema.SUMMARY))
    except (OSError, ValueError, RecursionError):  # RunFormatError included: unreadable is "not ended"
        return None
    return data if isinstance(data, dict) else None


def run_status(path: str | os.PathLike, steps: int | None = None) -> str | None:
    """How a run ended: ``schema.STATUS_COMPLETE``, ``schema.STATUS_NONFINITE``, or None.

    None means not ended: running, killed, never started, or ended at a different
    number of steps than ``steps`` (a run extended with ``--resume --steps``). A
    summary.json exists only once a run has ended; Langevin summaries carry no
    status and count as complete. This is the one definition of "complete" that
    `gradlens record`, `gradlens plot` and the experiments use.
    """
    summary = _summary(Path(path))
    if summary is None:
        return None
    if steps is not None and summary.get(schema.SUMMARY_STEPS) != steps:
        return None
    status = summary.get(schema.SUMMARY_STATUS, schema.STATUS_COMPLETE)
    return status if status in (schema.STATUS_COMPLETE, schema.STATUS_NONFINITE) else None


def is_complete(path: str | os.PathLike, steps: int | None = None) -> bool:
    """The run did all its steps (a run stopped at a non-finite step did not)."""
    return run_status(path, steps) == schema.STATUS_COMPLETE


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
        self._first_row_logged = False
        self.steps = CsvTable(self.path / schema.STEPS)
        self.layers = CsvTable(self.path / schema.LAYERS)
        self.evals = CsvTable(self.path / schema.EVALS)

    @staticmethod
    def note_resume(path: str | os.PathLike, config: Mapping[str, Any], *, from_step: int) -> None:
        """config.json of a run resumed at ``from_step``: the current settings (e.g. a new --steps) and one more
        ``resumes`` entry (the step and the versions it continued with); the rest of the header is kept."""
        file = Path(path) / schema.CONFIG
        header = read_json(file)
        header["config"] = dict(config)
        header.setdefault("resumes", []).append({"from_step": from_step, "versions": environment_versions()})
        write_json_atomic(file, header)

    def log_step(self, row: Mapping[str, Any]) -> None:
        self.steps.append(row)
        if not self._first_row_logged:  # the new run is real now: the run it replaces can go
            self._first_row_logged = True
            discard_replaced(self.path)

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
        """A table checked cell by cell (``check_cells``) and in step order."""
        if filename not in self._cache:
            path = run_file(self.path, filename)
            frame = read_table(path)
            if not frame.empty:
                check_cells(frame, path, text_columns=_TEXT_COLUMNS, flag_columns=_FLAG_COLUMNS)
                frame = _in_step_order(frame, path)
            self._cache[filename] = frame
        return self._cache[filename]

    @property
    def steps(self) -> pd.DataFrame:
        """steps.csv: it must have a ``step`` column; repeated steps are reported (and kept)."""
        fresh = schema.STEPS not in self._cache
        frame = self._table(schema.STEPS)
        if frame.empty or not fresh:
            return frame
        if schema.STEP not in frame.columns:
            raise RunFormatError(f"{self.path / schema.STEPS}: line 1 (header): no {schema.STEP!r} column (found {list(frame.columns)[:8]})")
        repeated = frame[schema.STEP][frame[schema.STEP].duplicated()]
        if len(repeated):
            shown = ", ".join(str(v) for v in repeated.unique()[:5])
            warnings.warn(
                f"{self.path / schema.STEPS}: step(s) {shown} appear more than once ({len(repeated)} repeated rows; "
                "two writers, or a copy?); all rows are used as logged",
                UserWarning,
                stacklevel=2,
            )
        return frame

    @property
    def layers(self) -> pd.DataFrame:
        return self._table(schema.LAYERS)

    @property
    def evals(self) -> pd.DataFrame:
        return self._table(schema.EVALS)

    @property
    def summary(self) -> dict | None:
        path = run_file(self.path, schema.SUMMARY)
        return read_json(path) if path.exists() else None

    @property
    def complete(self) -> bool:
        return is_complete(self.path)


def read_json(path: Path) -> Any:
    """A JSON file's value; RunFormatError naming the file (and the line) when it cannot be read."""
    try:
        if not path.is_dir() and path.exists() and not stat.S_ISREG(path.stat().st_mode):
            raise RunFormatError(f"{path}: not a regular file (a FIFO, socket or device); gradlens reads only files")
        return json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise RunFormatError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
    except (UnicodeDecodeError, RecursionError, OSError) as exc:
        raise RunFormatError(f"{path}: not a readable JSON file: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    except ValueError as exc:  # json's own limits, e.g. an integer of more than 4300 digits
        raise RunFormatError(f"{path}: not usable JSON: {str(exc)[:100]}") from None


# Table columns that hold names, not numbers, and columns that hold 0 or 1.
_TEXT_COLUMNS = frozenset({schema.LAYER, schema.ROW_SIDE})
_FLAG_COLUMNS = frozenset({schema.NONFINITE, "bound_holds"})


def run_file(run: str | os.PathLike, name: str) -> Path:
    """``run/name``, refused (RunFormatError) when it is a link leading out of the run.

    A run's files are read only from the run itself: a ``steps.csv`` that links to
    ``/etc/passwd`` is never opened, so nothing outside the run can be shown or copied
    into a report. The run directory itself may be reached through links.
    """
    path = Path(run) / name
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        home = Path(os.path.realpath(run))
        if home != target and home not in target.parents:
            raise RunFormatError(f"{path}: is a link to a file outside the run ({os.readlink(path)}); refused: "
                                 "gradlens follows no link out of a run directory")
    return path


def _in_step_order(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Rows sorted by step (stable: repeated steps keep their file order), with a warning when
    the file had them out of order: "the last row" must mean the last step."""
    if schema.STEP not in frame.columns:
        return frame
    steps = frame[schema.STEP].to_numpy()
    if len(steps) < 2 or (steps[1:] >= steps[:-1]).all():
        return frame
    warnings.warn(f"{path}: rows are not in step order (a damaged or edited file); they are used sorted by step",
                  UserWarning, stacklevel=3)
    return frame.sort_values(schema.STEP, kind="stable").reset_index(drop=True)


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / schema.CONFIG).is_file()


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory; clear errors for a missing path or a non-run directory."""
    path = Path(path)
    if not path.exists():
        raise RunFormatError(f"{path}: no such run directory")
    if not path.is_dir():
        raise RunFormatError(f"{path}: not a directory")
    config_path = run_file(path, schema.CONFIG)
    if not config_path.is_file():
        raise RunFormatError(f"{path}: not a gradlens run (no {schema.CONFIG}); record one with `gradlens record`")
    header = read_json(config_path)
    if not isinstance(header, dict) or "kind" not in header:
        raise RunFormatError(f"{config_path}: missing the 'kind' field; not a gradlens run config")
    if not isinstance(header["kind"], str):
        raise RunFormatError(f"{config_path}: 'kind' must be a string such as {schema.KIND_PREFERENCE!r}, got {header['kind']!r:.60}")
    version = header.get("schema_version", schema.SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RunFormatError(f"{config_path}: 'schema_version' must be a whole number >= 1, got {version!r:.60}")
    if version > schema.SCHEMA_VERSION:
        raise RunFormatError(
            f"{config_path}: written by a newer gradlens (schema_version {version}; this one reads up to "
            f"{schema.SCHEMA_VERSION}); refused rather than misread: upgrade gradlens"
        )
    for key in ("config", "versions"):
        if not isinstance(header.get(key, {}), dict):
            raise RunFormatError(f"{config_path}: {key!r} must be a JSON object of settings, got {type(header[key]).__name__}")
    return Run(path=path, kind=header["kind"], config=header.get("config", {}), versions=header.get("versions", {}))


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories at ``root`` itself or anywhere below it, sorted by path."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    return sorted(p.parent for p in root.rglob(schema.CONFIG) if p.parent != root and schema.CHECKPOINTS not in p.parts)
