"""Atomic file writes: write beside the target, flush to disk, then rename over it.

A reader (or a resumed collection) sees either the old file or the complete new one,
never a half-written file, even if the writer is killed mid-write.

A write that the system refuses (disk full, file too large, read-only or not writable
directory, something in the way) raises :class:`~simfluence.errors.WriteError`, one line
naming the path and the fix, and leaves the target as it was and no temporary behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from simfluence.errors import WriteError

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


_PROC_UMASK = _umask_from_proc()
_IMPORT_UMASK: int = _umask_at_import() if _PROC_UMASK is None else _PROC_UMASK


def current_umask() -> int:
    """The process umask, read without changing it.

    Setting the umask to read it (``os.umask(0)`` then restoring) is a race when several
    threads write at once: another thread may create files while the umask is 0. Where
    ``/proc`` has no ``Umask:`` line, this is the umask at import time.
    """
    umask = _umask_from_proc()
    return _IMPORT_UMASK if umask is None else umask


_FIXES = {
    errno.ENOSPC: "the disk is full: free some space, or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space, or write somewhere else",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f, or the file system's limit): raise the "
                 "limit, or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "permission denied: write to a directory you may write to",
    errno.EPERM: "not permitted: write to a directory you may write to",
    errno.EISDIR: "a directory is in the way: give a file name",
    errno.ENOTDIR: "a part of the path is a file, not a directory: give another path",
    errno.EEXIST: "a file is in the way of a directory: give another path",
    errno.ENAMETOOLONG: "the name is too long: give a shorter path",
    errno.ENOENT: "the directory does not exist: create it, or give another path",
}
"""The operating system's refusals to write that :func:`write_errors` turns into a :class:`WriteError`, with the fix."""


def write_error(path: str | os.PathLike, error: OSError) -> WriteError | OSError:
    """``error`` (raised while writing ``path``) as a one-line :class:`WriteError`.

    The :class:`WriteError` names the path and the fix; ``error`` itself is returned when it is
    not one of the refusals in :data:`_FIXES`.
    """
    if isinstance(error, WriteError) or error.errno not in _FIXES:
        return error
    reason = os.strerror(error.errno)   # pyarrow's strerror is a sentence around it
    written = WriteError(f"{path}: cannot write: {reason} ({_FIXES[error.errno]})")
    written.errno, written.strerror, written.filename = error.errno, reason, str(path)
    return written


@contextlib.contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Raise the system's refusals to write inside the block as a one-line :class:`WriteError`.

    The refusals are those in :data:`_FIXES`, the error names ``path``; other errors pass unchanged.
    """
    try:
        yield
    except OSError as error:
        mapped = write_error(path, error)
        if mapped is error:
            raise
        raise mapped from None


def check_writable(target: str | os.PathLike) -> Path:
    """Fail now, before any work, when file ``target`` could not be written.

    Its directory is missing or not writable, or a directory is in its place. Creates and
    removes a temporary file beside it.

    Raises:
        WriteError: naming the path and the fix.
    """
    target = Path(target)
    if target.is_dir():
        raise write_error(target, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    directory = target.parent
    if not directory.is_dir():
        problem = errno.ENOTDIR if directory.exists() else errno.ENOENT
        raise write_error(directory, OSError(problem, os.strerror(problem)))
    with write_errors(target):
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        os.close(handle)
        os.unlink(name)
    return target


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it to ``target`` on success.

    ``suffix`` keeps a file extension on the temporary name for writers that insist on one
    (NumPy's ``savez`` appends ``.npz`` otherwise).
    """
    target = Path(target)
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
        os.close(handle)
    temporary = Path(name)
    try:
        with write_errors(target):
            # mkstemp creates 0600; give the file the permissions a plain open() would.
            os.chmod(temporary, 0o666 & ~current_umask())
            yield temporary
            with open(temporary, "rb+") as stream:
                os.fsync(stream.fileno())
            os.replace(temporary, target)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically (see :func:`atomic_path`)."""
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
