"""TracIn-CP through captum against per-example gradients from simfluence.func."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from peer_tasks import SIZES, DuplicateDigits, KeywordDigits, gradients
from simfluence.collect.train import train_states
from simfluence.peers import TracInCP, get_peer, start_checkpoint, trajectory_checkpoints
from simfluence.peers.base import model_at


@pytest.fixture(scope="module")
def trajectory(digits, curricula):
    return trajectory_checkpoints(digits, curricula[0], 4)


def test_scores_are_weighted_gradient_products(digits, trajectory):
    """S = -(1/N) sum_k w_k g_i(theta_k) . g_m(theta_k), with w_k the learning rate each checkpoint stands for."""
    train_index, test_index = np.arange(5, 30), np.array([7, 0, 3])
    result = TracInCP().attribute(digits, trajectory, train_index=train_index, test_index=test_index)
    expected = np.zeros((train_index.size, test_index.size))
    for weight, state in zip(trajectory.weights, trajectory.states):
        train = gradients(digits, state, "train", train_index)
        expected -= weight * train @ gradients(digits, state, "test", test_index).T
    expected /= digits.num_train
    assert result.scores.shape == (25, 3) and result.scores.dtype == np.float64
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_array_equal(result.train_index, train_index)
    assert result.method == "tracin" and result.cost.checkpoints == 4


def test_checkpoint_weights_split_the_run(digits, curricula, trajectory):
    """Count form: K segment centres; the weights sum to the run's total learning rate; cost = fraction replayed."""
    np.testing.assert_array_equal(trajectory.steps, [2, 7, 12, 17])
    np.testing.assert_allclose(trajectory.weights, [5 * digits.learning_rate] * 4)
    assert trajectory.trainings == pytest.approx(17 / 20)
    for step, state in zip(trajectory.steps, trajectory.states):
        replayed = train_states(digits, curricula[0], [int(step)])[0]
        for key, value in replayed.items():
            np.testing.assert_array_equal(state[key].numpy(), value.numpy())


def test_dict_inputs_give_the_same_scores(digits, curricula):
    """A task with keyword inputs (model(pixels=, scale=)) scores exactly like its tensor twin."""
    keyword = KeywordDigits(**SIZES)
    plain = get_peer("tracin").scores(digits, trajectory_checkpoints(digits, curricula[1], 2))
    twin = get_peer("tracin").scores(keyword, trajectory_checkpoints(keyword, curricula[1], 2))
    np.testing.assert_allclose(twin, plain, rtol=1e-4, atol=1e-7)


def test_sign_follows_a_real_sgd_step():
    """At the start, one SGD step on example i changes test losses as the scores predict (N S_im ~ real)."""
    task = DuplicateDigits(**SIZES)
    start = start_checkpoint(task)
    scores = TracInCP().scores(task, start)
    inputs, targets = task.split_data("test")
    before = task.example_losses(model_at(task, start.states[0]), inputs, targets).detach().numpy()
    real = np.stack([task.example_losses(model_at(task, train_states(task, np.array([[i]]), [1])[0]), inputs,
                                         targets).detach().numpy() - before for i in range(task.num_train)])
    assert spearmanr(scores.ravel(), real.ravel()).statistic > 0.95
    # One step on one example is 1/N of a run's worth of it, so N * S is the first-order real change
    # (the largest changes saturate, hence a least-squares slope somewhat below 1).
    predicted = task.num_train * scores
    assert np.corrcoef(predicted.ravel(), real.ravel())[0, 1] > 0.98
    assert 0.5 < (predicted * real).sum() / (predicted ** 2).sum() < 1.2
    assert (np.diag(scores) < 0).all()  # each test example's own duplicate helps it
