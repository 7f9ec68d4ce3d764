"""In-memory data model of logged training runs.

A *training run* is a curriculum ``c_1..c_T`` (the training-example indices of the
batch at each optimizer step) together with the loss of every test example before
training (step 0) and after some or all steps.

* :class:`RunLog` holds one run.
* :class:`RunSet` holds several runs that share their training set, test set, number
  of steps and evaluation steps, as stacked arrays. It is what simulators fit on and
  what the interchange ``.npz`` file stores.

Every constructor path validates its input and raises :class:`RunDataError`, a
one-line message naming the source, the field and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simfluence.errors import SimfluenceError, UsageError

PAD = -1
"""Curriculum entry that pads a batch smaller than the widest batch."""

MAX_RUN_ID_LENGTH = 200
RUN_ID_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_RUN_ID_LENGTH - 1}}}\Z")
r"""A run id: 1 to 200 letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit (it names a file).

Anchored with ``\Z``, not ``$``, which would let a trailing newline through."""


class RunDataError(SimfluenceError, ValueError):
    """Bad run data: names the file (or other source), the field and what to do."""

    def __init__(self, source: str, field_name: str, problem: str, fix: str = ""):
        self.source = source
        self.field = field_name
        self.problem = problem
        message = f"{source}: field '{field_name}': {problem}"
        if fix:
            message += f" ({fix})"
        # One line, whatever the problem quotes (a library's multi-line error, a run id with a newline).
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", message).strip())


def _as_str_array(values: Any, source: str, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise RunDataError(source, name, f"expected a 1-D list of strings, got shape {array.shape}")
    if array.size and array.dtype.kind not in "UO":
        raise RunDataError(source, name, f"expected strings, got dtype {array.dtype}", "store ids as str")
    array = array.astype(str)
    if array.size == 0:
        raise RunDataError(source, name, "is empty", "a run needs at least one id")
    unique, counts = np.unique(array, return_counts=True)
    if (counts > 1).any():
        dup = unique[counts > 1][:3].tolist()
        raise RunDataError(source, name, f"duplicate ids {dup}", "ids must be unique")
    return array


def check_run_id(run_id: Any, source: str, name: str = "run_id") -> str:
    """``run_id`` if it is a safe file name (:data:`RUN_ID_PATTERN`), else a :class:`RunDataError`.

    The error names what is wrong: a control character (a trailing newline, say), a path
    separator, the length.
    """
    fix = f"use 1 to {MAX_RUN_ID_LENGTH} letters, digits, '.', '_' and '-', starting with a letter or digit"
    if not isinstance(run_id, str):
        raise RunDataError(source, name, f"expected a string, got {type(run_id).__name__}", fix)
    if RUN_ID_PATTERN.match(run_id):
        return run_id
    shown = repr(run_id if len(run_id) <= 60 else run_id[:60] + "...")   # repr: a newline shows as \n
    if not run_id:
        raise RunDataError(source, name, "is empty", fix)
    problem = f"{shown} is not a safe file name"
    if any(ord(char) < 32 or ord(char) == 127 for char in run_id):
        problem += ": it holds a control character"
    elif "/" in run_id or "\\" in run_id:
        problem += ": it holds a path separator"
    elif len(run_id) > MAX_RUN_ID_LENGTH:
        problem += f": it is {len(run_id)} characters long, more than {MAX_RUN_ID_LENGTH}"
    raise RunDataError(source, name, problem, fix)


def _check_ids_equal(a: np.ndarray, b: np.ndarray, source: str, name: str) -> None:
    if a.shape != b.shape or not np.array_equal(a, b):
        raise RunDataError(
            source, name, "differs from the other runs' list",
            "all runs in one set must share the same training and test ids in the same order",
        )


def validate_curriculum(curriculum: Any, num_train: int, source: str, name: str = "curriculum") -> np.ndarray:
    """Return ``curriculum`` as int32 after checking dtype, index range and empty steps.

    Works on any leading shape ``[..., T, B]``.
    """
    array = np.asarray(curriculum)
    if array.dtype.kind not in "iu":
        raise RunDataError(source, name, f"expected integer indices, got dtype {array.dtype}")
    if array.ndim < 2:
        raise RunDataError(source, name, f"expected shape [..., steps, batch], got {array.shape}")
    if array.shape[-1] == 0 or array.shape[-2] == 0:
        raise RunDataError(source, name, f"has no steps or an empty batch dimension: shape {array.shape}")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < PAD or high >= num_train:
            raise RunDataError(
                source, name, f"index out of range [{low}, {high}]",
                f"entries must lie in [0, {num_train - 1}] (the training ids) or be {PAD} for padding",
            )
        if (array == PAD).all(axis=-1).any():
            raise RunDataError(source, name, "a step has an empty batch (all entries are -1)",
                               "every step must train on at least one example")
    return array.astype(np.int32, copy=False)


def check_indices(index: Any, size: int, name: str) -> np.ndarray:
    """int64 ``[K]`` indices into ``size`` rows (``None``: all of ``0..size-1``; a scalar: one).

    Raises a ``ValueError`` naming ``name`` unless ``index`` is a non-empty 1-D integer array
    with every entry in ``0..size-1``.
    """
    if index is None:
        return np.arange(size, dtype=np.int64)
    array = np.atleast_1d(np.asarray(index))
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iu":
        raise UsageError(f"{name}: expected a non-empty 1-D list of integer indices, got {array.dtype} "
                         f"of shape {array.shape}")
    if array.min() < 0 or array.max() >= size:
        raise UsageError(f"{name}: indices must lie in 0..{size - 1}, got {array.min()}..{array.max()}")
    return array.astype(np.int64)


def validate_eval_steps(eval_steps: Any, num_steps: int, source: str) -> np.ndarray:
    """int32 ``eval_steps``, checked: 1-D, starting at 0, increasing, at most ``num_steps``."""
    array = np.asarray(eval_steps)
    if array.ndim != 1 or array.size == 0:
        raise RunDataError(source, "eval_steps", f"expected a non-empty 1-D array, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise RunDataError(source, "eval_steps", f"expected integers, got dtype {array.dtype}")
    if array[0] != 0:
        raise RunDataError(source, "eval_steps", f"must start at 0 (the loss before training), starts at {array[0]}")
    if (np.diff(array) <= 0).any():
        raise RunDataError(source, "eval_steps", "must be strictly increasing")
    if array[-1] > num_steps:
        raise RunDataError(source, "eval_steps", f"step {array[-1]} is past the last step {num_steps}")
    return array.astype(np.int32, copy=False)


def validate_losses(losses: Any, source: str, name: str = "losses") -> np.ndarray:
    """float32 ``losses``, checked finite (a :class:`RunDataError` naming ``name`` otherwise)."""
    array = np.asarray(losses)
    if array.dtype.kind not in "fiu":
        raise RunDataError(source, name, f"expected floating-point losses, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0].tolist()
        raise RunDataError(source, name, f"contains NaN or inf (first at index {bad})",
                           "drop or re-run diverged runs")
    return array


def validate_meta(meta: Any, source: str) -> dict:
    """``meta`` (a dict, JSON text or ``None``) as a JSON-serialisable dict, checked."""
    if meta is None:
        return {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta else {}
        except json.JSONDecodeError as error:
            raise RunDataError(source, "meta", f"is not valid JSON: {error.msg}") from None
        except RecursionError:
            raise RunDataError(source, "meta", "is nested too deeply", "keep meta a shallow JSON object") from None
    if not isinstance(meta, dict):
        raise RunDataError(source, "meta", f"expected a JSON object, got {type(meta).__name__}")
    try:
        json.dumps(meta)
    except TypeError as error:
        raise RunDataError(source, "meta", f"is not JSON-serialisable: {error}") from None
    except (RecursionError, ValueError):
        raise RunDataError(source, "meta", "is nested too deeply or circular", "keep meta a shallow JSON object") \
            from None
    return meta


@dataclass(frozen=True)
class RunLog:
    """One logged training run.

    Attributes:
        run_id: unique name of the run within its store.
        curriculum: int32 ``[T, B]``; entry ``[t-1, j]`` is the training-example index
            trained on in slot ``j`` of step ``t``; ``-1`` pads a smaller batch.
        losses: float32 ``[K, M]``; loss of each of the ``M`` test examples at each
            evaluation step (nats, as the task's loss function reports it).
        eval_steps: int32 ``[K]``; the steps at which ``losses`` were recorded,
            ``eval_steps[0] == 0`` (before training).
        seed: the seed that drew the curriculum, when there was one.
        meta: JSON-serialisable facts about this run (learning rate, ...).
    """

    run_id: str
    curriculum: np.ndarray
    losses: np.ndarray
    eval_steps: np.ndarray
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        """Number of training steps ``T``."""
        return int(self.curriculum.shape[0])

    @property
    def batch_size(self) -> int:
        """Batch size ``B`` (slots per step, padding included)."""
        return int(self.curriculum.shape[1])

    def validated(self, num_train: int, num_test: int, source: str) -> RunLog:
        """Return a copy with canonical dtypes, or raise :class:`RunDataError`."""
        check_run_id(self.run_id, source)
        curriculum = validate_curriculum(self.curriculum, num_train, source)
        if curriculum.ndim != 2:
            raise RunDataError(source, "curriculum", f"expected shape [steps, batch], got {curriculum.shape}")
        eval_steps = validate_eval_steps(self.eval_steps, curriculum.shape[0], source)
        losses = validate_losses(self.losses, source)
        if losses.shape != (eval_steps.size, num_test):
            raise RunDataError(
                source, "losses", f"shape {losses.shape} does not match (len(eval_steps), len(test_ids)) = "
                f"({eval_steps.size}, {num_test})",
            )
        return RunLog(self.run_id, curriculum, losses, eval_steps, self.seed, validate_meta(self.meta, source))


@dataclass(frozen=True)
class RunSet:
    """Several runs with one training set, test set, step count and evaluation schedule.

    Attributes:
        curricula: int32 ``[R, T, B]``, ``-1`` pads smaller batches.
        losses: float32 ``[R, K, M]``, losses at ``eval_steps``.
        eval_steps: int32 ``[K]``, ``eval_steps[0] == 0``.
        train_ids: str ``[N]``, the ids that ``curricula`` indexes.
        test_ids: str ``[M]``.
        run_ids: str ``[R]``.
        meta: JSON-serialisable description of the task, model and optimizer.

    Build with :meth:`create` (validates) or :meth:`from_logs`.
    """

    curricula: np.ndarray
    losses: np.ndarray
    eval_steps: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    run_ids: np.ndarray
    meta: dict = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        curricula: Any,
        losses: Any,
        train_ids: Any,
        test_ids: Any,
        eval_steps: Any | None = None,
        run_ids: Any | None = None,
        meta: Any = None,
        source: str = "<runs>",
    ) -> RunSet:
        """Validate and canonicalise arrays; raise :class:`RunDataError` on any problem."""
        train_ids = _as_str_array(train_ids, source, "train_ids")
        test_ids = _as_str_array(test_ids, source, "test_ids")
        curricula = validate_curriculum(curricula, train_ids.size, source, "curricula")
        if curricula.ndim != 3:
            raise RunDataError(source, "curricula", f"expected shape [runs, steps, batch], got {curricula.shape}")
        num_runs, num_steps = curricula.shape[:2]
        losses = validate_losses(losses, source)
        if losses.ndim != 3:
            raise RunDataError(source, "losses", f"expected shape [runs, evals, test examples], got {losses.shape}")
        if eval_steps is None:
            eval_steps = np.arange(num_steps + 1, dtype=np.int32)
            if losses.shape[1] != num_steps + 1:
                raise RunDataError(
                    source, "losses", f"has {losses.shape[1]} evaluations but curricula have {num_steps} steps",
                    "expected steps + 1 evaluations, or give eval_steps",
                )
        eval_steps = validate_eval_steps(eval_steps, num_steps, source)
        expected = (num_runs, eval_steps.size, test_ids.size)
        if losses.shape != expected:
            raise RunDataError(
                source, "losses", f"shape {losses.shape} does not match (runs, len(eval_steps), len(test_ids)) "
                f"= {expected}",
            )
        if run_ids is None:
            run_ids = np.array([f"run-{r:06d}" for r in range(num_runs)])
        run_ids = _as_str_array(run_ids, source, "run_ids") if num_runs else np.array([], dtype=str)
        if run_ids.size != num_runs:
            raise RunDataError(source, "run_ids", f"has {run_ids.size} ids for {num_runs} runs")
        for run_id in run_ids.tolist():
            check_run_id(run_id, source, "run_ids")
        return cls(curricula, losses, eval_steps, train_ids, test_ids, run_ids, validate_meta(meta, source))

    @classmethod
    def from_logs(
        cls,
        logs: Sequence[RunLog],
        train_ids: Any,
        test_ids: Any,
        meta: Any = None,
        source: str = "<runs>",
    ) -> RunSet:
        """Stack validated runs; batches narrower than the widest are padded with ``-1``."""
        if not logs:
            raise RunDataError(source, "runs", "no runs to stack", "collect or import runs first")
        train_ids = _as_str_array(train_ids, source, "train_ids")
        test_ids = _as_str_array(test_ids, source, "test_ids")
        for log in logs:   # before the ids go into messages
            check_run_id(log.run_id, source)
        logs = [log.validated(train_ids.size, test_ids.size, f"{source}[{log.run_id}]") for log in logs]
        first = logs[0]
        width = max(log.batch_size for log in logs)
        for log in logs[1:]:
            where = f"{source}[{log.run_id}]"
            if log.num_steps != first.num_steps:
                raise RunDataError(where, "curriculum", f"has {log.num_steps} steps, run "
                                   f"'{first.run_id}' has {first.num_steps}", "runs in one set need equal length")
            if not np.array_equal(log.eval_steps, first.eval_steps):
                raise RunDataError(where, "eval_steps", f"differs from run '{first.run_id}'",
                                   "runs in one set need one evaluation schedule")
        curricula = np.full((len(logs), first.num_steps, width), PAD, dtype=np.int32)
        for r, log in enumerate(logs):
            curricula[r, :, : log.batch_size] = log.curriculum
        losses = np.stack([log.losses for log in logs])
        run_ids = np.array([log.run_id for log in logs])
        return cls.create(curricula, losses, train_ids, test_ids, first.eval_steps, run_ids, meta, source)

    # --- shapes -------------------------------------------------------------------
    @property
    def num_runs(self) -> int:
        """Number of runs ``R``."""
        return int(self.curricula.shape[0])

    @property
    def num_steps(self) -> int:
        """Number of training steps ``T``."""
        return int(self.curricula.shape[1])

    @property
    def batch_size(self) -> int:
        """Batch size ``B`` (slots per step, padding included)."""
        return int(self.curricula.shape[2])

    @property
    def num_train(self) -> int:
        """Number of training examples ``N``."""
        return int(self.train_ids.size)

    @property
    def num_test(self) -> int:
        """Number of test examples ``M``."""
        return int(self.test_ids.size)

    @property
    def every_step(self) -> bool:
        """True when losses were recorded after every step (needed to fit transitions)."""
        return self.eval_steps.size == self.num_steps + 1

    @property
    def initial_losses(self) -> np.ndarray:
        """float32 ``[R, M]``: losses before training."""
        return self.losses[:, 0]

    # --- selection ----------------------------------------------------------------
    def select(self, runs: Any) -> RunSet:
        """The runs at indices (or boolean mask) ``runs``, sharing ids and meta."""
        index = np.asarray(runs)
        return RunSet(self.curricula[index], self.losses[index], self.eval_steps, self.train_ids,
                      self.test_ids, self.run_ids[index], self.meta)

    def logs(self) -> list[RunLog]:
        """Split into one :class:`RunLog` per run (padding columns kept)."""
        return [
            RunLog(str(run_id), self.curricula[r], self.losses[r], self.eval_steps)
            for r, run_id in enumerate(self.run_ids)
        ]

    def __repr__(self) -> str:
        return (f"RunSet(runs={self.num_runs}, steps={self.num_steps}, batch={self.batch_size}, "
                f"train={self.num_train}, test={self.num_test}, evals={self.eval_steps.size})")
