"""Validating counterfactual queries by real retraining.

A simulator answers "what would the test losses be after training on curriculum ``c'``?"
in microseconds; this module asks the model itself. :func:`retrain` trains a task's model
along many curricula for real (vectorised over runs with ``torch.func.vmap`` when the task
trains with plain SGD, one run at a time with its own optimizer otherwise, and through the real
Hugging Face ``Trainer`` for Trainer tasks such as ``minilm-finetune``) and
:func:`compare_with_retraining` puts the simulated and the real final losses side by side.

With ``P`` the predicted and ``Y`` the real final losses, both ``[R, M']`` (curricula x
target test examples), :class:`RetrainComparison` reports

* ``mse``: mean over all entries of ``(P - Y)^2``;
* ``spearman``: Spearman correlation of all ``R * M'`` pairs pooled (mostly example difficulty);
* ``across_curricula_spearman``: per test example, Spearman across the ``R`` curricula,
  averaged over test examples (does the simulator know which curriculum is better for it?);

and, when a ``reference`` row is given (the unedited curriculum), the same for the
*effects* ``P - P_ref`` vs ``Y - Y_ref``, plus the fraction of entries whose effect has the
right sign.

A step that an edit empties (all ``-1``) is skipped in training just as in simulation:
no update, the loss carries over. It keeps its place in the task's learning-rate schedule:
every later step trains at the rate it has in the unedited ``T``-step run (with a linear or
cosine schedule, deleting the step instead would shift all later rates).
A Trainer cannot skip a step and keep its schedule, so Trainer tasks refuse emptied steps (one
line naming the run and step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import cast

import numpy as np

from simfluence.collect.train import train_run, train_runs_vmap
from simfluence.errors import UsageError
from simfluence.evaluate import spearman
from simfluence.progress import progress_bar
from simfluence.query import check_test_index, simulate_curricula
from simfluence.runs.log import PAD
from simfluence.simulators.base import Simulator
from simfluence.tasks.base import Task

RETRAIN_CHUNK = 64
"""Runs trained at once by the vectorised trainer (beyond this, CPU gains little per run)."""


class _Rescheduled:
    """``task`` training at the given ``rates`` ``[T']`` instead of its own ``T'``-step schedule.

    A curriculum with its emptied steps deleted trains at the rates its remaining steps have
    in the full run. Everything else is the task's own (attribute access is forwarded).
    """

    def __init__(self, task: Task, rates: np.ndarray):
        self._task, self._rates = task, rates

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def learning_rates(self, num_steps: int) -> np.ndarray:
        if num_steps != self._rates.size:
            raise UsageError(f"learning_rates: asked for {num_steps} steps, the kept steps are {self._rates.size}")
        return self._rates


def _train(task: Task, curricula: np.ndarray) -> np.ndarray:
    """float32 ``[R, T + 1, M]`` real losses of ``curricula`` ``[R, T, B]`` (no empty steps)."""
    if task.optimizer == "sgd":
        logs = train_runs_vmap(task, curricula)
    else:
        logs = [train_run(task, curriculum) for curriculum in curricula]
    return np.stack([log.losses for log in logs])


def _train_skipping_empty_steps(task: Task, curricula: np.ndarray) -> np.ndarray:
    """float32 ``[R, T + 1, M]`` real losses of ``curricula`` ``[R, T, B]``, all-padding steps skipped.

    A skipped step makes no update and holds the loss; every other step trains at its rate
    in the task's ``T``-step schedule. Rows whose kept steps have the same rates (with a
    constant schedule: the same number of kept steps) train together, their emptied steps
    deleted.
    """
    nonempty = (curricula != PAD).any(axis=-1)                      # [R, T]
    if nonempty.all():
        return _train(task, curricula)
    rates = task.learning_rates(curricula.shape[1])                 # [T]
    # Position of L_t in the compacted trajectory: the number of real steps up to t.
    position = np.concatenate([np.zeros((len(curricula), 1), dtype=np.int64), np.cumsum(nonempty, axis=1)], axis=1)
    groups: dict[bytes, list[int]] = {}
    for r in range(len(curricula)):
        groups.setdefault(rates[nonempty[r]].tobytes(), []).append(r)
    out = np.empty((len(curricula), curricula.shape[1] + 1, task.num_test), dtype=np.float32)
    for rows in map(np.array, groups.values()):
        kept = rates[nonempty[rows[0]]]
        if kept.size:
            part = _train(cast(Task, _Rescheduled(task, kept)), np.stack([curricula[r][nonempty[r]] for r in rows]))
        else:  # nothing left to train on: only L_0, read off a one-step run on example 0
            part = _train(task, np.zeros((rows.size, 1, curricula.shape[2]), dtype=curricula.dtype))[:, :1]
        out[rows] = np.take_along_axis(part, position[rows][:, :, None], axis=1)
    return out


def retrain(task: Task, curricula, chunk_size: int = RETRAIN_CHUNK, progress: bool = False,
            workers: int = 1) -> np.ndarray:
    """Train ``task``'s model along each curriculum for real.

    Tasks of our own loop train vectorised in chunks; tasks trained by the Hugging Face Trainer
    (``task.runner == "trainer"``) train one Trainer per curriculum, each recorded as collection
    records it (:func:`simfluence.collect.hf.train_curricula`), ``workers`` at a time.

    Args:
        task: the task the simulator's runs were collected from.
        curricula: int ``[R, T, B]`` training-example indices, ``-1`` pads; all-padding steps are
            skipped (no update, the loss held) and keep their place in the learning-rate schedule
            (a Trainer task refuses them: the Trainer cannot skip a step).
        chunk_size: runs trained at once (our own loop).
        progress: a progress bar over chunks or runs (only on a terminal).
        workers: processes training Trainer runs.

    Returns:
        float32 ``[R, T + 1, M]`` test losses before training and after every step.
    """
    curricula = np.asarray(curricula)
    if curricula.ndim != 3:
        raise UsageError(f"curricula: expected shape [runs, steps, batch], got {curricula.shape}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise UsageError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    if task.runner == "trainer":
        from simfluence.collect.collector import trainer_spec
        from simfluence.collect.hf import train_curricula

        return train_curricula(trainer_spec(task), curricula, workers=workers, progress=progress,
                               desc=f"retrain {task.name}")
    parts = []
    for start in progress_bar(range(0, len(curricula), chunk_size), desc=f"retrain {task.name}", unit="chunk",
                      enabled=progress):
        parts.append(_train_skipping_empty_steps(task, curricula[start:start + chunk_size]))
    return np.concatenate(parts)


def agreement(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """``mse``, pooled ``spearman`` and ``across_curricula_spearman`` of ``[R, M']`` arrays (module docstring)."""
    across = spearman(predicted, actual, axis=0) if len(predicted) >= 3 else np.full(predicted.shape[1], np.nan)
    finite = across[np.isfinite(across)]
    return {"mse": float(np.mean((predicted - actual) ** 2)),
            "spearman": float(spearman(predicted.ravel(), actual.ravel(), axis=0)),
            "across_curricula_spearman": float(finite.mean()) if finite.size else math.nan}


@dataclass(frozen=True)
class RetrainComparison:
    """Simulated vs real final losses of the same curricula.

    Attributes:
        predicted / actual: float64 ``[R, M']`` final losses (simulated, real).
        test_index: int ``[M']``.
        reference: row of the unedited curriculum that effects are measured from, or None.
        simulate_seconds: wall time of simulating all ``R`` curricula (one vectorised call).
        train_seconds: wall time of retraining them.
    """

    predicted: np.ndarray
    actual: np.ndarray
    test_index: np.ndarray
    reference: int | None
    simulate_seconds: float
    train_seconds: float

    def metrics(self, rows=None) -> dict[str, float]:
        """Metrics on final losses (and on effects when there is a reference), over ``rows`` (default all)."""
        rows = np.arange(len(self.predicted)) if rows is None else np.asarray(rows)
        out = agreement(self.predicted[rows], self.actual[rows])
        if self.reference is not None:
            rows = rows[rows != self.reference]
            predicted = self.predicted[rows] - self.predicted[self.reference]
            actual = self.actual[rows] - self.actual[self.reference]
            out.update({f"effect_{key}": value for key, value in agreement(predicted, actual).items()})
            out["effect_sign_agreement"] = float(np.mean(np.sign(predicted) == np.sign(actual)))
        return out


def compare_with_retraining(simulator: Simulator, task: Task, curricula, test_index=None,
                            reference: int | None = None, progress: bool = False) -> RetrainComparison:
    """Retrain ``curricula`` ``[R, T, B]`` for real and simulate them from the real losses before training.

    ``reference``: index of the unedited curriculum among ``curricula``, to also compare effects.
    """
    if not np.array_equal(simulator.train_ids, task.train_ids) or not np.array_equal(simulator.test_ids,
                                                                                       task.test_ids):
        raise UsageError(f"task '{task.name}': its train/test ids differ from the simulator's; retrain with the "
                         "task the simulator's runs were collected from")
    test_index = check_test_index(simulator, test_index)
    curricula = np.asarray(curricula)
    if reference is not None and not 0 <= reference < len(curricula):
        raise UsageError(f"reference: {reference} is not a row of the {len(curricula)} curricula")
    start = time.perf_counter()
    actual = retrain(task, curricula, progress=progress)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predicted = simulate_curricula(simulator, curricula, actual[0, 0], test_index)
    simulate_seconds = time.perf_counter() - start
    return RetrainComparison(predicted[:, -1].astype(np.float64), actual[:, -1, test_index].astype(np.float64),
                             test_index, reference, simulate_seconds, train_seconds)
