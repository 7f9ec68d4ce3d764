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
import zipfile
from pathlib import Path

import numpy as np

from simfluence.runs.atomic import atomic_path
from simfluence.runs.log import RunDataError, RunSet

REQUIRED = ("curricula", "losses", "train_ids", "test_ids", "meta")
OPTIONAL = ("eval_steps", "run_ids")


def read_npz_arrays(path: str | os.PathLike, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file without pickle; missing ``required`` fields raise."""
    source = str(path)
    if not Path(path).is_file():
        raise RunDataError(source, "<file>", "does not exist")
    if not zipfile.is_zipfile(path):
        raise RunDataError(source, "<file>", "is not an .npz archive", "write it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            missing = [name for name in required if name not in names]
            if missing:
                raise RunDataError(source, missing[0], "is missing", f"the file holds {sorted(names)}")
            arrays = {}
            for name in names:
                try:
                    arrays[name] = archive[name]
                except ValueError:
                    raise RunDataError(source, name, "is an object array, which would need pickle to load",
                                       "save strings as fixed-width str arrays, e.g. np.array(ids, dtype=str)") from None
            return arrays
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise RunDataError(source, "<file>", f"is not a readable .npz archive ({error})") from None


def _meta_text(arrays: dict[str, np.ndarray], source: str) -> str:
    meta = arrays["meta"]
    if meta.dtype.kind != "U" or meta.size != 1:
        raise RunDataError(source, "meta", f"expected one JSON string, got dtype {meta.dtype} shape {meta.shape}")
    return str(meta.reshape(()))


def read_interchange(path: str | os.PathLike) -> RunSet:
    """Read and validate an interchange file."""
    source = str(path)
    arrays = read_npz_arrays(path, REQUIRED)
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
