"""Atomic file writes: write beside the target, flush to disk, then rename over it.

A reader (or a resumed collection) sees either the old file or the complete new one,
never a half-written file, even if the writer is killed mid-write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def _umask_from_proc() -> int | None:
    """The umask from ``/proc/self/status`` (Linux >= 4.7), or ``None`` where that line is missing."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as stream:
            for line in stream:
                if line.startswith("Umask:"):
                    return int(line.split(":", 1)[1].strip(), 8)
    except (OSError, ValueError):
        return None
    return None


def _umask_at_import() -> int:
    # os.umask can only be read by setting it; do that once, at import, under a lock.
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


_IMPORT_UMASK = _umask_from_proc()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it.

    Setting the umask to read it (``os.umask(0)`` then restoring) is a race when several
    threads write at once: another thread may create files while the umask is 0. Where
    ``/proc`` has no ``Umask:`` line, this is the umask at import time.
    """
    umask = _umask_from_proc()
    return _IMPORT_UMASK if umask is None else umask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it to ``target`` on success.

    ``suffix`` keeps a file extension on the temporary name for writers that insist on one
    (NumPy's ``savez`` appends ``.npz`` otherwise).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    # mkstemp creates 0600; give the file the permissions a plain open() would.
    os.chmod(temporary, 0o666 & ~current_umask())
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
