"""An on-disk cache for things computed once per machine (embeddings, checkpoints, gradient priors, retrainings).

Folder: ``$SIMFLUENCE_CACHE`` (default ``~/.cache/simfluence``). An entry is a dict of
tensors, saved under a hash of everything it was computed from. The first process to
need an entry computes it while holding a file lock, writes it to a temporary file and
renames it into place; every other process waits for the lock and then loads the file,
so all worker processes of a collection get bit-identical tensors. Entries are read with
``torch.load(weights_only=True)``: loading never executes code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

CACHE_FORMAT = 1


def cache_dir() -> Path:
    """``$SIMFLUENCE_CACHE``, default ``~/.cache/simfluence``."""
    return Path(os.environ.get("SIMFLUENCE_CACHE") or Path.home() / ".cache" / "simfluence")


def cache_key(kind: str, config: dict) -> str:
    """File stem ``<kind>-<hash of config>``."""
    text = json.dumps({"format": CACHE_FORMAT, "kind": kind, **config}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def package_version() -> str:
    """The installed simfluence version (``"source"`` when run from a source tree), for cache keys."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("simfluence")
    except PackageNotFoundError:
        return "source"


def cached_tensors(kind: str, config: dict, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``compute()`` once per machine and config, shared by all processes (see the module doc).

    If the cache folder cannot be created, computes in memory with a warning.
    """
    key = cache_key(kind, config)
    folder = cache_dir()
    path = folder / f"{key}.pt"
    if path.exists():
        return _load(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{key}.lock", "a+")  # noqa: SIM115 - opened here so only its errors fall back
    except OSError as error:
        import warnings

        warnings.warn(f"simfluence cache {folder} is not writable ({error}); computing {kind} in memory "
                      "(set SIMFLUENCE_CACHE to a writable folder)", stacklevel=2)
        return compute()
    with lock:
        _lock(lock)
        if path.exists():  # another process computed it while we waited
            return _load(path)
        tensors = {name: value.detach().contiguous().clone() for name, value in compute().items()}
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                torch.save({"config": json.dumps(config, sort_keys=True, default=str), "tensors": tensors}, out)
            os.chmod(temporary, 0o644)  # mkstemp makes 0600; let others read a shared cache
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    return _load(path)  # what every other process will load, to the bit


def _lock(handle) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock, the atomic rename still keeps files whole
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["tensors"]
    except Exception as error:  # a corrupt entry (e.g. disk full): say which file to delete
        raise RuntimeError(f"{path}: unreadable simfluence cache entry ({error}); delete it and retry") from error


def cached_scores(kind: str, config: dict, compute: Callable[[], dict[str, torch.Tensor]], shape: tuple[int, ...],
                  what: str, disk_cache: bool = True) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """float64 ``compute()["scores"]`` of ``shape``, kept under ``kind`` (:func:`cached_tensors`) with ``disk_cache``.

    Checked for their shape and finite values whether computed or read back (a bad cached entry:
    the error names the files to delete). Returns the scores and every tensor of the entry.
    """
    tensors = cached_tensors(kind, config, compute) if disk_cache else compute()
    scores = tensors["scores"].numpy()
    if scores.shape != tuple(shape) or not np.isfinite(scores).all():
        fix = f"; delete the {kind}-* files in {cache_dir()} and compute them again" if disk_cache else ""
        raise RuntimeError(f"{what} have shape {scores.shape} (expected {tuple(shape)}) or non-finite values{fix}")
    return scores.astype(np.float64), tensors     # the same dtype whether computed or read from disk
