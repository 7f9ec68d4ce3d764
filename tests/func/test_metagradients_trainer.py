"""Metagradients of a Hugging Face Trainer run (minilm-finetune: AdamW, warm-up + decay, clipping at 1.0).

The replay must be the real Trainer run (its final test losses, through ``retrain``), and its
metagradients must match finite differences of an independent float64 loop driven by the
Trainer's own optimizer, scheduler and ``clip_grad_norm_``.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from simfluence.collect import UniformSampler  # noqa: E402
from simfluence.func.metagradients import metagradients, update_rule  # noqa: E402
from simfluence.retrain import retrain  # noqa: E402
from simfluence.tasks.base import take  # noqa: E402
from simfluence.threads import torch_threads  # noqa: E402

TESTS = [0, 5]


@pytest.fixture(scope="module")
def case():
    """The small minilm-finetune of the collection tests and a 4-step curriculum."""
    from simfluence.tasks.finetune import MiniLMFinetune

    task = MiniLMFinetune(warmup_steps=1, train_per_class=3, test_per_class=2)
    return task, UniformSampler(task.default_pool(), task.batch_size).sample(4, seed=3)


def trainer_loop(task, curriculum, weights):
    """float64 final losses of TESTS: the Trainer's optimizer and scheduler on sum_b w_b loss_b / n."""
    trainer = task.make_trainer(0, curriculum)
    model = trainer.model.double().eval()
    trainer.create_optimizer_and_scheduler(num_training_steps=len(curriculum))
    data = task.data
    for row, row_weights in zip(curriculum, weights):
        index = torch.as_tensor(row, dtype=torch.long)
        losses = task.example_losses(model, take(data.train_inputs, index), data.train_targets[index])
        (losses * torch.as_tensor(row_weights)).sum().div(len(row)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad()
    index = torch.as_tensor(TESTS)
    with torch.no_grad():
        return task.example_losses(model, take(data.test_inputs, index), data.test_targets[index]).numpy()


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1, "lr_schedule": "cosine", "batch_size": 3,
                                          "learning_rate": 1e-4}], ids=["default", "decay-cosine-batch3"])
def test_the_replay_is_the_trainer_run(options):
    from simfluence.tasks.finetune import MiniLMFinetune

    task = MiniLMFinetune(warmup_steps=1, train_per_class=3, test_per_class=2, **options)
    curriculum = UniformSampler(task.default_pool(), task.batch_size).sample(4, seed=3)
    rule = update_rule(task, curriculum)
    assert rule.kind == "adamw" and rule.max_grad_norm == 1.0
    # The Trainer decays every weight but biases and LayerNorm weights: two groups.
    assert [group.weight_decay for group in rule.groups] == [options.get("weight_decay", 0.0), 0.0]
    for group in rule.groups:
        np.testing.assert_allclose(group.rates, task.learning_rates(len(curriculum)))
    with torch_threads(2):
        result = metagradients(task, curriculum, TESTS)
        real = retrain(task, curriculum[None])[0, -1, TESTS]
    np.testing.assert_allclose(result.final_losses, real, rtol=1e-5, atol=1e-5)
    assert result.occurrence.shape == (4, task.batch_size, len(TESTS)) and np.abs(result.occurrence).min() > 0


def test_trainer_metagradients_match_finite_differences(case):
    task, curriculum = case
    weights = np.ones(curriculum.shape)
    entries, eps = [(0, 1), (1, 0), (3, 2)], 1e-4      # step 1 trains at rate 0: its examples act through Adam's moments
    with torch_threads(2):
        exact = metagradients(task, curriculum, TESTS, dtype=torch.float64)
        base = trainer_loop(task, curriculum, weights)
        reference = []
        for t, b in entries:
            up, down = weights.copy(), weights.copy()
            up[t, b] += eps
            down[t, b] -= eps
            reference.append((trainer_loop(task, curriculum, up) - trainer_loop(task, curriculum, down)) / (2 * eps))
    np.testing.assert_allclose(exact.final_losses, base, rtol=1e-9)
    rows, cols = zip(*entries)
    assert np.abs(reference).max() > 1e-2
    np.testing.assert_allclose(exact.occurrence[rows, cols], np.array(reference), rtol=1e-4, atol=1e-6)
