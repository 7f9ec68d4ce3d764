"""Rolling out many edited curricula from one starting point, in chunks of bounded memory.

Every query stacks its curricula ``c'`` (int ``[T, B]``, ``-1`` pads) into one ``[R, T, B]``
array and rolls them all out from the same losses before training ``L_0`` (``[M]``) with one
vectorised ``simulate`` per chunk of at most :data:`CHUNK_BYTES`, so it works for every
simulator kind. For the Simfluence-Linear family only the requested test examples' ``M'``
columns are rolled out (same numbers). Trajectories are float32 ``[R, T + 1, M']``, ``L_t``
being the loss after step ``t`` (steps counted from 1).

A step whose batch a removal empties is skipped: no update, the loss is carried over
(``L_t = L_{t-1}``), just as training would skip a step with nothing to train on
(:func:`rollout_skipping_empty_steps`).

Also here: the checks of a query's inputs (one curriculum, the losses before training, the
test-example indices) that every query shares.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from simfluence.errors import UsageError
from simfluence.progress import progress_bar
from simfluence.runs.log import PAD, check_indices, validate_curriculum, validate_losses
from simfluence.simulators.base import Simulator

CHUNK_BYTES = 256 << 20
"""Memory budget of one vectorised rollout (trajectories, indices and temporaries)."""


def rollout_skipping_empty_steps(run: Callable, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """``run(curricula, initial)`` where all-padding steps are skipped and hold the loss.

    ``run`` maps int ``[r, T', B]`` curricula without empty steps and ``[r, M]`` initial
    losses to ``[r, T' + 1, M']`` trajectories (a simulator's rollout, or real training).
    Rows are grouped by their number of real steps, each group run once after deleting its
    empty steps, and the trajectory is spread back over ``[R, T + 1, M']``.
    """
    nonempty = (curricula != PAD).any(axis=-1)                      # [R, T]
    if nonempty.all():
        return run(curricula, initial)
    lengths = nonempty.sum(axis=1)
    # Position of L_t in the compacted trajectory: the number of real steps up to t.
    position = np.concatenate([np.zeros((len(curricula), 1), dtype=np.int64), np.cumsum(nonempty, axis=1)], axis=1)
    out = None
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        if length:
            part = run(np.stack([curricula[r][nonempty[r]] for r in rows]), initial[rows])
        else:  # nothing left to train on: only L_0, read off a one-step run on example 0
            part = run(np.zeros((rows.size, 1, curricula.shape[2]), dtype=curricula.dtype), initial[rows])[:, :1]
        if out is None:
            out = np.empty((len(curricula), curricula.shape[1] + 1, part.shape[-1]), dtype=np.float32)
        out[rows] = np.take_along_axis(part, position[rows][:, :, None], axis=1)
    assert out is not None   # some row has an empty step, so the loop ran
    return out


def _rollouts(simulator: Simulator, curricula_of: Callable[[np.ndarray], np.ndarray], num_rows: int,
              num_steps: int, width: int, initial: np.ndarray, test_index: np.ndarray,
              reduce: Callable[[np.ndarray], tuple[np.ndarray, ...]], progress: bool = False,
              ) -> tuple[np.ndarray, ...]:
    """Roll out ``curricula_of(rows)`` for all rows in chunks; concatenate ``reduce(trajectories)``.

    ``curricula_of`` builds the int ``[r, T, B]`` edited curricula of the given rows, so
    neither the edits nor the trajectories of all rows need to be in memory at once.
    ``initial`` is the float64 ``[M]`` loss before training, the same for every row.
    """
    run = simulator.column_rollout(test_index)  # declared by capabilities.column_rollout
    columns = test_index.size if run is not None else simulator.test_ids.size
    if run is None:
        def run(curricula, start):
            return simulator.simulate(curricula, start)[:, :, test_index]
    per_row = 12 * (num_steps + 1) * columns + 16 * num_steps * width
    chunk = int(max(1, min(num_rows, CHUNK_BYTES // per_row)))
    parts: list[tuple[np.ndarray, ...]] = []
    with progress_bar(total=num_rows, unit="curriculum", desc="simulate", enabled=progress, leave=False) as bar:
        for start in range(0, num_rows, chunk):
            rows = np.arange(start, min(start + chunk, num_rows))
            starting = np.broadcast_to(initial, (rows.size, initial.size))
            parts.append(reduce(rollout_skipping_empty_steps(run, curricula_of(rows), starting)))
            bar.update(rows.size)
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def _check_query(simulator: Simulator, curriculum, initial_losses, test_index,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(curriculum int32 [T, B], initial float64 [M], test_index int64 [M'])``."""
    simulator._check_fitted()
    curriculum = validate_curriculum(curriculum, simulator.train_ids.size, "curriculum")
    if curriculum.ndim != 2:
        raise UsageError(f"curriculum: expected one curriculum of shape [steps, batch], got {curriculum.shape}")
    return curriculum, _check_initial(simulator, initial_losses), check_test_index(simulator, test_index)


def _check_initial(simulator: Simulator, initial_losses) -> np.ndarray:
    initial = validate_losses(initial_losses, "initial_losses").astype(np.float64)
    if initial.shape != (simulator.test_ids.size,):
        raise UsageError(f"initial_losses: expected shape [{simulator.test_ids.size}] (one loss per test example "
                         f"before training), got {initial.shape}")
    return initial


def check_test_index(simulator: Simulator, test_index) -> np.ndarray:
    """int64 ``[M']`` test-example indices (``None``: all), checked against the simulator."""
    return check_indices(test_index, simulator.test_ids.size, "test_index")


def simulate_curricula(simulator: Simulator, curricula, initial_losses, test_index=None,
                       progress: bool = False) -> np.ndarray:
    """Simulate many curricula from one starting point, in chunks of bounded memory.

    Args:
        simulator: any fitted simulator.
        curricula: int ``[R, T, B]``, ``-1`` pads; all-padding steps are skipped (loss held).
        initial_losses: float ``[M]``, the losses before training shared by every run.
        test_index: int ``[M']`` test examples to return (default all).
        progress: a progress bar over the curricula (only on a terminal).

    Returns:
        float32 ``[R, T + 1, M']``.
    """
    simulator._check_fitted()
    curricula = np.asarray(curricula)
    if curricula.ndim != 3:
        raise UsageError(f"curricula: expected shape [runs, steps, batch], got {curricula.shape}")
    # Empty steps are allowed here (they are skipped), so only dtype and range are checked.
    if curricula.dtype.kind not in "iu" or (curricula.size and (
            curricula.min() < PAD or curricula.max() >= simulator.train_ids.size)):
        validate_curriculum(curricula, simulator.train_ids.size, "curricula")  # raises the standard message
    initial = _check_initial(simulator, initial_losses)
    test_index = check_test_index(simulator, test_index)
    num_runs, num_steps, width = curricula.shape
    (trajectories,) = _rollouts(simulator, lambda rows: curricula[rows], num_runs, num_steps, width, initial,
                                test_index, lambda x: (x,), progress)
    return trajectories
