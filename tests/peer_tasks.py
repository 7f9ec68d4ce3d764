"""Tiny tasks for the peer tests (tests/peers): digits at 40 training and 10 test examples."""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from simfluence.func.gradients import per_example_gradients, trainable_params
from simfluence.peers.base import model_at, split_rows
from simfluence.tasks import DigitsMLP
from simfluence.tasks.base import TaskData

SIZES = {"num_train": 40, "num_test": 10}


@dataclass
class DuplicateDigits(DigitsMLP):
    """digits-mlp whose test examples are copies of its first ``num_test`` training examples."""

    def load_data(self) -> TaskData:
        data = super().load_data()
        m = self.num_test
        ids = np.array([f"copy-of-{name}" for name in data.train_ids[:m]])
        return TaskData(data.train_ids, ids, data.train_inputs, data.train_targets,
                        data.train_inputs[:m].clone(), data.train_targets[:m].clone())


class KeywordMLP(nn.Module):
    """The digits MLP called as ``model(pixels=..., scale=...)`` on ``pixels * scale``."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, pixels, scale):
        return self.mlp(pixels * scale)


@dataclass
class KeywordDigits(DigitsMLP):
    """digits-mlp with dict inputs ``{"pixels": [n, 64], "scale": ones [n, 1]}``: same numbers."""

    def load_data(self) -> TaskData:
        data = super().load_data()

        def keyword(x):
            return {"pixels": x, "scale": torch.ones(x.shape[0], 1)}

        return TaskData(data.train_ids, data.test_ids, keyword(data.train_inputs), data.train_targets,
                        keyword(data.test_inputs), data.test_targets)

    def build_model(self) -> nn.Module:
        return KeywordMLP(super().build_model())


@dataclass
class LinearDigits(DigitsMLP):
    """Digits with a one-layer model ``nn.Linear(64, 10)`` (seeded initialisation, then fixed)."""

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = nn.Linear(64, 10)
        return model


def gradients(task, state, split, index=None):
    """float64 [n, P]: per-example loss gradients at ``state`` (simfluence.func, not the libraries)."""
    model = model_at(task, state)
    inputs, targets = task.split_data(split) if index is None else split_rows(task, split, index)
    return per_example_gradients(task, model, trainable_params(model), inputs, targets).to(torch.float64).numpy()
