"""Small synthetic run sets drawn from a known simulator (a "testable task")."""

from __future__ import annotations

import numpy as np

from simfluence import RunSet


def linear_runs(num_train=40, num_test=6, num_runs=12, num_steps=30, batch=4, seed=0, noise=1e-3,
                alpha_offset=1.0) -> tuple[RunSet, np.ndarray, np.ndarray]:
    """Runs drawn from a known Simfluence-Linear model: returns (runs, A, B), A and B ``[N, M]``."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 0.01, (num_train, num_test))
    b = rng.normal(-0.01, 0.01, (num_train, num_test))
    curricula = rng.integers(0, num_train, (num_runs, num_steps, batch))
    losses = np.zeros((num_runs, num_steps + 1, num_test))
    losses[:, 0] = 2.0 + rng.random(num_test)
    for t in range(num_steps):
        alpha = alpha_offset + a[curricula[:, t]].sum(1)
        losses[:, t + 1] = alpha * losses[:, t] + b[curricula[:, t]].sum(1) + rng.normal(0, noise, losses[:, t].shape)
    runs = RunSet.create(curricula, losses, [f"train-{i}" for i in range(num_train)],
                         [f"test-{m}" for m in range(num_test)], meta={"task": "synthetic-linear", "seed": seed})
    return runs, a, b



def trajectory_runs(num_train=30, num_test=8, num_runs=24, num_steps=40, batch=4, seed=0, noise=1e-3, momentum=0.9,
                    decay=1.0, rank=2, warmup=5) -> tuple[RunSet, np.ndarray, np.ndarray]:
    """Runs drawn from a known ``linear-trajectory`` model with an AdamW-like schedule and momentum.

    ``L_t = L_0 + G_t + F_t b`` with ``F`` built independently of the library (a loop over
    steps), ``b`` ``[N, M]`` of rank ``rank``, a warm-up then linear-decay schedule recorded in
    the meta as ``learning_rates``. Returns ``(runs, b, rates)``.
    """
    rng = np.random.default_rng(seed)
    b = rng.normal(0, 1, (num_train, rank)) @ rng.normal(0, 0.02, (rank, num_test)) - 0.01
    steps = np.arange(1, num_steps + 1)
    rates = np.where(steps <= warmup, (steps - 1) / warmup, (num_steps - steps + 1) / (num_steps - warmup)) * 1e-3
    curricula = rng.integers(0, num_train, (num_runs, num_steps, batch))
    drift = -0.01 * np.arange(num_steps + 1)[:, None] * np.ones(num_test)   # G_t: the same in every run
    losses = np.zeros((num_runs, num_steps + 1, num_test))
    for r in range(num_runs):
        smoothed, features = np.zeros(num_train), np.zeros(num_train)
        losses[r, 0] = 3.0
        for t in range(num_steps):
            x = np.bincount(curricula[r, t], minlength=num_train) / batch
            smoothed = momentum * smoothed + (1 - momentum) * x
            features = decay * features + rates[t] / rates.max() * smoothed
            losses[r, t + 1] = 3.0 + drift[t + 1] + features @ b + rng.normal(0, noise, num_test)
    meta = {"task": "synthetic-trajectory", "optimizer": "adamw", "learning_rates": rates.tolist()}
    runs = RunSet.create(curricula, losses, [f"train-{i}" for i in range(num_train)],
                         [f"test-{m}" for m in range(num_test)], meta=meta)
    return runs, b, rates
