"""Trivial baselines that every learned simulator must beat.

* ``mean-trajectory``: ``L_t = L_0 + mean_r (L^r_t - L^r_0)`` over the fitting runs; it knows
  how training goes on average but nothing about the curriculum. Past the fitting runs'
  last step the last mean change is held.
* ``constant``: ``L_t = L_0``, training changes nothing.
"""

from __future__ import annotations

import numpy as np

from simfluence.runs.log import RunSet
from simfluence.simulators.base import Capabilities, Simulator, mean_prediction, register


def mean_trajectory(mean_change: np.ndarray, initial: np.ndarray, num_steps: int) -> np.ndarray:
    """float32 ``[R, T + 1, M]`` from ``mean_change [T_fit + 1, M]`` and ``initial [R, M]``."""
    return mean_prediction(mean_change, initial, np.arange(num_steps + 1)).astype(np.float32)


@register
class MeanTrajectorySimulator(Simulator):
    """Every curriculum gets the fitting runs' mean loss change per step, whatever its batches hold."""

    kind = "mean-trajectory"
    capabilities = Capabilities("baseline", attribution=False, expected_rollout=True)

    def _fit(self, runs: RunSet) -> None:
        pass  # the base class already keeps the fitting runs' mean change

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        return mean_trajectory(self.mean_change, initial, curricula.shape[1])

    def _expected(self, weights: np.ndarray, num_steps: int, batch_size: int, initial: np.ndarray) -> np.ndarray:
        return mean_trajectory(self.mean_change, initial, num_steps)     # the same for every curriculum


@register
class ConstantSimulator(Simulator):
    """Losses stay at their starting values: the no-change baseline."""

    kind = "constant"
    capabilities = Capabilities("baseline", attribution=False, expected_rollout=True)

    def _fit(self, runs: RunSet) -> None:
        pass

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        return self._expected(np.empty((len(initial), 0)), curricula.shape[1], 1, initial)

    def _expected(self, weights: np.ndarray, num_steps: int, batch_size: int, initial: np.ndarray) -> np.ndarray:
        return np.repeat(initial[:, None, :], num_steps + 1, axis=1).astype(np.float32)
