"""TRAK through traker against TRAK's own classification margin and the closed form."""

import logging

import numpy as np
import pytest
import torch

from peer_tasks import SIZES, DuplicateDigits, KeywordDigits, gradients
from simfluence.peers import TRAK, ensemble_checkpoints, get_peer
from simfluence.peers.base import model_at
from simfluence.peers.trak import margin_of_loss
from simfluence.tasks import DigitsMLP


@pytest.fixture(scope="module")
def ensemble(digits, curricula):
    return ensemble_checkpoints(digits, curricula[:2])


def test_generic_margin_is_trak_classification_margin(digits):
    model = digits.build_model()
    inputs, targets = digits.split_data("test")
    with torch.no_grad():
        logits = model(inputs)
        loss = digits.example_losses(model, inputs, targets)
    others = logits.clone()
    others[torch.arange(len(targets)), targets] = -torch.inf
    expected = logits[torch.arange(len(targets)), targets] - others.logsumexp(-1)
    torch.testing.assert_close(margin_of_loss(loss), expected, rtol=1e-4, atol=1e-4)


def test_matches_traker_image_classification_run_directly(digits, ensemble, tmp_path):
    """The adapter (margin from the task's loss) against TRAKer with its built-in classification margin."""
    from trak import TRAKer

    ours = TRAK(proj_dim=16).attribute(digits, ensemble)
    data = digits.data
    traker = TRAKer(model=digits.build_model(), task="image_classification", train_set_size=digits.num_train,
                    save_dir=str(tmp_path), device="cpu", proj_dim=16, use_half_precision=False,
                    logging_level=logging.WARNING)
    for k, state in enumerate(ensemble.states):
        traker.load_checkpoint(state, model_id=k)
        traker.featurize(batch=(data.train_inputs, data.train_targets), num_samples=digits.num_train)
    traker.finalize_features()
    for k, state in enumerate(ensemble.states):
        traker.start_scoring_checkpoint(exp_name="direct", checkpoint=state, model_id=k, num_targets=digits.num_test)
        traker.score(batch=(data.test_inputs, data.test_targets), num_samples=digits.num_test)
    theirs = np.array(traker.finalize_scores(exp_name="direct"), dtype=np.float64)
    np.testing.assert_allclose(ours.scores, -theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
    assert ours.cost.trainings == 2 and ours.cost.train_seconds == ensemble.seconds > 0


@pytest.fixture(scope="module")
def narrow():
    """digits with an 8-unit hidden layer (610 weights), so the exact P x P kernel is cheap."""
    return DigitsMLP(hidden=8, **SIZES)


@pytest.mark.parametrize("num_checkpoints", [1, 2])
def test_closed_form_without_projection(narrow, curricula, num_checkpoints):
    """projector='none': S = -mean_k[c_k Phi_k (Phi_k'Phi_k + lam I)^-1 phi_k(m)] * mean_k Q_k,
    Phi = grad margin / sqrt(P), c_k = 1 / mean |(Phi_k'Phi_k + lam I)^-1|."""
    lam = 1e-2
    digits = narrow
    states = ensemble_checkpoints(digits, curricula[:num_checkpoints]).states
    test_index = np.array([1, 4, 9])
    scores = get_peer("trak", projector="none", lambda_reg=lam).scores(digits, states, test_index=test_index)
    kernel, residual = 0.0, 0.0
    for state in states:
        model = model_at(digits, state)
        with torch.no_grad():
            loss_train = digits.example_losses(model, *digits.split_data("train")).double().numpy()
            loss_test = digits.example_losses(model, *digits.split_data("test")).double().numpy()[test_index]
        q_train, q_test = -np.expm1(-loss_train), -np.expm1(-loss_test)
        # d margin / d theta = -(d loss / d theta) / (1 - p)
        phi = -gradients(digits, state, "train") / q_train[:, None]
        phi_test = -gradients(digits, state, "test", test_index) / q_test[:, None]
        phi, phi_test = phi / np.sqrt(phi.shape[1]), phi_test / np.sqrt(phi.shape[1])
        inverse = np.linalg.inv(phi.T @ phi + lam * np.eye(phi.shape[1]))
        kernel = kernel + phi @ (inverse / np.abs(inverse).mean()) @ phi_test.T
        residual = residual + q_train
    expected = -(kernel / len(states)) * (residual / len(states))[:, None]
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_duplicates_help_and_dict_inputs_agree(digits, curricula):
    """Own duplicates get negative (helpful) scores, also with one checkpoint and the basic projector
    (traker 0.3.2 loses its projection matrix there); a keyword-input twin task scores the same."""
    task = DuplicateDigits(**SIZES)
    for checkpoints in (ensemble_checkpoints(task, curricula[:1]), ensemble_checkpoints(task, curricula)):
        scores = TRAK().scores(task, checkpoints)
        assert (np.diag(scores) < 0).all()
        assert np.median([(scores[:, m] < scores[m, m]).sum() for m in range(task.num_test)]) <= task.num_train // 4
    keyword = KeywordDigits(**SIZES)
    twin = TRAK().scores(keyword, ensemble_checkpoints(keyword, curricula[:2]))
    plain = TRAK().scores(digits, ensemble_checkpoints(digits, curricula[:2]))
    np.testing.assert_allclose(twin, plain, rtol=1e-3, atol=1e-3 * np.abs(plain).max())
