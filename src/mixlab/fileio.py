"""Writing files so that a crash never leaves half of one, and holding a directory so that
two processes never write it at once.

* :func:`atomic_write` (:func:`write_atomic`, :func:`write_json`): every file mixlab writes that a
  crash must not corrupt (checkpoints, metrics, summaries, reports) goes through here. A file is
  written to a temporary file in the same directory (named ``.<name>.<random>.tmp``), flushed to
  disk, then renamed over the target with :func:`os.replace`; a crash leaves either the old file
  or the new one, and perhaps the temporary file, which :func:`remove_temporaries` deletes.
* :class:`DirectoryLock`: an exclusive ``flock`` on ``<directory>/.lock`` (the run directory of
  ``mixlab train``, the arena's directory). The operating system drops it when its process ends,
  however it ends, so a killed holder never leaves a stale lock.

This module imports nothing else of mixlab.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

PathLike = str | os.PathLike

__all__ = ["atomic_write", "write_atomic", "write_json", "remove_temporaries", "DirectoryLock", "DirectoryBusy"]


# -- atomic writes ---------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMPORARY_SUFFIX = ".tmp"
#: the name ``tempfile.mkstemp`` gives in :func:`atomic_write`: ``.<name>.`` + 8 of [a-z0-9_] + ``.tmp``
_TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(_TEMPORARY_SUFFIX))


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary file next to ``path``, fsync it, rename it to ``path``
    (mode 0644; ``tempfile`` would leave it 0600).

    On any error the temporary file is removed and ``path`` is left as it was. Every file
    mixlab writes that a crash must not leave half-written goes through here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: PathLike, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_atomic(path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically: a crash leaves the old file or
    the new one, never half of one (see :func:`atomic_write`)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def remove_temporaries(directory: PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left in ``directory`` (not below it)
    when its process was killed mid-write; returns them. Only safe while no other process writes
    the directory: call it holding the directory's :class:`DirectoryLock`."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        if _TEMPORARY_NAME.fullmatch(p.name) and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# -- one writer per directory ----------------------------------------------------------------------
LOCK_FILE = ".lock"


class DirectoryBusy(Exception):
    """Another process holds the :class:`DirectoryLock` of ``directory``: ``pid`` (None when it
    could not be read) and ``command``, as that process wrote them into the lock file."""

    def __init__(self, directory: Path, pid: int | None, command: str):
        self.directory, self.pid, self.command = directory, pid, command
        #: who holds it, for messages: "process 1234 (mixlab train ...)" or "another process"
        self.holder = f"process {pid} ({command})" if pid is not None else "another process"
        super().__init__(f"{directory} is held by {self.holder}")


def _command_line() -> str:
    """This process's command as its user typed it (``mixlab train ...`` also for ``python -m mixlab``)."""
    argv = list(sys.argv) or ["python"]
    first = Path(argv[0])
    argv[0] = first.parent.name if first.name == "__main__.py" else first.name
    return shlex.join(argv)


#: how long a refused DirectoryLock waits for the holder to write its pid and command (it writes them right
#: after it takes the lock: a refusal in between would read an empty file)
HOLDER_WAIT_S = 1.0


def _holder(fd: int) -> str:
    """The lock file's content (the holder's "pid command"), read again until it is there or
    :data:`HOLDER_WAIT_S` has passed."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if text.strip() or time.monotonic() >= deadline:
            return text
        time.sleep(0.01)


class DirectoryLock:
    """Hold ``directory`` (created if needed) for this process: an exclusive, non-blocking
    ``fcntl.flock`` on ``<directory>/.lock``, which holds the holder's pid and command while it is
    held and is emptied when it is released. Raises :class:`DirectoryBusy` when another process
    (or another ``DirectoryLock`` of this one) holds it. The lock ends with :meth:`release`, the
    ``with`` block, or the process, however it ends.
    """

    def __init__(self, directory: PathLike):
        import fcntl

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / LOCK_FILE
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's pid is in it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                pid, _, command = holder.strip().partition(" ")
                raise DirectoryBusy(self.directory, int(pid) if pid.isdigit() else None, command.strip()) from None
            # a holder that removed the file on release (release(remove=True)) may have done so between our
            # open and flock: then we hold a lock on a file nobody else will open; start again
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                break
            os.close(fd)
        self._fd: int | None = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {_command_line()}\n".encode())

    def release(self, remove: bool = False) -> None:
        """Empty the lock file (or, ``remove``, delete it) and let the lock go; a second call does nothing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if remove:
                self.path.unlink(missing_ok=True)
            else:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor of the open file releases the flock

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
