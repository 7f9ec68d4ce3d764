r"""Model checkpoints of replayed runs, and the learning-rate weight each checkpoint stands for.

Attribution methods read a task's model at a few parameter values: the final weights of
several independently trained runs (TRAK's ensemble), the weights along one run
(TracIn-CP), or one trained model (influence functions). Training is deterministic given
the curriculum (:mod:`simfluence.collect.train`; a Hugging Face ``Trainer`` task through its
Trainer, :func:`simfluence.collect.hf.trainer_states`), so these are replayed from curricula:

* :func:`final_states`: the weights at the end of each of ``R`` runs.
* :func:`checkpoint_weights`: for checkpoints taken at steps :math:`s_0 < \dots < s_{K-1}`
  of a ``T``-step run with learning rates :math:`\eta_1..\eta_T`, the summed learning rate
  :math:`w_k = \sum_{t \in S_k} \eta_t` of the steps whose gradient checkpoint ``k``
  stands in for. Step ``t`` moves :math:`\theta_{t-1} \to \theta_t` with the gradient at
  :math:`\theta_{t-1}`, so it is assigned to the checkpoint nearest to step ``t - 1``
  (ties to the earlier one). The weights partition the run:
  :math:`\sum_k w_k = \sum_t \eta_t`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from simfluence.collect.train import train_runs_vmap, train_states
from simfluence.errors import UsageError
from simfluence.runs.log import validate_curriculum
from simfluence.tasks.base import Task

VMAP_RUNS = 16
"""Runs trained together by :func:`final_states` (bounds memory to about this many weight copies)."""


def final_states(task: Task, curricula) -> list[dict[str, torch.Tensor]]:
    """State dicts after the last step of each run.

    Args:
        task: the task; runs are replayed with :func:`~simfluence.collect.train.train_runs_vmap`
            (``VMAP_RUNS`` runs at a time) when it trains with plain SGD in our loop, else one by
            one with :func:`~simfluence.collect.train.train_states` (the task's own optimizer, or
            its Hugging Face ``Trainer`` for ``task.runner == "trainer"``).
        curricula: int ``[R, T, B]`` (or one ``[T, B]``) training-example indices, ``-1`` pads.

    Returns:
        ``R`` state dicts, in the order of ``curricula``.
    """
    curricula = np.asarray(curricula)
    if curricula.ndim == 2:
        curricula = curricula[None]
    curricula = validate_curriculum(curricula, task.num_train, "final_states")
    if curricula.ndim != 3:
        raise UsageError(f"curricula: expected shape [runs, steps, batch], got {curricula.shape}")
    num_runs, num_steps, _ = curricula.shape
    if task.optimizer != "sgd" or task.runner != "torch":   # one run at a time, as the task trains
        return [train_states(task, curriculum, [num_steps])[0] for curriculum in curricula]
    states: list[dict[str, torch.Tensor] | None] = [None] * num_runs
    for start in range(0, num_runs, VMAP_RUNS):
        chunk = curricula[start:start + VMAP_RUNS]

        def keep(r: int, step: int, state: dict[str, torch.Tensor], start: int = start) -> None:
            states[start + r] = state

        train_runs_vmap(task, chunk, eval_steps=[0], checkpoint_steps=[num_steps], on_checkpoint=keep)
    return cast(list[dict[str, torch.Tensor]], states)  # every run kept its state


def segment_centres(num_steps: int, count: int, name: str = "count") -> list[int]:
    """The steps ``floor((2k + 1) T / 2K)``, ``k < K``: the centres of ``K`` equal segments of a ``T``-step run.

    A checkpoint at a segment's centre stands for the steps around it (the midpoint rule of
    :func:`checkpoint_weights`), which approximates a run-long sum of per-step terms better than
    checkpoints at the segments' starts. ``name`` is the caller's name of ``count`` in the error.
    """
    if not 1 <= count <= num_steps:
        raise UsageError(f"{name}: a count must lie in 1..{num_steps}, got {count}")
    return np.unique((2 * np.arange(int(count)) + 1) * int(num_steps) // (2 * int(count))).tolist()


def checkpoint_weights(learning_rates, steps: Sequence[int] | np.ndarray) -> np.ndarray:
    """float64 ``[K]``: the summed learning rate of the steps each checkpoint stands for.

    Args:
        learning_rates: float ``[T]``, the rate of steps ``1..T``
            (e.g. :meth:`Task.learning_rates(T) <simfluence.tasks.base.Task.learning_rates>`).
        steps: ``K`` distinct checkpoint steps in ``0..T`` (0: the starting weights), any order;
            the weights follow this order.

    Step ``t`` (gradient taken at step ``t - 1``'s weights) goes to the checkpoint whose step is
    nearest to ``t - 1``, the earlier one on a tie; the weights sum to ``sum(learning_rates)``.
    """
    rates = np.asarray(learning_rates, dtype=np.float64)
    if rates.ndim != 1:
        raise UsageError(f"learning_rates: expected a 1-D array [T], got shape {rates.shape}")
    order = np.asarray([int(step) for step in steps], dtype=np.int64)
    if order.size == 0 or np.unique(order).size != order.size:
        raise UsageError(f"steps: need at least one checkpoint step, without repeats, got {list(order)}")
    if order.min() < 0 or order.max() > rates.size:
        raise UsageError(f"steps: must lie in 0..{rates.size} (the run length), got {list(order)}")
    sorted_steps = np.sort(order)
    gradient_at = np.arange(rates.size)                                 # step t+1 uses the weights of step t
    distance = np.abs(gradient_at[:, None] - sorted_steps[None, :])    # [T, K]
    nearest = distance.argmin(axis=1)                                   # first minimum: the earlier checkpoint
    weights = np.bincount(nearest, weights=rates, minlength=sorted_steps.size)
    return weights[np.searchsorted(sorted_steps, order)]
