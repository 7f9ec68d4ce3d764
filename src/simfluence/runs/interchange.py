"""The ``.npz`` interchange file: the public exchange format for logged runs.

==============  =========================  ==================================================
array           dtype, shape               meaning
==============  =========================  ==================================================
``curricula``   int32 ``[R, T, B]``        training-example index per batch slot; -1 pads
``losses``      float32 ``[R, K, M]``      loss of each test example at each eval step
``train_ids``   str ``[N]``                ids that ``curricula`` indexes
``test_ids``    str ``[M]``                ids of the test examples
``meta``        str (JSON)                 task, model, optimizer, learning rate, ...
``eval_steps``  int32 ``[K]`` (optional)   recorded steps; default ``0..T`` (``K = T + 1``)
``run_ids``     str ``[R]`` (optional)     names of the runs
==============  =========================  ==================================================

Files are read with ``allow_pickle=False``: loading never executes code.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from simfluence.errors import UsageError
from simfluence.runs.atomic import atomic_path
from simfluence.runs.log import RunDataError, RunSet

REQUIRED = ("curricula", "losses", "train_ids", "test_ids", "meta")
OPTIONAL = ("eval_steps", "run_ids")


MAX_ARRAY_BYTES = int(os.environ.get("SIMFLUENCE_MAX_NPZ_BYTES", 16 << 30))
"""Largest total size (bytes) the arrays of one ``.npz`` may declare; ``$SIMFLUENCE_MAX_NPZ_BYTES`` overrides."""


def read_npz_arrays(path: str | os.PathLike, required: tuple[str, ...], optional: tuple[str, ...] | None = None,
                    prefixes: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Load arrays of an ``.npz`` file without pickle, after checking every member's header.

    Args:
        path: the ``.npz`` file.
        required: members that must be present (a :class:`RunDataError` names the first missing one).
        optional: other members to load when present; ``None`` loads every member.
        prefixes: with ``optional``, also load the members whose names start with one of these.

    Before any data is read, each loaded member's ``.npy`` header is parsed: object dtypes are
    refused (they would need pickle), the declared size must match the member's size in the
    archive (a truncated member is named as such), and the declared sizes together must stay
    under :data:`MAX_ARRAY_BYTES`, so a small file cannot make a huge allocation.
    """
    source = str(path)
    if not Path(path).is_file():
        raise RunDataError(source, "<file>", "does not exist")
    if not zipfile.is_zipfile(path):
        raise RunDataError(source, "<file>", "is not an .npz archive", "write it with numpy.savez")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()
                       if info.filename.endswith(".npy")}
            missing = [name for name in required if name not in members]
            if missing:
                raise RunDataError(source, missing[0], "is missing", f"the file holds {sorted(members)}")
            wanted = sorted(members) if optional is None else sorted(
                name for name in members
                if name in required or name in optional or name.startswith(prefixes or ("\0",)))
            total = 0
            for name in wanted:
                total += _checked_header(archive, members[name], name, source)
                if total > MAX_ARRAY_BYTES:
                    raise RunDataError(source, name, f"the arrays declare more than {MAX_ARRAY_BYTES} bytes",
                                       "raise SIMFLUENCE_MAX_NPZ_BYTES if the file is genuine")
        with np.load(path, allow_pickle=False) as loaded:
            return {name: loaded[name] for name in wanted}
    except RunDataError:   # a ValueError too: already names the member and the problem
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, struct.error, NotImplementedError,
            RuntimeError) as error:
        # Damaged zip headers: a flipped flag bit reads as encryption (RuntimeError) or an unknown
        # compression method (NotImplementedError), a damaged deflate stream as zlib.error.
        raise RunDataError(source, "<file>", f"is not a readable .npz archive ({error})") from None


def _checked_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, source: str) -> int:
    """Bytes that member ``name`` declares, after checking its header (see :func:`read_npz_arrays`)."""
    with archive.open(info) as stream:
        try:
            version = np.lib.format.read_magic(stream)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in reader:
                raise UsageError(f"unsupported .npy version {version}")
            shape, _, dtype = reader[version](stream)
            header_length = stream.tell()
        except ValueError as error:
            raise RunDataError(source, name, f"has no readable .npy header ({error})") from None
    if dtype.hasobject:
        raise RunDataError(source, name, "is an object array, which would need pickle to load",
                           "save strings as fixed-width str arrays, e.g. np.array(ids, dtype=str)")
    declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if header_length + declared != info.file_size:
        problem = "is truncated" if header_length + declared > info.file_size else "holds more bytes than declared"
        raise RunDataError(source, name, f"{problem} (header says {declared} bytes of data, the archive holds "
                           f"{info.file_size - header_length})", "write the file again")
    return declared


def _meta_text(arrays: dict[str, np.ndarray], source: str) -> str:
    meta = arrays["meta"]
    if meta.dtype.kind != "U" or meta.size != 1:
        raise RunDataError(source, "meta", f"expected one JSON string, got dtype {meta.dtype} shape {meta.shape}")
    return str(meta.reshape(()))


def read_interchange(path: str | os.PathLike) -> RunSet:
    """Read and validate an interchange file."""
    source = str(path)
    arrays = read_npz_arrays(path, REQUIRED, OPTIONAL)
    return RunSet.create(
        curricula=arrays["curricula"],
        losses=arrays["losses"],
        train_ids=arrays["train_ids"],
        test_ids=arrays["test_ids"],
        eval_steps=arrays.get("eval_steps"),
        run_ids=arrays.get("run_ids"),
        meta=_meta_text(arrays, source),
        source=source,
    )


def write_interchange(runs: RunSet, path: str | os.PathLike) -> Path:
    """Write ``runs`` atomically as an interchange file; returns the path."""
    path = Path(path)
    with atomic_path(path, suffix=".npz") as temporary:
        np.savez(
            temporary,
            curricula=runs.curricula.astype(np.int32),
            losses=runs.losses.astype(np.float32),
            train_ids=runs.train_ids.astype(str),
            test_ids=runs.test_ids.astype(str),
            meta=np.array(json.dumps(runs.meta)),
            eval_steps=runs.eval_steps.astype(np.int32),
            run_ids=runs.run_ids.astype(str),
        )
    return path
