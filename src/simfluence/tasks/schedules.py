r"""Learning-rate schedules: the step size of each of a run's ``T`` SGD steps.

With base rate :math:`\eta`, ``W`` warm-up steps and progress
:math:`p_t = (t - 1 - W) / (T - W)` for steps :math:`t = W + 1, \dots, T`:

* warm-up (:math:`t \le W`): :math:`\eta_t = \eta\, t / W`;
* ``constant``: :math:`\eta_t = \eta`;
* ``linear``: :math:`\eta_t = \eta\,(1 - p_t)`;
* ``cosine``: :math:`\eta_t = \eta\,(1 + \cos \pi p_t) / 2`.

The rate depends on the step and the run length only, never on the curriculum, so every
run of a collection follows the same schedule and the vectorised trainer can apply it.
"""

from __future__ import annotations

import math

import numpy as np

from simfluence.errors import UsageError

SCHEDULES = ("constant", "linear", "cosine")


def learning_rates(base: float, num_steps: int, schedule: str = "constant", warmup_steps: int = 0) -> np.ndarray:
    """float64 ``[T]``: the learning rate of steps ``1..T`` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise UsageError(f"lr_schedule: unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise UsageError(f"warmup_steps: must be an integer >= 0, got {warmup_steps!r}")
    steps = np.arange(1, num_steps + 1, dtype=np.float64)
    warmup = int(warmup_steps)
    progress = np.clip((steps - 1 - warmup) / max(num_steps - warmup, 1), 0.0, 1.0)
    if schedule == "constant":
        factor = np.ones_like(steps)
    elif schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + np.cos(np.pi * progress))
    if warmup:
        factor = np.where(steps <= warmup, steps / warmup, factor)
    return float(base) * factor


def run_learning_rates(meta: dict, num_steps: int) -> np.ndarray | None:
    """float64 ``[T]``: the learning rate of each step of runs described by ``meta``, or ``None``.

    In order: the rates the recorder saw the optimizer use (``meta["learning_rates"]``, when it
    has ``T`` finite entries); the schedule of the task the meta names (its own convention,
    e.g. Hugging Face's warm-up); the meta's ``learning_rate`` with ``task_config``'s schedule.
    """
    rates = meta.get("learning_rates")
    if isinstance(rates, list) and len(rates) == num_steps:
        array = np.asarray(rates, dtype=np.float64)
        if np.isfinite(array).all():
            return array
    config = meta.get("task_config")
    if not isinstance(config, dict):
        config = {}
    if isinstance(meta.get("task"), str):
        from simfluence.tasks.registry import get_task

        try:
            return get_task(meta["task"], **config).learning_rates(num_steps)
        except (ValueError, ImportError):
            pass
    base = meta.get("learning_rate")
    if isinstance(base, (int, float)) and math.isfinite(base):
        try:
            return learning_rates(base, num_steps, config.get("lr_schedule", "constant"), config.get("warmup_steps", 0))
        except ValueError:
            return None
    return None
