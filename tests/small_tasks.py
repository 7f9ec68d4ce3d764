"""Real runs of small built-in tasks, shared by the simulator tests."""

import numpy as np

from simfluence.runs import RunSet


def digits_runs(num_runs=10, num_steps=20, num_train=40, num_test=10):
    """``(task, runs)``: digits-mlp at ``num_train`` / ``num_test`` examples, trained for real on uniform curricula."""
    import torch

    from simfluence.collect import UniformSampler, train_runs_vmap
    from simfluence.tasks import get_task

    torch.set_num_threads(1)
    task = get_task("digits-mlp", num_train=num_train, num_test=num_test)
    sampler = UniformSampler(task.default_pool(), task.batch_size)
    curricula = np.stack([sampler.sample(num_steps, seed=r) for r in range(num_runs)])
    return task, RunSet.from_logs(train_runs_vmap(task, curricula), task.train_ids, task.test_ids, task.meta())
