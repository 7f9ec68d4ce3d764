"""Query files: reading the curriculum a query starts from, and writing one (``simfluence optimize --out``).

A query curriculum file is an ``.npz`` of plain arrays, written atomically and read without
pickle: ``curriculum`` int32 ``[T, B]`` (``-1`` pads), ``initial_losses`` float32 ``[M]`` and the
``train_ids`` / ``test_ids`` of the simulator it was made for, plus any extra arrays (optimize
adds ``order``, ``target_index``, ``objective``, ``random_objectives``). A query can also start
from one run of a run store or interchange ``.npz``.
"""

from __future__ import annotations

import numpy as np

from simfluence.errors import UsageError
from simfluence.runs.atomic import atomic_path
from simfluence.runs.interchange import read_npz_arrays
from simfluence.runs.log import RunDataError, validate_curriculum, validate_losses
from simfluence.runs.store import load_runs
from simfluence.simulators.base import Simulator


def load_query_curriculum(path, simulator: Simulator, run: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(curriculum int32 [T, B], initial_losses float32 [M])`` for a query, from ``path``.

    ``path`` is one of:

    * an ``.npz`` holding ``curriculum`` ``[T, B]`` and ``initial_losses`` ``[M]`` (as written
      by :func:`save_query_curriculum` and ``simfluence optimize --out``), optionally with
      ``train_ids`` / ``test_ids`` that must match the simulator's; or
    * runs (a run store directory or an interchange ``.npz``): run ``run`` (default 0), its
      curriculum and its observed losses before training.
    """
    source = str(path)
    arrays = read_npz_arrays(path, ()) if str(path).endswith(".npz") else {}
    if "curriculum" in arrays:
        if run is not None:
            raise UsageError(f"run: {source} holds a single curriculum, not runs; give no run")
        for name in ("train_ids", "test_ids"):
            if name in arrays and not np.array_equal(arrays[name].astype(str), getattr(simulator, name)):
                raise RunDataError(source, name, "differ from the ids the simulator was fitted on",
                                   "query with a curriculum of the same task")
        if "initial_losses" not in arrays:
            raise RunDataError(source, "initial_losses", "is missing",
                               "add the test losses before training, float [test examples]")
        curriculum = validate_curriculum(arrays["curriculum"], simulator.train_ids.size, source)
        if curriculum.ndim != 2:
            raise RunDataError(source, "curriculum", f"expected shape [steps, batch], got {curriculum.shape}")
        initial = validate_losses(arrays["initial_losses"], source, "initial_losses")
        if initial.shape != (simulator.test_ids.size,):
            raise RunDataError(source, "initial_losses", f"expected shape [{simulator.test_ids.size}] (one per "
                               f"test example of the model), got {initial.shape}")
        return curriculum, initial
    runs = load_runs(path)
    simulator.check_compatible(runs, source)
    run = 0 if run is None else run
    if not 0 <= run < runs.num_runs:
        raise UsageError(f"run: {run} is out of range for {source}, which holds runs 0..{runs.num_runs - 1}")
    return runs.curricula[run], runs.initial_losses[run]


def save_query_curriculum(path, curriculum: np.ndarray, initial_losses: np.ndarray, simulator: Simulator,
                          **extra: np.ndarray | np.generic) -> None:
    """Write a curriculum file that :func:`load_query_curriculum` reads (atomically, no pickle)."""
    with atomic_path(path, suffix=".npz") as temporary:
        # numpy's stubs let ``**extra`` fill ``allow_pickle`` (a bool): a false alarm
        np.savez(temporary, curriculum=np.asarray(curriculum, dtype=np.int32),
                 initial_losses=np.asarray(initial_losses, dtype=np.float32),
                 train_ids=simulator.train_ids.astype(str), test_ids=simulator.test_ids.astype(str),
                 **extra)  # type: ignore[arg-type]
