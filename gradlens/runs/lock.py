"""The writer lock: at most one process writes a run directory at a time.

A writer holds ``fcntl.flock(LOCK_EX)`` on ``RUN/.gradlens.lock`` for as long as it
writes. The operating system drops the lock when the process ends, however it
ends, so a SIGKILLed run never leaves a stale lock behind: the file may stay,
but nobody holds it. A second writer fails at once (``LOCK_NB``) with a message
naming the holder's PID, which the holder writes into the file.

Releasing unlinks the file before closing it. A process that opened the old
file just before the unlink could then lock an inode no longer in the
directory, so acquiring re-checks that the locked file is still the one at the
path and retries otherwise. Platforms without ``fcntl`` (Windows) get no lock.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from . import schema

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunLockedError(ValueError):
    """Another live process holds the run directory's writer lock."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return "an unknown PID"
    return f"PID {text}" if text.isdigit() else "an unknown PID"


# Locks this process holds, by run directory: --overwrite moves a run aside while its lock is held
# (``run_dir.set_aside``) and moves the lock to the fresh directory with ``relock``.
_HELD: dict[str, "RunLock"] = {}


def held_lock(run_dir: str | os.PathLike) -> "RunLock | None":
    """The lock this process holds on ``run_dir``, if any."""
    return _HELD.get(os.path.abspath(run_dir))


class RunLock:
    """An exclusive writer lock on one run directory; a context manager.

    ``RunLock(path).acquire()`` creates the directory if needed (a new run).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / schema.LOCK
        self._fd: int | None = None
        self.created_dir = False

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        if not self.run_dir.is_dir():
            self.run_dir.mkdir(parents=True)
            self.created_dir = True
        if fcntl is None:  # pragma: no cover - Windows
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link planted as the lock would make us write its target
                    raise RunLockedError(f"{self.path}: is a link; gradlens follows no link in a run directory, "
                                         "so it changed nothing: remove the link") from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise RunLockedError(
                    f"{self.run_dir}: another gradlens process ({_holder(self.path)}) is writing this run directory; "
                    f"wait for it to finish or stop it (the lock is {self.path}, held until that process ends)"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file while we opened it: try again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        _HELD[os.path.abspath(self.run_dir)] = self
        return self

    def relock(self, moved: Path) -> None:
        """The run directory was renamed away (its lock file now at ``moved``) and a fresh one made
        at ``run_dir``: lock the fresh one, then drop the old file and its lock."""
        if self._fd is None or fcntl is None:
            return
        old = self._fd
        self._fd = None
        try:
            self.acquire()
        finally:
            try:
                if os.fstat(old).st_ino == os.stat(moved).st_ino:
                    os.unlink(moved)
            except OSError:
                pass
            os.close(old)

    def release(self) -> None:
        if self._fd is None:
            return
        if _HELD.get(os.path.abspath(self.run_dir)) is self:
            del _HELD[os.path.abspath(self.run_dir)]
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
