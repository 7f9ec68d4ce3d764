"""Exact metagradients of SGD and AdamW runs (simfluence.func.metagradients) against real training.

The finite-difference reference is an independent float64 training loop (``model.double()``,
``torch.optim.SGD`` or the task's own ``torch.optim.AdamW`` on the weighted batch loss), not the replay
under test.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from simfluence.collect import UniformSampler
from simfluence.collect.train import train_run
from simfluence.evaluate import spearman
from simfluence.func.metagradients import MetagradientResult, metagradients
from simfluence.retrain import retrain
from simfluence.runs import PAD
from simfluence.tasks import get_task
from simfluence.tasks.digits import DigitsMLP
from simfluence.threads import torch_threads

SMALL = {"num_train": 40, "num_test": 12}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: extra threads only add synchronisation (and contention with other tests)."""
    with torch_threads(1):
        yield


@dataclass
class FrozenFirstLayer(DigitsMLP):
    """digits-mlp with its first layer frozen (requires_grad=False): SGD trains the head only."""

    def build_model(self):
        model = super().build_model()
        model[0].requires_grad_(False)
        return model


@dataclass
class AdamWDigits(DigitsMLP):
    """digits-mlp trained by our loop with torch.optim.AdamW: weights decayed, biases not (two groups)."""

    optimizer = "adamw"
    learning_rate: float = 3e-3

    def make_optimizer(self, parameters):
        parameters = list(parameters)
        return torch.optim.AdamW([{"params": [p for p in parameters if p.ndim > 1], "weight_decay": 0.1},
                                  {"params": [p for p in parameters if p.ndim == 1], "weight_decay": 0.0}],
                                 lr=self.learning_rate)


@dataclass
class MomentumDigits(DigitsMLP):
    optimizer = "sgd-momentum"

    def make_optimizer(self, parameters):
        return torch.optim.SGD(parameters, lr=self.learning_rate, momentum=0.9)


def padded_curriculum(task, steps, seed):
    curriculum = UniformSampler(task.default_pool(), 4).sample(steps, seed)
    curriculum[3, 2:] = PAD        # two smaller batches
    curriculum[steps - 2, 1:] = PAD
    return curriculum


def weighted_training(task, curriculum, weights, delta=None):
    """float64 [M] final test losses of a plain float64 loop on sum_b w_tb loss_tb / n_t.

    The optimizer: plain SGD, or the task's own (``make_optimizer``) when it is not an SGD task.
    ``delta``: ((t, b), eps) added to one weight.
    """
    weights = weights.copy()
    if delta is not None:
        (t, b), eps = delta
        weights[t, b] += eps
    model = task.build_model().double().eval()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(trained, lr=task.learning_rate) if task.optimizer == "sgd"
                 else task.make_optimizer(trained))
    data = task.data
    inputs, targets = data.train_inputs.double(), data.train_targets
    for rate, row, row_weights in zip(task.learning_rates(len(curriculum)), curriculum, weights):
        real = row != PAD
        if not real.any():
            continue
        index = torch.as_tensor(row[real], dtype=torch.long)
        w = torch.as_tensor(row_weights[real], dtype=torch.float64)
        for group in optimizer.param_groups:
            group["lr"] = float(rate)
        optimizer.zero_grad()
        (task.example_losses(model, inputs[index], targets[index]) * w).sum().div(real.sum()).backward()
        optimizer.step()
    with torch.no_grad():
        return task.example_losses(model, data.test_inputs.double(), data.test_targets).numpy()


def test_replay_with_unit_weights_is_train_run():
    task = get_task("digits-mlp", lr_schedule="linear", warmup_steps=3, **SMALL)
    curriculum = padded_curriculum(task, 24, seed=0)
    result = metagradients(task, curriculum)
    np.testing.assert_allclose(result.final_losses, train_run(task, curriculum).losses[-1], rtol=1e-5, atol=1e-6)
    assert result.occurrence.shape == (24, 4, 12) and result.occurrence.dtype == np.float64
    assert (result.occurrence[curriculum == PAD] == 0).all() and (result.occurrence[curriculum != PAD] != 0).all()
    np.testing.assert_allclose(result.learning_rates, task.learning_rates(24))


@pytest.mark.parametrize("task, hvp", [(get_task("digits-mlp", lr_schedule="linear", warmup_steps=3, **SMALL), "reverse"),
                                       (get_task("digits-mlp", lr_schedule="cosine", **SMALL), "forward"),
                                       (FrozenFirstLayer(**SMALL), "reverse")],
                         ids=["linear-schedule", "forward-over-reverse", "frozen-layer"])
def test_metagradient_matches_finite_differences_of_real_retraining(task, hvp):
    curriculum = padded_curriculum(task, 20, seed=1)
    weights = (curriculum != PAD).astype(np.float64)
    entries = [(0, 0), (3, 1), (7, 2), (12, 3), (18, 0), (19, 1)]
    eps = 1e-4
    reference = np.stack([(weighted_training(task, curriculum, weights, (entry, eps))
                           - weighted_training(task, curriculum, weights, (entry, -eps))) / (2 * eps)
                          for entry in entries])                                                   # [E, M]
    np.testing.assert_allclose(weighted_training(task, curriculum, weights),
                               metagradients(task, curriculum, dtype=torch.float64).final_losses, rtol=1e-12)
    rows, cols = zip(*entries)
    exact = metagradients(task, curriculum, hvp=hvp, dtype=torch.float64).occurrence[rows, cols]    # [E, M]
    assert np.abs(reference).max() > 1e-3   # the effects are not vanishing
    np.testing.assert_allclose(exact, reference, rtol=1e-5, atol=1e-8)
    single = metagradients(task, curriculum, hvp=hvp).occurrence[rows, cols]                        # float32 run
    assert np.linalg.norm(single - reference) / np.linalg.norm(reference) < 1e-3


def test_first_order_removal_predicts_real_retraining():
    task = get_task("digits-mlp", **SMALL)
    curriculum = UniformSampler(task.default_pool(), 4).sample(30, seed=2)
    result = metagradients(task, curriculum)
    removed = np.random.default_rng(0).choice(np.unique(curriculum), size=20, replace=False)
    edited = np.stack([np.where(curriculum == example, PAD, curriculum) for example in removed])
    actual = retrain(task, edited)[:, -1].astype(np.float64)                                      # [20, M]
    predicted = result.predict_removals([[example] for example in removed])                          # [20, M]
    assert np.nanmean(spearman(predicted, actual, axis=0)) > 0.8   # 0.97-0.99 over curriculum seeds
    effect, real_effect = predicted - result.final_losses, actual - result.final_losses
    visible = np.abs(real_effect) > 1e-3
    assert visible.sum() > 50 and np.mean(np.sign(effect[visible]) == np.sign(real_effect[visible])) > 0.9


def test_checkpointing_recomputes_the_same_numbers():
    task = get_task("digits-mlp", **SMALL)
    curriculum = UniformSampler(task.default_pool(), 4).sample(25, seed=3)
    curriculum[10] = PAD                                   # an empty step: skipped, like retrain
    stored = metagradients(task, curriculum, checkpoint_every=1)
    for every in (None, 7, 25, 100):
        result = metagradients(task, curriculum, checkpoint_every=every)
        np.testing.assert_allclose(result.occurrence, stored.occurrence, rtol=1e-12, atol=0)
        np.testing.assert_allclose(result.final_losses, stored.final_losses, rtol=1e-12, atol=0)
    assert metagradients(task, curriculum).checkpoint_every == 5
    assert (stored.occurrence[10] == 0).all()
    # Chunks of test examples and a subset of them give the same columns, in either way of differentiating.
    for hvp in ("reverse", "forward"):
        subset = metagradients(task, curriculum, [5, 0, 11], test_chunk=2, hvp=hvp, checkpoint_every=4)
        np.testing.assert_allclose(subset.occurrence, stored.occurrence[:, :, [5, 0, 11]], rtol=1e-4, atol=1e-6)


def test_an_empty_step_is_skipped_and_keeps_its_place_in_the_schedule():
    task = get_task("digits-mlp", **SMALL)
    curriculum = UniformSampler(task.default_pool(), 4).sample(12, seed=4)
    with_gap = np.insert(curriculum, 5, PAD, axis=0)
    gap, plain = metagradients(task, with_gap), metagradients(task, curriculum)
    np.testing.assert_allclose(gap.final_losses, plain.final_losses, rtol=1e-6)
    np.testing.assert_allclose(np.delete(gap.occurrence, 5, axis=0), plain.occurrence, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gap.final_losses, retrain(task, with_gap[None])[0, -1], rtol=1e-5, atol=1e-6)


def test_removal_weights_per_example_scores_and_predictions():
    curriculum = np.array([[0, 1, 2, 3], [0, 0, PAD, PAD], [5, PAD, PAD, PAD]], dtype=np.int32)
    occurrence = np.arange(24, dtype=np.float64).reshape(3, 4, 2) * (curriculum != PAD)[..., None]
    result = MetagradientResult(occurrence, np.array([1.0, 2.0]), curriculum, np.arange(2), np.ones(3), 1, 0.0)
    np.testing.assert_allclose(result.removal_weights([0, 5, 7]),
                               [[-1, 1 / 3, 1 / 3, 1 / 3], [-1, -1, 0, 0], [-1, 0, 0, 0]])
    scores = result.per_example(8)
    np.testing.assert_allclose(scores[0], occurrence[0, 0] + occurrence[1, 0] + occurrence[1, 1])
    np.testing.assert_allclose(scores[[4, 6, 7]], 0)
    delta = result.removal_weights([1])
    np.testing.assert_allclose(result.predict_removal([1]), [1.0, 2.0] + np.einsum("tb,tbm->m", delta, occurrence))
    np.testing.assert_allclose(result.predict_removals([[1], [4]]), [result.predict_removal([1]), [1.0, 2.0]])
    with pytest.raises(ValueError, match="num_train"):
        result.per_example(3)


def test_a_language_model_with_padded_token_targets_replays_its_run():
    # tiny-lm: token inputs with an attention mask and per-position targets, trained by our loop.
    task = get_task("tiny-lm", train_per_lexname=4, test_per_lexname=2, pretrain_steps=5)
    curriculum = UniformSampler(task.default_pool(), 4).sample(3, seed=6)
    result = metagradients(task, curriculum, [0, 1])
    np.testing.assert_allclose(result.final_losses, train_run(task, curriculum).losses[-1, :2], rtol=1e-5, atol=1e-6)
    assert np.abs(result.occurrence).max() > 0


def test_adamw_of_our_loop_matches_train_run_and_finite_differences():
    task = AdamWDigits(lr_schedule="linear", warmup_steps=2, **SMALL)
    curriculum = UniformSampler(task.default_pool(), 4).sample(12, seed=5)
    curriculum[3, 2:] = PAD                                   # a smaller batch (an empty one is refused below)
    result = metagradients(task, curriculum)
    np.testing.assert_allclose(result.final_losses, train_run(task, curriculum).losses[-1], rtol=1e-5, atol=1e-6)
    weights = (curriculum != PAD).astype(np.float64)
    entries, eps = [(0, 0), (2, 1), (3, 1), (6, 3), (11, 2)], 1e-5
    reference = np.stack([(weighted_training(task, curriculum, weights, (entry, eps))
                           - weighted_training(task, curriculum, weights, (entry, -eps))) / (2 * eps)
                          for entry in entries])                                                   # [E, M]
    exact = metagradients(task, curriculum, dtype=torch.float64)
    np.testing.assert_allclose(exact.final_losses, weighted_training(task, curriculum, weights), rtol=1e-12)
    rows, cols = zip(*entries)
    assert np.abs(reference).max() > 1e-3 and exact.occurrence[0, 0].any()   # step 1 is at rate 0: moments only
    np.testing.assert_allclose(exact.occurrence[rows, cols], reference, rtol=1e-4, atol=1e-7)
    # Test examples in groups (each recomputing the run) and other checkpoints: the same numbers.
    grouped = metagradients(task, curriculum, dtype=torch.float64, test_group=5, checkpoint_every=5)
    np.testing.assert_allclose(grouped.occurrence, exact.occurrence, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="step 2 has no example; adamw cannot skip"):
        metagradients(task, np.insert(curriculum, 1, PAD, axis=0))
    with pytest.raises(ValueError, match="hvp: 'forward' follows plain SGD only"):
        metagradients(task, curriculum, hvp="forward")


def test_rejects_other_optimizers_and_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        metagradients(MomentumDigits(**SMALL), np.zeros((2, 4), dtype=np.int32))
    task = get_task("digits-mlp", **SMALL)
    with pytest.raises(ValueError, match="curriculum"):
        metagradients(task, np.full((2, 4), 40))
    with pytest.raises(ValueError, match="test_index"):
        metagradients(task, np.zeros((2, 4), dtype=np.int32), [12])
    with pytest.raises(ValueError, match="checkpoint_every"):
        metagradients(task, np.zeros((2, 4), dtype=np.int32), checkpoint_every=0)
    with pytest.raises(ValueError, match="hvp"):
        metagradients(task, np.zeros((2, 4), dtype=np.int32), hvp="backward")
    with pytest.raises(ValueError, match="test_group"):
        metagradients(task, np.zeros((2, 4), dtype=np.int32), test_group=0)
