"""The reference loop and the vectorised trainer."""

import numpy as np
import pytest
import torch

from simfluence.collect.curricula import UniformSampler
from simfluence.collect.train import train_run, train_runs_vmap
from simfluence.tasks import get_task


@pytest.fixture(scope="module")
def task():
    return get_task("digits-mlp")


def test_vmap_matches_the_loop(task):
    curricula = UniformSampler(task.default_pool(), 4).sample_many(60, range(5))
    curricula[1, 3, 2:] = -1  # padded batches, as a smaller last batch or a replayed run would have
    curricula[4, 10, 1:] = -1
    loop = [train_run(task, curriculum, run_id=f"r{r}") for r, curriculum in enumerate(curricula)]
    vectorised = train_runs_vmap(task, curricula, run_ids=[f"r{r}" for r in range(5)])
    for a, b in zip(loop, vectorised):
        assert a.run_id == b.run_id and a.losses.shape == (61, 100) and a.losses.dtype == np.float32
        np.testing.assert_array_equal(a.curriculum, b.curriculum)
        assert np.abs(a.losses - b.losses).max() < 1e-5


def test_step_zero_is_the_checkpoint_and_training_changes_losses(task):
    log = train_run(task, UniformSampler(task.default_pool(), 4).sample(30, 0))
    with torch.no_grad():
        initial = task.example_losses(task.build_model(), task.data.test_inputs, task.data.test_targets)
    np.testing.assert_array_equal(log.losses[0], initial.numpy())
    assert log.losses[-1].mean() < 0.9 * log.losses[0].mean()


def test_padding_is_skipped_not_trained_on(task):
    padded = np.array([[3, -1, -1, -1], [7, 8, -1, -1]])
    same_means = np.array([[3, 3, 3, 3], [7, 8, 7, 8]])  # the same batch-mean losses, no padding
    loop, vectorised = train_run(task, padded), train_runs_vmap(task, padded[None])[0]
    reference = train_run(task, same_means)
    assert np.abs(loop.losses - reference.losses).max() < 1e-5
    assert np.abs(vectorised.losses - reference.losses).max() < 1e-5


def test_eval_steps_record_a_subset(task):
    curricula = UniformSampler(task.default_pool(), 4).sample_many(20, [1, 2])
    full = train_runs_vmap(task, curricula)
    some = train_runs_vmap(task, curricula, eval_steps=[0, 5, 20])
    loop = train_run(task, curricula[0], eval_steps=[0, 5, 20])
    np.testing.assert_array_equal(some[0].eval_steps, [0, 5, 20])
    np.testing.assert_allclose(some[1].losses, full[1].losses[[0, 5, 20]], atol=1e-6)
    assert np.abs(loop.losses - some[0].losses).max() < 1e-5


def test_runs_are_independent_of_their_chunk(task):
    curricula = UniformSampler(task.default_pool(), 4).sample_many(25, range(6))
    together = train_runs_vmap(task, curricula)[4]
    alone = train_runs_vmap(task, curricula[4:5])[0]
    np.testing.assert_array_equal(together.losses, alone.losses)


def test_bad_curriculum_is_rejected(task):
    with pytest.raises(ValueError, match="index out of range"):
        train_run(task, np.array([[0, 200]]))
    with pytest.raises(ValueError, match="curricula: expected shape"):
        train_runs_vmap(task, np.zeros((3, 4), dtype=np.int32))


def test_frozen_parameters_stay_frozen_in_both_trainers(task):
    class HeadOnly(type(task)):
        def build_model(self):
            model = super().build_model()
            model[0].requires_grad_(False)  # fine-tune the output layer only
            return model

    frozen = HeadOnly()
    curricula = UniformSampler(task.default_pool(), 4).sample_many(20, [4, 5])
    loop = train_run(frozen, curricula[0])
    vectorised = train_runs_vmap(frozen, curricula)[0]
    assert np.abs(loop.losses - vectorised.losses).max() < 1e-5
    assert np.abs(loop.losses - train_run(task, curricula[0]).losses).max() > 1e-3  # it did change training
