"""Counterfactual queries checked by really retraining digits-mlp (a small version of
benchmarks/counterfactual.py)."""

import numpy as np
import pytest
import torch

from simfluence.collect import UniformSampler, train_run, train_runs_vmap
from simfluence.query import leave_group_out, optimize
from simfluence.retrain import agreement, compare_with_retraining, retrain
from simfluence.runs import PAD, RunSet
from simfluence.simulators import LinearIdentitySimulator
from simfluence.tasks import DigitsMLP, get_task

STEPS = 30


@pytest.fixture(scope="module")
def setup():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    task = get_task("digits-mlp")
    curricula = UniformSampler(task.default_pool(), task.batch_size).sample_many(STEPS, range(26))
    logs = train_runs_vmap(task, curricula)
    runs = RunSet.from_logs(logs, task.train_ids, task.test_ids, meta=task.meta())
    simulator = LinearIdentitySimulator().fit(runs.select(np.arange(24)))
    yield task, runs.select([24, 25]), simulator
    torch.set_num_threads(previous)


def test_retrain_matches_the_plain_loop_and_skips_emptied_steps(setup):
    task, heldout, _ = setup
    curriculum = heldout.curricula[0][:12].copy()
    emptied = curriculum.copy()
    emptied[4] = PAD
    losses = retrain(task, np.stack([curriculum, emptied]), chunk_size=1)
    np.testing.assert_allclose(losses[0], train_run(task, curriculum).losses, atol=1e-5)
    # Skipping step 5 is training on the other 11 steps, with the loss held over step 5.
    shorter = train_run(task, np.delete(curriculum, 4, axis=0)).losses
    np.testing.assert_allclose(losses[1], np.insert(shorter, 5, shorter[4], axis=0), atol=1e-5)


def test_leave_class_out_effects_agree_with_retraining(setup):
    task, heldout, simulator = setup
    labels = task.data.train_targets.numpy()
    groups = {f"class-{k}": np.flatnonzero(labels == k) for k in range(10)}
    predicted, actual = [], []
    for r in range(heldout.num_runs):
        curriculum = heldout.curricula[r]
        query = leave_group_out(simulator, curriculum, heldout.initial_losses[r], groups)
        edited = [curriculum] + [np.where(np.isin(curriculum, group), PAD, curriculum) for group in groups.values()]
        comparison = compare_with_retraining(simulator, task, np.stack(edited), reference=0)
        np.testing.assert_allclose(comparison.predicted[1:] - comparison.predicted[0], query.final_delta, atol=1e-4)
        predicted.append(query.final_delta)
        actual.append(comparison.actual[1:] - comparison.actual[0])
        assert comparison.metrics()["effect_sign_agreement"] > 0.5
    effects = agreement(np.concatenate(predicted), np.concatenate(actual))
    # Removing a class mostly hurts test examples of that class; the simulator must know which.
    # Measured here: 0.31 pooled and 0.52 across curricula; a simulator that knows nothing gets about 0.
    assert effects["spearman"] > 0.2 and effects["across_curricula_spearman"] > 0.35, effects


def test_optimised_curriculum_beats_random_ones_in_real_retraining(setup):
    task, heldout, simulator = setup
    targets = np.flatnonzero(task.data.test_targets.numpy() == 7)
    result = optimize(simulator, heldout.initial_losses[0], targets, budget=10, num_steps=STEPS, batch_size=4,
                      beam_width=2, rounds=5, num_random=30)
    assert result.objective < result.random_best
    curricula = np.concatenate([result.curriculum[None], result.random_curricula[:10]])
    comparison = compare_with_retraining(simulator, task, curricula, test_index=targets)
    real = comparison.actual.mean(axis=1)
    assert real[0] < np.median(real[1:]), real
    assert comparison.train_seconds > comparison.simulate_seconds


def test_retraining_needs_the_simulators_task(setup):
    _, heldout, simulator = setup
    with pytest.raises(ValueError, match="ids differ from the simulator's"):
        compare_with_retraining(simulator, DigitsMLP(num_test=50), heldout.curricula)
