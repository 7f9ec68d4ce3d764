"""A directory of logged runs: one Parquet file per run plus a small manifest.

Layout::

    STORE/
      simfluence-store.json     format version, train_ids, test_ids, task meta
      runs/<run_id>.parquet     one file per finished run
      checkpoints/<run_id>/step-<t>.npz   optional: model weights after step t (0: the start)

Each run file has one row per step ``t = 0..T`` with columns

* ``step`` (int32),
* ``batch`` (list<int32>): training-example indices of step ``t`` (empty at ``t = 0``),
* ``loss`` (list<float32>, length M, or null where no evaluation was made),

and its schema metadata (key ``simfluence``) holds the run id, seed, run meta and a
digest of the store's id lists, so a file copied into the wrong store is rejected.
The files read as-is with pandas, pyarrow or duckdb.

Checkpoint files hold one array per state-dict entry (no pickle). A collector writes a
run's checkpoints before the run's Parquet file, so a finished run has all of them.

Every file is written atomically (temporary file, then rename), and the run list is
the directory listing, so an interrupted collection loses at most the run in progress
and a retried writer of the same run simply replaces an identical file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; creation is then only atomic, not exclusive
    fcntl = None  # type: ignore[assignment]  # None marks "no locks" below

from simfluence.runs.atomic import atomic_path, write_errors, write_text_atomic
from simfluence.runs.interchange import read_npz_arrays

if TYPE_CHECKING:
    import torch
from simfluence.runs.log import PAD, RUN_ID_PATTERN, RunDataError, RunLog, RunSet, check_run_id, validate_meta

MANIFEST = "simfluence-store.json"
FORMAT = "simfluence-runstore"
VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
CREATE_LOCK = ".simfluence-store.lock"
COLLECT_LOCK = ".simfluence-collect.lock"
STALE_SECONDS = 600.0
"""Temporary files older than this (seconds) are taken to be left by a killed writer."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``path`` (created if missing) for the block; waits for other holders."""
    with write_errors(path):
        handle = open(path, "a+")  # noqa: SIM115 - opened here so only its errors become write errors
    with handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ids_digest(train_ids: Iterable[str], test_ids: Iterable[str]) -> str:
    """A short hash of the training and test ids, in order."""
    digest = hashlib.sha256()
    for group in (train_ids, test_ids):
        digest.update("\x1f".join(map(str, group.tolist() if hasattr(group, "tolist") else group)).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def info_digest(info: dict) -> str:
    """Digest of a run file's info (its schema metadata, without this digest).

    The Parquet footer that holds it has no checksum of its own, and a run's meta (its learning
    rates) becomes the runs' meta.
    """
    rest = {key: value for key, value in info.items() if key != "info_digest"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:16]


def meta_digest(meta: dict) -> str:
    """Digest of a store's meta (every setting that decides its runs), recorded in each run file."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


class RunStore:
    """A run directory. Open an existing one with ``RunStore(path)``, make one with :meth:`create`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        source = str(manifest_path)
        if not manifest_path.is_file():
            raise RunDataError(str(self.root), MANIFEST, "is missing: not a run store",
                               "create one with RunStore.create or `simfluence collect`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise RunDataError(source, "<file>", f"is not valid JSON ({error.msg})") from None
        except (RecursionError, UnicodeDecodeError):
            raise RunDataError(source, "<file>", "is not a readable JSON manifest (nested too deeply or not text)") \
                from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise RunDataError(source, "format", f"expected '{FORMAT}'")
        if manifest.get("version") != VERSION:
            raise RunDataError(source, "version", f"unsupported version {manifest.get('version')!r}",
                               f"this simfluence reads version {VERSION}")
        # Validation of ids goes through RunSet.create's rules on an empty set.
        empty = RunSet.create(
            np.zeros((0, 1, 1), np.int32), np.zeros((0, 2, len(manifest.get("test_ids") or [None])), np.float32),
            manifest.get("train_ids", []), manifest.get("test_ids", []), meta=manifest.get("meta"), source=source,
        )
        self.train_ids = empty.train_ids
        self.test_ids = empty.test_ids
        self.meta = empty.meta
        self.digest = ids_digest(self.train_ids, self.test_ids)
        self.meta_digest = meta_digest(self.meta)

    # --- creation -----------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, train_ids, test_ids, meta: dict | None = None,
               exist_ok: bool = False) -> RunStore:
        """Create a store (atomically writing its manifest).

        With ``exist_ok``, an existing store is opened instead, provided its ids and meta
        equal the given ones; this is how an interrupted collection resumes.
        """
        root = Path(root)
        source = str(root / MANIFEST)
        ids = RunSet.create(np.zeros((0, 1, 1), np.int32), np.zeros((0, 2, len(test_ids)), np.float32),
                            train_ids, test_ids, meta=meta, source=source)
        with write_errors(root):
            root.mkdir(parents=True, exist_ok=True)
        # Check-and-create under an OS lock: two processes creating one new store (two recorders,
        # two collections) must not both write a manifest, the second silently replacing the first.
        with _locked(root / CREATE_LOCK):
            if (root / MANIFEST).exists():
                if not exist_ok:
                    raise RunDataError(str(root), MANIFEST, "already exists", "choose a new directory or resume")
                store = cls(root)
                if store.digest != ids_digest(ids.train_ids, ids.test_ids):
                    raise RunDataError(source, "train_ids/test_ids", "differ from the ids requested now",
                                       "use a new directory for a different task or data")
                if json.loads(json.dumps(ids.meta)) != store.meta:
                    raise RunDataError(source, "meta", "differs from the settings requested now",
                                       "resume with the same arguments, or use a new directory")
                return store
            manifest = {"format": FORMAT, "version": VERSION, "train_ids": ids.train_ids.tolist(),
                        "test_ids": ids.test_ids.tolist(), "meta": ids.meta}
            with write_errors(root / "runs"):
                (root / "runs").mkdir(parents=True, exist_ok=True)
            write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1))
        return cls(root)

    # --- exclusive use ------------------------------------------------------------
    @contextlib.contextmanager
    def collecting(self) -> Iterator[RunStore]:
        """Hold the store's collection lock for the block (an OS lock, released if the process dies).

        Two collections into one store would train the same runs twice and, with other
        settings, mix runs of different settings; the second one is refused at once with a
        :class:`RunDataError` naming the holder's PID.
        """
        path = self.root / COLLECT_LOCK
        with write_errors(path):   # a read-only store: one line, not a traceback
            handle = open(path, "a+")  # noqa: SIM115 - opened here so only its errors become write errors
        with handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise RunDataError(str(self.root), "lock", f"the store is in use by PID {holder} (another "
                                       "collection)", "wait for it to finish, or collect into another directory") \
                        from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            self.remove_stale_temporaries()
            try:
                yield self
            finally:
                handle.seek(0)
                handle.truncate()
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def remove_stale_temporaries(self, older_than: float = STALE_SECONDS) -> list[Path]:
        """Delete the temporary files that killed writers left, once ``older_than`` seconds old.

        Those are ``.<name>.*.tmp*`` beside the runs and checkpoints; returns the paths removed.

        Called when a collection takes the store's lock. A temporary younger than that may belong
        to a writer that is still at work (a recorder does not take the collection lock), so it stays.
        """
        import time

        removed = []
        now = time.time()
        for folder in (self.root / "runs", *sorted((self.root / "checkpoints").glob("*"))):
            if not folder.is_dir():
                continue
            for path in folder.glob(".*.tmp*"):
                try:
                    if now - path.stat().st_mtime > older_than:
                        path.unlink()
                        removed.append(path)
                except FileNotFoundError:   # its writer finished or removed it meanwhile
                    continue
        return removed

    # --- runs ---------------------------------------------------------------------
    def run_path(self, run_id: str) -> Path:
        """The Parquet file of run ``run_id`` (the id is checked)."""
        check_run_id(run_id, str(self.root))
        return self.root / "runs" / f"{run_id}.parquet"

    def run_ids(self) -> list[str]:
        """Ids of the finished runs, sorted."""
        directory = self.root / "runs"
        if not directory.is_dir():
            return []
        # pathlib's glob also matches dot-files: skip the ".<run>.parquet.*.tmp.parquet"
        # temporaries that a writer killed mid-write leaves behind.
        return sorted(path.stem for path in directory.glob("*.parquet") if RUN_ID_PATTERN.match(path.stem))

    def __contains__(self, run_id: str) -> bool:
        return self.run_path(run_id).is_file()

    def __len__(self) -> int:
        return len(self.run_ids())

    def write(self, log: RunLog) -> Path:
        """Validate and write one run atomically; an existing run of the same id is replaced."""
        path = self.run_path(log.run_id)
        log = log.validated(self.train_ids.size, self.test_ids.size, str(path))
        with atomic_path(path, suffix=".parquet") as temporary:
            pq.write_table(_run_to_table(log, self.digest, self.meta_digest), temporary, use_dictionary=False,
                           write_page_checksum=True)
        return path

    def read(self, run_id: str) -> RunLog:
        """Run ``run_id``, checked against the store."""
        return _table_to_run(self.run_path(run_id), self.digest, self.train_ids.size, self.test_ids.size,
                             self.meta_digest)

    def load(self, run_ids: Iterable[str] | None = None) -> RunSet:
        """All (or the given) runs as one :class:`RunSet`."""
        ids = self.run_ids() if run_ids is None else list(run_ids)
        logs = [self.read(run_id) for run_id in ids]
        meta = dict(self.meta)
        # The learning rate of every step, as the recorder saw the optimizer use it, when all runs agree.
        rates = [log.meta.get("learning_rates") for log in logs]
        if rates and rates[0] is not None and all(rate == rates[0] for rate in rates):
            meta.setdefault("learning_rates", rates[0])
        return RunSet.from_logs(logs, self.train_ids, self.test_ids, meta, source=str(self.root))

    # --- checkpoints --------------------------------------------------------------
    def checkpoint_path(self, run_id: str, step: int) -> Path:
        """The ``.npz`` file of run ``run_id``'s checkpoint after ``step``."""
        return self.run_path(run_id).parent.parent / "checkpoints" / run_id / f"step-{int(step):06d}.npz"

    def write_checkpoint(self, run_id: str, step: int, state: dict[str, torch.Tensor]) -> Path:
        """Write the model ``state`` (a state dict) after ``step`` of run ``run_id`` atomically."""
        path = self.checkpoint_path(run_id, step)
        with write_errors(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npz") as temporary:
            # numpy's stubs let ``**arrays`` fill ``allow_pickle`` (a bool): a false alarm
            np.savez(temporary, **{f"state.{key}": value.detach().cpu().numpy()  # type: ignore[arg-type]
                                   for key, value in state.items()})
        return path

    def checkpoint_steps(self, run_id: str) -> list[int]:
        """Steps of run ``run_id`` with a stored checkpoint, sorted (empty if none)."""
        directory = self.checkpoint_path(run_id, 0).parent
        if not directory.is_dir():
            return []
        matches = (CHECKPOINT_PATTERN.match(path.stem) for path in directory.glob("step-*.npz"))
        return sorted(int(match.group(1)) for match in matches if match)

    def read_checkpoint(self, run_id: str, step: int) -> dict[str, torch.Tensor]:
        """The state dict stored after ``step`` of run ``run_id`` (loaded without unpickling)."""
        import torch  # here, not at the top: reading runs (and starting the CLI) need no torch

        path = self.checkpoint_path(run_id, step)
        if not path.is_file():
            raise RunDataError(str(path), "checkpoint", f"run '{run_id}' has no checkpoint at step {step}",
                               f"stored steps: {self.checkpoint_steps(run_id) or 'none'}; collect with "
                               "--checkpoint-steps")
        arrays = read_npz_arrays(path, ())
        return {key.removeprefix("state."): torch.from_numpy(value) for key, value in arrays.items()
                if key.startswith("state.")}

    def stored_checkpoint(self, run_id: str, step: int) -> StoredCheckpoint:
        """Run ``run_id``'s state after ``step`` as a read-on-access mapping (nothing held in memory).

        For reading many big checkpoints one after another (e.g. TRAK's ensemble): each tensor is
        read from the file when it is looked up, so ``model.load_state_dict`` of one of them holds
        only that one state for the duration of the call.
        """
        path = self.checkpoint_path(run_id, step)
        if not path.is_file():
            self.read_checkpoint(run_id, step)   # the error naming the stored steps
        return StoredCheckpoint(path)

    def __repr__(self) -> str:
        return f"RunStore('{self.root}', runs={len(self)}, train={self.train_ids.size}, test={self.test_ids.size})"


class StoredCheckpoint(Mapping):
    """A state dict stored as ``.npz`` (:meth:`RunStore.write_checkpoint`), read one tensor per lookup.

    Keys are the state dict's keys; ``state[key]`` reads that member (without unpickling) as a tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as archive:
            members = [name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy")]
        self._keys = tuple(name.removeprefix("state.") for name in members if name.startswith("state."))

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch

        if key not in self._keys:
            raise KeyError(key)
        member = f"state.{key}"
        return torch.from_numpy(read_npz_arrays(self.path, (member,), ())[member])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"StoredCheckpoint('{self.path}', tensors={len(self._keys)})"


def _run_to_table(log: RunLog, digest: str, store_meta_digest: str) -> pa.Table:
    _, num_test = log.losses.shape
    steps = np.arange(log.num_steps + 1, dtype=np.int32)
    # Batches: strip padding, step 0 has an empty batch.
    kept = log.curriculum != PAD
    batch_offsets = np.concatenate([[0, 0], np.cumsum(kept.sum(axis=1))]).astype(np.int32)
    batch = pa.ListArray.from_arrays(pa.array(batch_offsets), pa.array(log.curriculum[kept].astype(np.int32)))
    # Losses: a list per step, null where the step was not evaluated.
    evaluated = np.zeros(steps.size, dtype=bool)
    evaluated[log.eval_steps] = True
    lengths = np.where(evaluated, num_test, 0)
    loss_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    loss = pa.ListArray.from_arrays(pa.array(loss_offsets), pa.array(log.losses.reshape(-1)),
                                    mask=pa.array(~evaluated))
    info = {"run_id": log.run_id, "seed": log.seed, "meta": log.meta, "ids_digest": digest,
            "store_meta_digest": store_meta_digest, "version": VERSION}
    info["info_digest"] = info_digest(json.loads(json.dumps(info)))
    table = pa.table({"step": steps, "batch": batch, "loss": loss})
    return table.replace_schema_metadata({"simfluence": json.dumps(info)})


def _is_list_of(kind: pa.DataType, fits) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and fits(kind.value_type)


def _table_to_run(path: Path, digest: str, num_train: int, num_test: int, store_meta_digest: str) -> RunLog:
    source = str(path)
    if not path.is_file():
        raise RunDataError(source, "<file>", "does not exist")
    try:
        # Page checksums (written since this version) catch bytes flipped inside a data page.
        table = pq.read_table(path, page_checksum_verification=True)
        names = table.column_names   # decoded here: a damaged name is not UTF-8 (a ValueError)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise RunDataError(source, "<file>", f"is not a readable Parquet file or is corrupted ({error})",
                           "delete it and collect that run again") from None
    for column, expected, fits in (("step", "integers", pa.types.is_integer),
                                   ("batch", "lists of integers", lambda kind: _is_list_of(kind, pa.types.is_integer)),
                                   ("loss", "lists of floats", lambda kind: _is_list_of(kind, pa.types.is_floating))):
        if column not in names:
            raise RunDataError(source, column, "is missing", f"the file has columns {names}")
        kind = table.schema.field(column).type
        if not fits(kind):   # a damaged footer can retype a column
            raise RunDataError(source, column, f"holds {kind}, expected {expected}", "delete it and collect that run "
                               "again")
    raw = (table.schema.metadata or {}).get(b"simfluence")
    if raw is None:
        raise RunDataError(source, "simfluence (schema metadata)", "is missing: not written by a RunStore")
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        info = None
    if not isinstance(info, dict):
        raise RunDataError(source, "simfluence (schema metadata)", "is not a JSON object")
    if info.get("version") != VERSION:
        raise RunDataError(source, "version", f"unsupported run-file version {info.get('version')!r}",
                           f"this simfluence reads version {VERSION}")
    saved = info.get("info_digest")   # absent in run files written before it was recorded
    if saved is not None and saved != info_digest(info):
        raise RunDataError(source, "info_digest", "the run's info (id, seed, meta, digests) does not match the digest "
                           "saved with it (the file was altered or damaged)", "delete it and collect that run again")
    written_with = info.get("store_meta_digest")   # absent in run files written before it was recorded
    if written_with is not None and written_with != store_meta_digest:
        raise RunDataError(source, "store_meta_digest", "the run was collected with other settings than this store's "
                           "(task, learning rate, steps, sampler, ...)", "keep runs of different collections in "
                           "different stores")
    if info.get("ids_digest") != digest:
        raise RunDataError(source, "ids_digest", "the run was logged with other training/test ids than this store",
                           "keep runs of different tasks in different stores")
    steps = table.column("step").to_numpy()
    if not np.array_equal(steps, np.arange(steps.size)):
        raise RunDataError(source, "step", "rows must be steps 0, 1, ..., T in order")
    batch = table.column("batch").combine_chunks()
    lengths = batch.value_lengths().to_numpy(zero_copy_only=False)[1:]
    width = int(lengths.max()) if lengths.size else 0
    curriculum = np.full((steps.size - 1, width), PAD, dtype=np.int64)
    values = batch.flatten().to_numpy(zero_copy_only=False)
    curriculum[np.arange(width)[None, :] < lengths[:, None]] = values
    loss = table.column("loss").combine_chunks()
    evaluated = loss.is_valid().to_numpy(zero_copy_only=False)
    loss_lengths = loss.value_lengths().to_numpy(zero_copy_only=False)[evaluated]
    if (loss_lengths != num_test).any():
        raise RunDataError(source, "loss", f"rows must hold {num_test} losses (one per test id)")
    losses = loss.flatten().to_numpy(zero_copy_only=False).reshape(-1, num_test)
    log = RunLog(str(info.get("run_id", path.stem)), curriculum, losses, np.flatnonzero(evaluated),
                 info.get("seed"), validate_meta(info.get("meta"), source))
    if log.run_id != path.stem:
        raise RunDataError(source, "run_id", f"{log.run_id!r} does not match the file name")
    return log.validated(num_train, num_test, source)


def load_runs(path: str | os.PathLike) -> RunSet:
    """Load a run store directory or an interchange ``.npz`` file."""
    from simfluence.runs.interchange import read_interchange

    path = Path(path)
    if path.is_dir():
        return RunStore(path).load()
    if path.suffix == ".npz" or path.is_file():
        return read_interchange(path)
    raise RunDataError(str(path), "<file>", "does not exist", "give a run store directory or an interchange .npz")


def save_runs(runs: RunSet, path: str | os.PathLike) -> None:
    """Write ``runs`` as an interchange file (``.npz`` suffix) or as a new run store directory."""
    from simfluence.runs.interchange import write_interchange

    path = Path(path)
    if path.suffix == ".npz":
        write_interchange(runs, path)
        return
    store = RunStore.create(path, runs.train_ids, runs.test_ids, runs.meta)
    for log in runs.logs():
        store.write(log)
