"""EK-FAC influence through kronfluence against gradient products and an independent EK-FAC in NumPy."""

import numpy as np
import pytest
import torch

from peer_tasks import SIZES, DuplicateDigits, KeywordDigits, LinearDigits, gradients
from simfluence.peers import EKFAC, ensemble_checkpoints, get_peer, start_checkpoint
from simfluence.peers.base import model_at
from simfluence.peers.ekfac import tracked_modules


def test_identity_strategy_is_the_plain_gradient_product(digits):
    """With no curvature, kronfluence's score is g_m . g_i: S = -g_i . g_m / N."""
    start = start_checkpoint(digits)
    train_index = np.arange(3, 40, 2)
    result = EKFAC(strategy="identity").attribute(digits, start, train_index=train_index)
    state = start.states[0]
    expected = -gradients(digits, state, "train", train_index) @ gradients(digits, state, "test").T / digits.num_train
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert result.cost.trainings == 0 and result.cost.method_seconds > 0


def ekfac_by_hand(task, state, damping):
    """EK-FAC influence of a one-layer softmax classifier, empirical Fisher, in float64 NumPy.

    A = mean [x,1][x,1]^T, S = mean d d^T (d = softmax - one-hot), Q_A, Q_S their eigenvectors,
    Lambda = mean (Q_S^T G_i Q_A)^2 with G_i = d_i [x_i,1]^T;
    I_im = <Q_S ((Q_S^T G_m Q_A) / (Lambda + damping)) Q_A^T, G_i>.
    """
    model = model_at(task, state)

    def layer_gradients(split):
        inputs, targets = task.split_data(split)
        with torch.no_grad():
            error = (torch.softmax(model(inputs), -1) - torch.nn.functional.one_hot(targets, 10)).double().numpy()
        augmented = np.concatenate([inputs.double().numpy(), np.ones((len(inputs), 1))], axis=1)
        return error, augmented, np.einsum("no,ni->noi", error, augmented)

    error, augmented, train = layer_gradients("train")
    _, _, test = layer_gradients("test")
    n = len(train)
    _, q_a = np.linalg.eigh(augmented.T @ augmented / n)
    _, q_s = np.linalg.eigh(error.T @ error / n)
    rotate = lambda g: q_s.T @ g @ q_a  # noqa: E731
    eigenvalues = (rotate(train) ** 2).mean(axis=0)
    preconditioned = q_s @ (rotate(test) / (eigenvalues + damping)) @ q_a.T
    influence = np.einsum("moi,noi->nm", preconditioned, train)
    exact_fisher = train.reshape(n, -1).T @ train.reshape(n, -1) / n
    exact = train.reshape(n, -1) @ np.linalg.solve(exact_fisher + damping * np.eye(len(exact_fisher)),
                                                  test.reshape(len(test), -1).T)
    return -influence / n, -exact / n


def test_ekfac_matches_an_independent_implementation_on_one_layer():
    task = LinearDigits(**SIZES)
    start = start_checkpoint(task)
    scores = EKFAC(damping=1e-2, fisher="empirical").scores(task, start)
    by_hand, exact = ekfac_by_hand(task, start.states[0], 1e-2)
    np.testing.assert_allclose(scores, by_hand, rtol=1e-3, atol=1e-4 * np.abs(by_hand).max())
    # and EK-FAC is a fair approximation of the exact damped-Fisher influence there
    assert np.corrcoef(scores.ravel(), exact.ravel())[0, 1] > 0.8


def test_true_fisher_is_seeded_and_differs_from_the_empirical_one():
    task = LinearDigits(**SIZES)
    start = start_checkpoint(task)
    first, again = (EKFAC(damping=1e-2).scores(task, start) for _ in range(2))
    other_seed = EKFAC(damping=1e-2, seed=1).scores(task, start)
    empirical = EKFAC(damping=1e-2, fisher="empirical").scores(task, start)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other_seed) and not np.allclose(first, empirical)
    assert np.corrcoef(first.ravel(), empirical.ravel())[0, 1] > 0.5


def test_duplicates_help_and_dict_inputs_agree(digits, curricula):
    """Own duplicates: negative (helpful) self-scores; a keyword-input twin task gives the same scores."""
    task = DuplicateDigits(**SIZES)
    final = ensemble_checkpoints(task, curricula[:1])
    scores = get_peer("ekfac").scores(task, final)
    assert (np.diag(scores) < 0).all()
    assert np.median([(scores[:, m] < scores[m, m]).sum() for m in range(task.num_test)]) <= task.num_train // 4
    keyword = KeywordDigits(**SIZES)
    twin = EKFAC(fisher="empirical").scores(keyword, ensemble_checkpoints(keyword, curricula[:1]))
    plain = EKFAC(fisher="empirical").scores(digits, ensemble_checkpoints(digits, curricula[:1]))
    np.testing.assert_allclose(twin, plain, rtol=1e-3, atol=1e-4 * np.abs(plain).max())
    assert final.trainings == 1


def test_bad_settings_and_untrackable_models_are_refused(digits):
    with pytest.raises(ValueError, match="strategy"):
        EKFAC(strategy="newton").scores(digits, start_checkpoint(digits))
    with pytest.raises(ValueError, match="fisher"):
        EKFAC(fisher="sampled").scores(digits, start_checkpoint(digits))
    assert tracked_modules(digits.build_model()) == ["0", "2"]
    frozen = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trained nn.Linear"):
        tracked_modules(frozen)
