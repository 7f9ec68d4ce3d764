"""Curriculum samplers: seeded, reproducible batch orders for training runs.

Every sampler has ``sample(num_steps, seed) -> int32 [T, B]``: entry ``[t, j]`` is the
index (into the task's training set) of the example in slot ``j`` of step ``t + 1``.
The same ``(num_steps, seed)`` always gives the same array, on any machine (NumPy's
``PCG64`` generator), so a run is reproducible from the seed stored with it.

``describe()`` returns a JSON-serialisable dict; a run store records it so that a
resumed collection can check it is drawing curricula the same way.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import numpy as np

from simfluence.errors import UsageError


def derive_seed(seed: int, index: int) -> int:
    """A 32-bit seed for item ``index`` of a collection seeded with ``seed``.

    Independent of the other items, so run ``r`` can be redrawn on its own.
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.int32).tobytes()).hexdigest()[:16]


def _check_pool(pool, name: str = "pool") -> np.ndarray:
    """int32 ``[P]`` indices; an int ``N`` stands for all of ``0..N-1``."""
    if isinstance(pool, (int, np.integer)) and not isinstance(pool, bool) and pool >= 1:
        pool = np.arange(int(pool))
    array = np.asarray(pool)
    if array.ndim != 1 or array.size == 0:
        raise UsageError(f"{name}: expected a non-empty 1-D array of training-example indices, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise UsageError(f"{name}: expected integer indices, got dtype {array.dtype}")
    if array.min() < 0:
        raise UsageError(f"{name}: indices must be >= 0, got {int(array.min())}")
    return array.astype(np.int32)


def _check_positive(value: int, name: str) -> int:
    if int(value) != value or value < 1:
        raise UsageError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


class Sampler(ABC):
    """Draws curricula. Subclasses set ``batch_size`` and implement ``sample`` and ``describe``."""

    batch_size: int

    @abstractmethod
    def sample(self, num_steps: int, seed: int) -> np.ndarray:
        """int32 ``[num_steps, batch_size]`` training-example indices (``-1`` pads, if ever)."""

    @abstractmethod
    def describe(self) -> dict:
        """JSON-serialisable settings, enough to tell two samplers apart."""

    @abstractmethod
    def max_index(self) -> int:
        """Largest training-example index this sampler can emit (checked against the task)."""

    def sample_many(self, num_steps: int, seeds) -> np.ndarray:
        """int32 ``[R, num_steps, batch_size]``, one curriculum per seed."""
        return np.stack([self.sample(num_steps, seed) for seed in seeds])


class UniformSampler(Sampler):
    """Each batch slot drawn uniformly, with replacement, from ``pool``.

    Args:
        pool: int ``[P]`` training-example indices to draw from (repeats weight an index),
            or the number ``N`` of training examples for all of ``0..N-1``.
        batch_size: examples per step ``B``.
    """

    def __init__(self, pool, batch_size: int):
        self.pool = _check_pool(pool)
        self.batch_size = _check_positive(batch_size, "batch_size")

    def sample(self, num_steps: int, seed: int) -> np.ndarray:
        """int32 ``[num_steps, batch_size]``, every slot drawn uniformly from the pool."""
        num_steps = _check_positive(num_steps, "num_steps")
        rng = np.random.default_rng(seed)
        return self.pool[rng.integers(0, self.pool.size, size=(num_steps, self.batch_size))]

    def describe(self) -> dict:
        """Kind, batch size, pool size and a digest of the pool."""
        return {"kind": "uniform", "batch_size": self.batch_size, "pool_size": int(self.pool.size),
                "pool_digest": _digest(self.pool)}

    def max_index(self) -> int:
        """The largest index in the pool."""
        return int(self.pool.max())

    def __repr__(self) -> str:
        return f"UniformSampler(pool_size={self.pool.size}, batch_size={self.batch_size})"


class EpochSampler(Sampler):
    """A random subset of ``pool``, visited in a fresh random order each epoch.

    The subset (``subset_size`` distinct pool entries, or the whole pool) is drawn once
    per curriculum; epochs are concatenated into one stream that is cut into batches of
    ``batch_size``, so when ``subset_size`` is not a multiple of ``batch_size`` a batch
    straddles two epochs (no padding, no dropped examples). Every ``subset_size``
    consecutive entries of ``curriculum.reshape(-1)`` starting at a multiple of
    ``subset_size`` are a permutation of the subset.

    Args:
        pool: int ``[P]`` training-example indices.
        batch_size: examples per step ``B``.
        subset_size: examples per epoch ``S <= P``; default ``P``.
    """

    def __init__(self, pool, batch_size: int, subset_size: int | None = None):
        self.pool = _check_pool(pool)
        self.batch_size = _check_positive(batch_size, "batch_size")
        self.subset_size = self.pool.size if subset_size is None else _check_positive(subset_size, "subset_size")
        if self.subset_size > self.pool.size:
            raise UsageError(f"subset_size: {self.subset_size} exceeds the pool size {self.pool.size}; "
                             "use a smaller subset or a larger pool")

    def sample(self, num_steps: int, seed: int) -> np.ndarray:
        """int32 ``[num_steps, batch_size]``: epochs of a random subset, each in a fresh order."""
        num_steps = _check_positive(num_steps, "num_steps")
        rng = np.random.default_rng(seed)
        subset = rng.choice(self.pool, size=self.subset_size, replace=False)
        total = num_steps * self.batch_size
        epochs = -(-total // self.subset_size)
        stream = np.concatenate([rng.permutation(subset) for _ in range(epochs)])
        return stream[:total].reshape(num_steps, self.batch_size).astype(np.int32)

    def describe(self) -> dict:
        """Kind, batch size, pool and subset size, and a digest of the pool."""
        return {"kind": "epoch", "batch_size": self.batch_size, "pool_size": int(self.pool.size),
                "subset_size": self.subset_size, "pool_digest": _digest(self.pool)}

    def max_index(self) -> int:
        """The largest index in the pool."""
        return int(self.pool.max())

    def __repr__(self) -> str:
        return (f"EpochSampler(pool_size={self.pool.size}, batch_size={self.batch_size}, "
                f"subset_size={self.subset_size})")


class FixedCurriculum(Sampler):
    """A given curriculum, replayed as-is (e.g. the order of a real run); ``seed`` is ignored.

    Args:
        curriculum: int ``[T, B]`` training-example indices, ``-1`` pads a smaller batch.
            ``sample(num_steps)`` returns its first ``num_steps`` steps.
    """

    def __init__(self, curriculum):
        array = np.asarray(curriculum)
        if array.ndim != 2 or array.size == 0:
            raise UsageError(f"curriculum: expected a non-empty [steps, batch] array, got shape {array.shape}")
        if array.dtype.kind not in "iu":
            raise UsageError(f"curriculum: expected integer indices, got dtype {array.dtype}")
        if array.min() < -1:
            raise UsageError(f"curriculum: entries must be >= 0 or -1 (padding), got {int(array.min())}")
        if (array == -1).all(axis=1).any():
            raise UsageError("curriculum: a step has an empty batch (all -1); every step needs an example")
        self.curriculum = array.astype(np.int32)
        self.batch_size = int(array.shape[1])

    def sample(self, num_steps: int, seed: int | None = None) -> np.ndarray:
        """int32 ``[num_steps, batch_size]``: the first ``num_steps`` steps (``seed`` is ignored)."""
        num_steps = _check_positive(num_steps, "num_steps")
        if num_steps > self.curriculum.shape[0]:
            raise UsageError(f"num_steps: {num_steps} exceeds the fixed curriculum's "
                             f"{self.curriculum.shape[0]} steps; ask for fewer steps")
        return self.curriculum[:num_steps].copy()

    def describe(self) -> dict:
        """Kind, batch size, number of steps and a digest of the curriculum."""
        return {"kind": "fixed", "batch_size": self.batch_size, "steps": int(self.curriculum.shape[0]),
                "digest": _digest(self.curriculum)}

    def max_index(self) -> int:
        """The largest index in the curriculum."""
        return int(self.curriculum.max())

    def __repr__(self) -> str:
        return f"FixedCurriculum(steps={self.curriculum.shape[0]}, batch_size={self.batch_size})"


def pool_sampler(kind: str, pool: np.ndarray, batch_size: int) -> Sampler:
    """A sampler of ``kind`` drawing from ``pool``.

    ``kind`` is ``"uniform"`` or ``"epoch"``, as a run store's ``sampler`` meta names it.
    """
    if kind == "epoch":
        return EpochSampler(pool, batch_size)
    if kind in ("uniform", None):
        return UniformSampler(pool, batch_size)
    raise UsageError(f"sampler kind '{kind}': the subset protocol redraws curricula with 'uniform' or 'epoch' "
                     "samplers only; collect the fitting runs with one of those")
