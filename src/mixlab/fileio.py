"""Writing files so that a crash never leaves half of one: every file mixlab writes that a
crash must not corrupt (checkpoints, metrics, summaries, reports) goes through here.

A file is written to a temporary file in the same directory (named ``.<name>.<random>.tmp``),
flushed to disk, then renamed over the target with :func:`os.replace`; a crash leaves either
the old file or the new one. This module imports nothing else of mixlab.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

PathLike = str | os.PathLike

__all__ = ["atomic_write", "write_atomic", "write_json"]


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


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary file next to ``path``, fsync it, rename it to ``path``
    (mode 0644; ``tempfile`` would leave it 0600).

    On any error the temporary file is removed and ``path`` is left as it was. Every file
    mixlab writes that a crash must not leave half-written goes through here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
