"""The :class:`Task` interface: everything a training run needs, declared in one place.

A task fixes the training set, the test set, the starting checkpoint, the per-example
loss and the optimizer. Collection (:mod:`simfluence.collect.train`) only varies the
curriculum, so two runs of one task differ in nothing but which examples were seen
when, which is what a Simfluence simulator models.

Write your own task by subclassing :class:`Task` (usually as a ``@dataclass`` whose
fields are the task's settings) and implementing :meth:`Task.load_data`,
:meth:`Task.build_model` and :meth:`Task.example_loss`. Inputs may be one tensor or a
dict of tensors (``model(**inputs)``, as Hugging Face models take them), each with the
examples along dimension 0. Gradient-based attribution gets the model, the loss and
the data from the same object, e.g. per-example gradients::

    model = task.build_model()
    params = dict(model.named_parameters())
    def loss(p, x, y):  # one example
        return task.example_losses(model, x[None], y[None], params=p)[0]
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from simfluence.errors import UsageError
from simfluence.tasks.schedules import learning_rates

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
"""Model inputs: a tensor, or a dict of tensors passed as keyword arguments; examples along dim 0."""


def num_examples(inputs: Inputs) -> int:
    """Length of dimension 0 (all tensors of a dict must agree)."""
    if isinstance(inputs, Mapping):
        sizes = {int(value.shape[0]) for value in inputs.values()}
        if len(sizes) != 1:
            raise UsageError(f"inputs: tensors disagree on the number of examples {sorted(sizes)}; "
                             "give every input tensor one row per example")
        return sizes.pop()
    return int(inputs.shape[0])


def take(inputs: Inputs, index: torch.Tensor | int) -> Inputs:
    """Rows ``index`` (any integer shape ``S``) of every tensor: shapes ``[N, ...] -> [*S, ...]``."""
    if isinstance(inputs, Mapping):
        return {key: value[index] for key, value in inputs.items()}
    return inputs[index]


@dataclass(frozen=True)
class TaskData:
    """The data of a task.

    Attributes:
        train_ids: str ``[N]``; curricula index these.
        test_ids: str ``[M]``.
        train_inputs: :data:`Inputs` with ``N`` rows.
        train_targets: tensor ``[N, ...]`` (class ids, token ids, ...).
        test_inputs: :data:`Inputs` with ``M`` rows.
        test_targets: tensor ``[M, ...]``.
    """

    train_ids: np.ndarray
    test_ids: np.ndarray
    train_inputs: Inputs
    train_targets: torch.Tensor
    test_inputs: Inputs
    test_targets: torch.Tensor

    def __post_init__(self):
        for split in ("train", "test"):
            ids = np.asarray(getattr(self, f"{split}_ids")).astype(str)
            object.__setattr__(self, f"{split}_ids", ids)
            if ids.ndim != 1 or ids.size == 0 or np.unique(ids).size != ids.size:
                raise UsageError(f"{split}_ids: expected a non-empty 1-D list of unique strings")
            for part in ("inputs", "targets"):
                rows = num_examples(getattr(self, f"{split}_{part}"))
                if rows != ids.size:
                    raise UsageError(f"{split}_{part}: has {rows} rows but {split}_ids has {ids.size}; "
                                     "give one row per id")


class Task(ABC):
    """A fine-tuning problem: data, starting checkpoint, per-example loss, optimizer.

    Class attributes (set by each subclass):
        name: registry key, e.g. ``"digits-mlp"``.
        description: one line for ``simfluence tasks``.
        source: where the data (and the starting checkpoint) come from.

    Instance attributes (usually dataclass fields, so they can be overridden):
        learning_rate: SGD step size (the peak of the schedule).
        batch_size: default examples per step ``B``.
        lr_schedule: ``"constant"`` (default), ``"linear"`` or ``"cosine"`` decay over the
            run, after ``warmup_steps`` of linear warm-up (:mod:`simfluence.tasks.schedules`).

    Subclasses implement :meth:`load_data`, :meth:`build_model` and :meth:`example_loss`.
    The optimizer is plain SGD (``p <- p - lr * grad`` of the batch-mean loss), which the
    vectorised trainer reproduces exactly; a task that needs another optimizer must
    override :meth:`make_optimizer` and set ``optimizer`` to its name, and can then only
    be collected with ``vectorize=False``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    source: ClassVar[str]
    optimizer: ClassVar[str] = "sgd"
    extras: ClassVar[tuple[str, ...]] = ()
    """Optional extras (``pip install 'simfluence[EXTRA]'``) the task needs, e.g. ``("text",)``."""
    runner: ClassVar[str] = "torch"
    """How runs are trained: ``"torch"`` (our loop and vectorised trainers) or ``"trainer"``
    (the Hugging Face ``Trainer``, through :meth:`make_trainer`)."""
    learning_rate: float
    batch_size: int
    lr_schedule: str = "constant"
    warmup_steps: int = 0

    # --- what a subclass provides --------------------------------------------------
    @abstractmethod
    def load_data(self) -> TaskData:
        """Load (or download) the data; called once per task object, see :attr:`data`."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The fixed starting checkpoint: a fresh module, identical on every call and process."""

    @abstractmethod
    def example_loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """Per-example loss ``[n]`` (nats) of model ``outputs`` for ``targets`` ``[n, ...]``."""

    def default_pool(self) -> np.ndarray:
        """int32 ``[P]``: training-example indices that curricula draw from by default (all)."""
        return np.arange(self.num_train, dtype=np.int32)

    def describe_example(self, split: str, index: int) -> str | np.ndarray:
        """How a person sees example ``index`` of ``split`` (``"train"`` or ``"test"``), e.g. in the report.

        Returns text, or an image: float ``[H, W]`` grey levels or ``[H, W, 3]`` RGB in
        ``[0, 1]`` (1 is white). Default: the example's id; override to show the data.
        """
        return str(getattr(self, f"{check_split(split)}_ids")[index])

    def split_data(self, split: str) -> tuple[Inputs, torch.Tensor]:
        """``(inputs, targets)`` of the ``"train"`` or ``"test"`` examples."""
        data = self.data
        return getattr(data, f"{check_split(split)}_inputs"), getattr(data, f"{split}_targets")

    def example_features(self, split: str) -> np.ndarray:
        """float32 ``[N, D]`` (``"train"``) or ``[M, D]`` (``"test"``): one feature row per example.

        What the featurized simulator (:mod:`simfluence.simulators.featurized`) predicts each
        example's effect from, so it generalises to examples no fitting run contains. Built-in
        tasks return what their model sees of the example; a task without its own features
        can use the generic gradient sketches (``features="gradients"`` there).
        """
        raise NotImplementedError(f"task '{self.name}' defines no example_features; override it or use "
                                  "the featurized simulator with features='gradients'")

    def config(self) -> dict:
        """JSON-serialisable settings of this task object (recorded in a run store)."""
        if dataclasses.is_dataclass(self):
            return json_safe(dataclasses.asdict(self))
        return {"learning_rate": self.learning_rate, "batch_size": self.batch_size,
                "lr_schedule": self.lr_schedule, "warmup_steps": self.warmup_steps}

    # --- derived -------------------------------------------------------------------
    @property
    def data(self) -> TaskData:
        """:meth:`load_data`, cached on this object (the cache is not pickled)."""
        cached = self.__dict__.get("_data_cache")
        if cached is None:
            cached = self.load_data()
            if not isinstance(cached, TaskData):
                raise TypeError(f"{type(self).__name__}.load_data: must return a TaskData, "
                                f"got {type(cached).__name__}")
            self.__dict__["_data_cache"] = cached
        return cached

    def __getstate__(self) -> dict:
        # Workers reload data themselves: cheaper than pickling tensors through a pipe.
        return {key: value for key, value in self.__dict__.items() if key != "_data_cache"}

    @property
    def train_ids(self) -> np.ndarray:
        """Ids (str ``[N]``) of the training examples."""
        return self.data.train_ids

    @property
    def test_ids(self) -> np.ndarray:
        """Ids (str ``[M]``) of the test examples."""
        return self.data.test_ids

    @property
    def num_train(self) -> int:
        """Number of training examples ``N``."""
        return int(self.data.train_ids.size)

    @property
    def num_test(self) -> int:
        """Number of test examples ``M``."""
        return int(self.data.test_ids.size)

    def forward(self, model: nn.Module, inputs: Inputs, params: Mapping[str, torch.Tensor] | None = None) -> Any:
        """Model outputs for ``inputs``; with ``params``, a functional call with those weights."""
        call: Callable[..., Any] = model
        if params is not None:
            def call_with_params(*args, **kwargs):
                # functional_call only reads the mapping; its annotation asks for a dict
                return functional_call(model, params, args, kwargs)  # type: ignore[arg-type]
            call = call_with_params
        return call(**inputs) if isinstance(inputs, Mapping) else call(inputs)

    def example_losses(self, model: nn.Module, inputs: Inputs, targets: torch.Tensor,
                       params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-example loss ``[n]`` of ``model`` (or of ``params`` loaded into it)."""
        return self.example_loss(self.forward(model, inputs, params), targets)

    def learning_rates(self, num_steps: int) -> np.ndarray:
        """float64 ``[T]``: the learning rate of each step of a ``T``-step run."""
        return learning_rates(self.learning_rate, num_steps, self.lr_schedule, self.warmup_steps)

    def make_optimizer(self, parameters) -> torch.optim.Optimizer:
        """The optimizer a run trains ``parameters`` with: plain SGD at ``learning_rate``."""
        return torch.optim.SGD(parameters, lr=self.learning_rate)

    def meta(self) -> dict:
        """What a run store records about the task, so a resume can check it is unchanged."""
        return {"task": self.name, "task_config": self.config(), "optimizer": self.optimizer,
                "learning_rate": float(self.learning_rate), "batch_size": int(self.batch_size),
                "num_train": self.num_train, "num_test": self.num_test}

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({settings})"


def check_split(split: str) -> str:
    """``split`` if it is ``"train"`` or ``"test"``, else a ValueError."""
    if split not in ("train", "test"):
        raise UsageError(f"split: expected 'train' or 'test', got {split!r}")
    return split


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies, on the CPU, of ``module``'s state dict (a checkpoint later training leaves alone)."""
    return {name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()}


def logits_of(outputs: Any) -> Any:
    """The logits of a model's outputs: ``outputs.logits`` (Hugging Face model outputs) or ``outputs`` itself."""
    logits = getattr(outputs, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else outputs


def output_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``softmax(logits) - one_hot(targets)`` ``[n, C]``: the cross-entropy gradient w.r.t. the logits."""
    return torch.softmax(logits, dim=-1) - torch.nn.functional.one_hot(targets, logits.shape[-1]).to(logits.dtype)


def json_safe(value: Any) -> Any:
    """Tuples to lists, NumPy scalars to Python, recursively (for JSON and equality after a round trip)."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
