"""Retraining keeps an emptied step's place in the learning-rate schedule."""

import numpy as np
import torch

from simfluence.collect import train_run
from simfluence.retrain import retrain
from simfluence.runs import PAD
from simfluence.tasks import get_task
from simfluence.tasks.base import take


def train_by_hand(task, curriculum: np.ndarray) -> np.ndarray:
    """float32 ``[T + 1, M]``: plain SGD at the full curriculum's rates, no update at all-padding steps."""
    data = task.data
    model = task.build_model().eval()
    rates = task.learning_rates(curriculum.shape[0])

    def test_losses():
        with torch.no_grad():
            return task.example_losses(model, data.test_inputs, data.test_targets).numpy()

    losses = [test_losses()]
    for step, row in enumerate(curriculum):
        index = torch.as_tensor(row[row != PAD], dtype=torch.int64)
        if index.numel():
            model.zero_grad(set_to_none=True)
            task.example_losses(model, take(data.train_inputs, index), data.train_targets[index]).mean().backward()
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.grad is not None:
                        parameter.sub_(parameter.grad, alpha=float(rates[step]))
        losses.append(test_losses())
    return np.stack(losses)


def test_emptied_step_keeps_the_rates_of_later_steps():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = get_task("digits-mlp", lr_schedule="linear")
        rng = np.random.default_rng(0)
        curriculum = rng.integers(0, task.num_train, (12, 4))
        emptied = curriculum.copy()
        emptied[4] = PAD
        partly = curriculum.copy()
        partly[[2, 9]] = PAD
        partly[7, 1:] = PAD
        expected = [train_by_hand(task, c) for c in (curriculum, emptied, partly)]
        np.testing.assert_allclose(expected[0], train_run(task, curriculum).losses, atol=1e-5)
        for chunk_size in (1, 3):
            losses = retrain(task, np.stack([curriculum, emptied, partly]), chunk_size=chunk_size)
            for got, want in zip(losses, expected):
                np.testing.assert_allclose(got, want, atol=1e-5)
        # The emptied step holds the loss; the steps after it differ from training on the
        # 11 other steps with an 11-step schedule.
        assert np.array_equal(losses[1][5], losses[1][4])
        shorter = train_run(task, np.delete(curriculum, 4, axis=0)).losses
        assert np.abs(losses[1][-1] - shorter[-1]).max() > 1e-4
    finally:
        torch.set_num_threads(previous)
