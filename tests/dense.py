"""Dense NumPy references for the sparse batch design and the transition ridge (tests only).

Built from the batches alone, without :class:`~simfluence.simulators.design.BatchDesign`, so
they check the library's sparse operator and batched solver independently; and the exact
average of a simulator over every curriculum of a tiny pool, the reference of the closed-form
expectations.
"""

from __future__ import annotations

import itertools

import numpy as np


def every_curriculum(pool: np.ndarray, num_steps: int, batch: int) -> np.ndarray:
    """int ``[|pool| ** (T B), T, B]``: every curriculum the uniform sampler can draw, each equally likely."""
    return np.array(list(itertools.product(pool, repeat=num_steps * batch))).reshape(-1, num_steps, batch)


def exact_average(simulator, pool: np.ndarray, num_steps: int, batch: int, initial: np.ndarray) -> np.ndarray:
    """float64 ``[T + 1, M]``: ``simulator``'s trajectory averaged over :func:`every_curriculum` of bool ``pool``."""
    curricula = every_curriculum(np.flatnonzero(pool), num_steps, batch)
    return simulator.simulate(curricula, np.repeat(initial[None], len(curricula), 0)).astype(np.float64).mean(0)


def dense_design(batches, num_train: int) -> np.ndarray:
    """float64 ``X [S, N]``: ``X[s, i]`` = how many times example ``i`` is in batch ``s`` (``-1`` pads)."""
    batches = np.asarray(batches)
    x = np.zeros((batches.shape[0], num_train))
    steps = np.repeat(np.arange(batches.shape[0]), batches.shape[1]).reshape(batches.shape)
    valid = batches >= 0
    np.add.at(x, (steps[valid], batches[valid]), 1.0)
    return x


def dense_transition_ridge(batches, num_train: int, previous, target, ridge: float,
                           fit_alpha: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """One dense float64 ridge solve per test example: ``(a, b)``, each ``[N, M]`` (``a`` None without alpha).

    Minimises ``sum_s (l_s x_s.a + x_s.b - y_s)^2 + ridge (|a|^2 + |b|^2)`` for each column of
    ``previous`` (``l``) and ``target`` (``y``), both ``[S, M]``.
    """
    x = dense_design(batches, num_train)
    previous, target = np.asarray(previous, dtype=np.float64), np.asarray(target, dtype=np.float64)
    solutions = []
    for m in range(target.shape[1]):
        features = np.hstack([previous[:, m:m + 1] * x, x]) if fit_alpha else x
        gram = features.T @ features + ridge * np.eye(features.shape[1])
        solutions.append(np.linalg.solve(gram, features.T @ target[:, m]))
    table = np.stack(solutions, axis=1)
    return (table[:num_train], table[num_train:]) if fit_alpha else (None, table)
