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

