"""for_test_examples scales caller-given features as it scales the task's own."""

import numpy as np
import torch

from simfluence import RunSet
from simfluence.simulators import FeaturizedSimulator


def test_passing_the_tasks_own_features_gives_the_tasks_predictions():
    from simfluence.tasks import get_task

    torch.set_num_threads(1)
    task = get_task("digits-mlp", num_train=40, num_test=12)
    rng = np.random.default_rng(0)
    curricula = rng.integers(0, 40, (6, 15, 4))
    losses = 2.0 + rng.random((6, 1, 12)) - 0.01 * np.arange(16)[None, :, None] + rng.normal(0, 1e-3, (6, 16, 12))
    runs = RunSet.create(curricula, losses, task.train_ids, task.test_ids)
    simulator = FeaturizedSimulator(task=task, features="task", weight_decay=1e-3, residual_ridge_factor=1.0,
                                    lbfgs_iterations=20).fit(runs)
    assert not np.allclose(simulator.feature_scales, 1.0)  # the scaling is not a no-op
    ids = task.test_ids[[0, 5, 11]]
    from_task = simulator.for_test_examples(ids)
    given = simulator.for_test_examples(ids, task.example_features("test")[[0, 5, 11]])
    assert np.allclose(given.test_features, from_task.test_features)
    initial = runs.initial_losses[:, [0, 5, 11]]
    assert np.allclose(given.simulate(curricula, initial), from_task.simulate(curricula, initial))
    whole = simulator.simulate(curricula, runs.initial_losses)[..., [0, 5, 11]]
    assert np.allclose(from_task.simulate(curricula, initial), whole, atol=1e-5)
