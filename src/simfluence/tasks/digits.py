"""``digits-mlp``: fine-tune a small pre-trained MLP on scikit-learn's handwritten digits.

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 grey-scale digits, 10 classes,
bundled with scikit-learn, no download; originally the UCI "Optical Recognition of
Handwritten Digits" test set). A fixed shuffle (``split_seed``) splits the images into

* ``num_test`` test examples,
* ``num_train`` fine-tuning examples (the training set that curricula index),
* pretraining examples taken from the rest: ``pretrain_per_class[k]`` images of class
  ``k``. By default classes 0-4 get 40 images each and classes 5-9 only 2, so the
  starting checkpoint knows half the classes well and the other half barely.

The starting checkpoint is a 64-``hidden``-10 tanh MLP, initialised from ``init_seed``
and pretrained with full-batch Adam for ``pretrain_steps`` steps (well under a second,
cached per process, bit-identical in every process). Fine-tuning is plain SGD on the
batch-mean cross-entropy. Because the checkpoint is weak on classes 5-9, a test
example of such a class improves a lot when, and only when, similar fine-tuning
examples are in the batch: which examples a curriculum holds, and when, visibly
changes each test example's loss trajectory.

Inputs are pixel intensities scaled to [0, 1], centred by the pretraining set's
per-pixel mean and divided by its overall standard deviation: float32 ``[n, 64]``.
Targets are class ids, int64 ``[n]``. Ids are ``"digits-<index in load_digits>"``.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from simfluence.errors import UsageError
from simfluence.tasks.base import Task, TaskData, check_split, output_error
from simfluence.tasks.optim import adam
from simfluence.tasks.registry import register_task
from simfluence.threads import torch_threads

NUM_CLASSES = 10
NUM_PIXELS = 64


@register_task
@dataclass
class DigitsMLP(Task):
    """Digits fine-tuning task; every field is a setting recorded in a run store's meta."""

    name = "digits-mlp"
    description = "64-32-10 MLP pre-trained mostly on digits 0-4, fine-tuned with SGD on 200 sklearn digits"
    source = "sklearn.datasets.load_digits (bundled UCI optical digits); checkpoint pre-trained in-process"

    learning_rate: float = 0.03
    batch_size: int = 4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # These two fields shadow the Task properties of the same name on purpose: here the
    # sizes are settings, known before the data is loaded.
    num_train: int = 200
    num_test: int = 100
    hidden: int = 32
    split_seed: int = 0
    init_seed: int = 0
    pretrain_per_class: tuple[int, ...] = (40, 40, 40, 40, 40, 2, 2, 2, 2, 2)
    pretrain_steps: int = 300
    pretrain_lr: float = 0.01

    def __post_init__(self):
        if len(self.pretrain_per_class) != NUM_CLASSES:
            raise UsageError(f"pretrain_per_class: needs {NUM_CLASSES} counts (one per digit), "
                             f"got {len(self.pretrain_per_class)}")
        self.pretrain_per_class = tuple(int(count) for count in self.pretrain_per_class)

    def load_data(self) -> TaskData:
        """The normalised digit images of the train and test split, with their labels."""
        split = _split(self.split_seed, self.num_train, self.num_test, self.pretrain_per_class)
        images, labels = _digits()
        features = _normalise(images, split["pretrain"])

        def part(indices):
            return (torch.from_numpy(features[indices]), torch.from_numpy(labels[indices]))

        train_x, train_y = part(split["train"])
        test_x, test_y = part(split["test"])
        return TaskData(_ids(split["train"]), _ids(split["test"]), train_x, train_y, test_x, test_y)

    def build_model(self) -> nn.Module:
        """The MLP with the pre-trained starting weights (cached per setting)."""
        model = _mlp(self.hidden)
        state = _pretrained_state(self.hidden, self.split_seed, self.init_seed, self.pretrain_per_class,
                                  self.pretrain_steps, self.pretrain_lr, self.num_train, self.num_test)
        model.load_state_dict(state)
        return model

    def example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy ``[n]`` of the logits ``outputs``."""
        return F.cross_entropy(outputs, targets, reduction="none")

    def example_features(self, split: str) -> np.ndarray:
        """float32 ``[n, 64 + hidden + 10]``: pixels, hidden activations and output error.

        The hidden (tanh) activations are the starting checkpoint's, and so is its output error
        ``softmax - one-hot`` (the factor that, times the hidden activations, is the example's
        gradient of the last layer).
        """
        inputs, targets = self.split_data(split)
        inputs = cast(torch.Tensor, inputs)               # pixels: one tensor
        model = cast(nn.Sequential, self.build_model().eval())
        with torch.no_grad():
            hidden = model[1](model[0](inputs))
            error = output_error(model[2](hidden), targets)
        return torch.cat([inputs, hidden, error], dim=1).numpy()

    def describe_example(self, split: str, index: int) -> np.ndarray:
        """The 8x8 image as float grey levels ``[8, 8]`` in [0, 1], ink dark."""
        rows = _split(self.split_seed, self.num_train, self.num_test, self.pretrain_per_class)[check_split(split)]
        images, _ = _digits()
        return 1.0 - images[rows[index]].reshape(8, 8) / 16.0


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(NUM_PIXELS, hidden), nn.Tanh(), nn.Linear(hidden, NUM_CLASSES))


def _ids(indices: np.ndarray) -> np.ndarray:
    return np.array([f"digits-{index}" for index in indices])


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """Raw images float64 ``[1797, 64]`` (0..16) and labels int64 ``[1797]``.

    Reads the file that ``sklearn.datasets.load_digits`` reads, found without importing
    scikit-learn (1-2 s of start-up in every worker process); a test checks both agree.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scikit-learn is not installed; it provides the digits data (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


@functools.cache
def _split(split_seed: int, num_train: int, num_test: int, pretrain_per_class: tuple[int, ...]) -> dict:
    """Disjoint index arrays into ``load_digits``: ``test``, ``train``, ``pretrain``."""
    _, labels = _digits()
    order = np.random.default_rng(split_seed).permutation(labels.size)
    if num_train + num_test >= labels.size:
        raise UsageError(f"num_train + num_test: {num_train + num_test} leaves no digits for pretraining "
                         f"(there are {labels.size}); use fewer")
    test, train, rest = order[:num_test], order[num_test:num_test + num_train], order[num_test + num_train:]
    parts = []
    for digit, count in enumerate(pretrain_per_class):
        candidates = rest[labels[rest] == digit]
        if count > candidates.size:
            raise UsageError(f"pretrain_per_class[{digit}]: {count} requested, only {candidates.size} "
                             "digits of that class are left after the split; ask for fewer")
        parts.append(candidates[:count])
    pretrain = np.sort(np.concatenate(parts))
    if pretrain.size == 0:
        raise UsageError("pretrain_per_class: all zero; pretraining needs at least one example")
    return {"test": test, "train": train, "pretrain": pretrain}


def _normalise(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """float32 ``[N, 64]``: scaled to [0, 1], centred and scaled by the ``reference`` rows."""
    scaled = images / 16.0
    mean = scaled[reference].mean(axis=0)
    std = (scaled[reference] - mean).std()
    return ((scaled - mean) / std).astype(np.float32)


@functools.cache
def _pretrained_state(hidden, split_seed, init_seed, pretrain_per_class, steps, lr, num_train, num_test) -> dict:
    """State dict of the starting checkpoint (cached: every ``build_model`` call copies it)."""
    split = _split(split_seed, num_train, num_test, pretrain_per_class)
    images, labels = _digits()
    features = _normalise(images, split["pretrain"])
    inputs = torch.from_numpy(features[split["pretrain"]])
    targets = torch.from_numpy(labels[split["pretrain"]])
    # One thread and a private RNG: the checkpoint must be bit-identical in every worker
    # process, whatever the caller's thread count or global seed.
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = _mlp(hidden)
        adam(list(model.parameters()), lambda step: F.cross_entropy(model(inputs), targets), steps, lr)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}
