"""Dense NumPy references for the sparse batch design and the transition ridge (tests only).

Built from the batches alone, without :class:`~simfluence.simulators.design.BatchDesign`, so
they check the library's sparse operator and batched solver independently; and the exact
average of a simulator over every curriculum of a tiny pool, the reference of the closed-form
expectations; the Simfluence-Linear recurrence by a plain loop; a saved simulator with one
array taken out (a file of an older version).
"""

from __future__ import annotations

import itertools
import json

import numpy as np

from simfluence.simulators.base import arrays_checksum, config_checksum


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


def python_rollout(a, b, curricula, initial, alpha_offset, batch_size=None):
    """Plain loop over runs, steps and batch slots: the reference for the vectorised rollout.

    With ``batch_size`` n, a step of k examples weighs each n / k (a batch-mean loss).
    """
    runs, steps, _ = curricula.shape
    out = np.zeros((runs, steps + 1, initial.shape[1]))
    for r in range(runs):
        loss = initial[r].astype(np.float64)
        out[r, 0] = loss
        for t in range(steps):
            alpha = np.full(loss.shape, alpha_offset) if a is not None else np.ones_like(loss)
            beta = np.zeros_like(loss)
            present = int((curricula[r, t] >= 0).sum())
            weight = 1.0 if batch_size is None or present == 0 else batch_size / present
            for i in curricula[r, t]:
                if i < 0:
                    continue
                if a is not None:
                    alpha = alpha + weight * a[i]
                beta = beta + weight * b[i]
            loss = alpha * loss + beta
            out[r, t + 1] = loss
    return out


def without_array(path, out, name):
    """A copy of the saved simulator ``path`` without the array ``name``, checksums still valid."""
    return with_array(path, out, name, None)


def with_array(path, out, name, value):
    """Saved simulator ``path`` copied with array ``name`` set to ``value`` (``None``: removed); checksums valid."""
    with np.load(path, allow_pickle=False) as saved:
        arrays = {key: array for key, array in saved.items() if key != name}
    if value is not None:
        arrays[name] = value
    config = json.loads(str(arrays["config"]))
    config["checksum"] = arrays_checksum({k: v for k, v in arrays.items() if k != "config"})
    config["config_checksum"] = config_checksum(config)
    np.savez(out, **{**arrays, "config": np.array(json.dumps(config))})
    return out
