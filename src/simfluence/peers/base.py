r"""The interface every peer shares: checkpoints in, a score matrix and its cost out.

A *peer* is a training-data attribution method computed by its own maintained library
(TRAK by ``traker``, EK-FAC influence by ``kronfluence``, TracIn-CP by ``captum``), so the
project's simulators can be compared with them on the linear datamodeling score.

Every peer returns, for a task with ``N`` training and ``M`` test examples, a float64
matrix ``S`` ``[N', M']`` over the chosen rows (``train_index``, ``test_index``):

.. math::

    S_{im} \approx \Delta \ell_m(\text{training on example } i),

the method's predicted **change of test example m's loss** from training on example ``i``:
negative means helpful (the loss goes down). Each adapter turns its library's sign and
scale into this orientation; the scales differ by method (see each module and
``docs/peers.md``), and the linear datamodeling score, a rank correlation per test
example, ignores any positive scale per test example.

What a method reads is a :class:`Checkpoints`: model state dicts plus what producing them
cost. Build them with :func:`ensemble_checkpoints` (final weights of ``R`` independent
runs: TRAK's ensemble), :func:`trajectory_checkpoints` (weights along one run, with
learning-rate weights: TracIn-CP) or :func:`start_checkpoint` (the task's starting model);
a plain list of state dicts is accepted too. :meth:`Peer.attribute` returns the scores
with a :class:`Cost`: seconds (training and method) and training-run equivalents, so a
table can compare budgets.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from simfluence.collect.train import train_states
from simfluence.errors import UsageError, require_extra
from simfluence.func.checkpoints import checkpoint_weights, final_states, segment_centres
from simfluence.runs.log import check_indices
from simfluence.tasks.base import Inputs, Task, state_copy, take

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Checkpoints:
    """Model weights a peer reads, and what producing them cost.

    Attributes:
        states: ``K`` state dicts of the task's model (``task.build_model().load_state_dict``).
        weights: float64 ``[K]`` per-checkpoint weights (TracIn-CP: the summed learning rate
            of the steps each checkpoint stands for), or ``None`` where they do not apply.
        trainings: training-run equivalents spent producing ``states`` (one full run of the
            task's usual length is 1; the starting checkpoint is free).
        seconds: wall-clock seconds spent producing them.
        steps: int ``[K]`` the step of each state within its run, where known.
    """

    states: tuple[StateDict, ...]
    weights: np.ndarray | None = None
    trainings: float = 0.0
    seconds: float = 0.0
    steps: np.ndarray | None = None

    def __post_init__(self):
        states = tuple(self.states)
        if not states or not all(isinstance(state, Mapping) for state in states):
            raise UsageError("checkpoints: need at least one model state dict")
        object.__setattr__(self, "states", states)
        if self.weights is not None:
            weights = np.asarray(self.weights, dtype=np.float64)
            if weights.shape != (len(states),) or not np.isfinite(weights).all():
                raise UsageError(f"checkpoints.weights: need {len(states)} finite numbers (one per state), "
                                 f"got shape {weights.shape}")
            object.__setattr__(self, "weights", weights)
        if not self.trainings >= 0 or not self.seconds >= 0:
            raise UsageError(f"checkpoints: trainings and seconds must be >= 0, got {self.trainings}, {self.seconds}")

    def __len__(self) -> int:
        return len(self.states)

    @classmethod
    def of(cls, checkpoints: Checkpoints | StateDict | Sequence[StateDict]) -> Checkpoints:
        """``checkpoints`` as a :class:`Checkpoints`.

        One state dict or a list of them (no weights, no recorded cost) is wrapped; a
        :class:`Checkpoints` passes through.
        """
        if isinstance(checkpoints, Checkpoints):
            return checkpoints
        if isinstance(checkpoints, Mapping):
            return cls((checkpoints,))
        return cls(tuple(checkpoints))


@dataclass(frozen=True)
class Cost:
    """What one attribution cost.

    Attributes:
        trainings: training-run equivalents the checkpoints needed (``Checkpoints.trainings``).
        train_seconds: seconds spent producing the checkpoints (``Checkpoints.seconds``).
        method_seconds: seconds the method itself took (featurizing, factors, scoring).
        checkpoints: how many checkpoints the method read.
    """

    trainings: float
    train_seconds: float
    method_seconds: float
    checkpoints: int

    @property
    def seconds(self) -> float:
        """Total wall-clock seconds: training plus the method."""
        return self.train_seconds + self.method_seconds

    def as_dict(self) -> dict:
        """JSON-ready fields, with ``seconds`` (the total)."""
        return {"trainings": float(self.trainings), "train_seconds": float(self.train_seconds),
                "method_seconds": float(self.method_seconds), "seconds": float(self.seconds),
                "checkpoints": int(self.checkpoints)}


@dataclass(frozen=True)
class Attribution:
    """A peer's scores and cost.

    Attributes:
        method: the peer's name (``"trak"``, ``"ekfac"``, ``"tracin"``).
        scores: float64 ``[N', M']``: predicted change of test loss ``m`` from training on ``i``.
        train_index: int64 ``[N']`` training-example rows of ``scores``.
        test_index: int64 ``[M']`` test-example columns of ``scores``.
        cost: :class:`Cost`.
    """

    method: str
    scores: np.ndarray
    train_index: np.ndarray
    test_index: np.ndarray
    cost: Cost


@dataclass
class Peer(ABC):
    """An attribution method computed by its own library; subclasses are dataclasses of its settings.

    Class attributes:
        name: registry key.
        module: the library's import name (checked first, to name the ``peers`` extra if missing).
        library: ``"distribution==version"`` pinned in ``pyproject.toml``.
    """

    name: ClassVar[str]
    module: ClassVar[str]
    library: ClassVar[str]
    chunk_size: int = field(default=256, kw_only=True)
    """Examples per batch handed to the library."""

    def attribute(self, task: Task, checkpoints: Checkpoints | StateDict | Sequence[StateDict], *,
                  train_index=None, test_index=None, progress: bool = False) -> Attribution:
        """Scores with their cost.

        Args:
            task: the task (data, model, per-example loss).
            checkpoints: a :class:`Checkpoints`, or one state dict or a list of them.
            train_index: int ``[N']`` training examples to score (default all ``N``); the method
                still sees the whole training set where it needs it (TRAK's kernel, EK-FAC's factors).
            test_index: int ``[M']`` test examples (default all ``M``).
            progress: show the library's progress bars.

        Returns:
            An :class:`Attribution`, scores float64 ``[N', M']`` (see the module docstring).
        """
        require_extra("peers", self.module, f"the '{self.name}' peer")
        checkpoints = Checkpoints.of(checkpoints)
        train_index = check_indices(train_index, task.num_train, "train_index")
        test_index = check_indices(test_index, task.num_test, "test_index")
        if self.chunk_size < 1:
            raise UsageError(f"chunk_size: must be >= 1, got {self.chunk_size}")
        start = time.perf_counter()
        scores = np.asarray(self._scores(task, checkpoints, train_index, test_index, progress), dtype=np.float64)
        seconds = time.perf_counter() - start
        if scores.shape != (train_index.size, test_index.size):
            raise RuntimeError(f"{self.name}: the library returned scores of shape {scores.shape}, expected "
                               f"{(train_index.size, test_index.size)}")
        if not np.isfinite(scores).all():
            raise RuntimeError(f"{self.name}: the library returned non-finite scores; check the checkpoints "
                               "(a diverged run?) and the method's damping/regularisation")
        cost = Cost(float(checkpoints.trainings), float(checkpoints.seconds), seconds, len(checkpoints))
        return Attribution(self.name, scores, train_index, test_index, cost)

    def scores(self, task: Task, checkpoints: Checkpoints | StateDict | Sequence[StateDict], *,
               train_index=None, test_index=None, progress: bool = False) -> np.ndarray:
        """float64 ``[N', M']``: :meth:`attribute`'s scores alone."""
        return self.attribute(task, checkpoints, train_index=train_index, test_index=test_index,
                              progress=progress).scores

    @abstractmethod
    def _scores(self, task: Task, checkpoints: Checkpoints, train_index: np.ndarray, test_index: np.ndarray,
                progress: bool) -> np.ndarray:
        """The method proper: float ``[N', M']`` in the shared orientation."""


# --- what a method needs from the task --------------------------------------------------
def model_at(task: Task, state: StateDict) -> torch.nn.Module:
    """A fresh ``task.build_model()`` with ``state`` loaded, in eval mode (no dropout, as in training)."""
    model = task.build_model()
    model.load_state_dict(state)
    return model.eval()


def split_rows(task: Task, split: str, index: np.ndarray) -> tuple[Inputs, torch.Tensor]:
    """``(inputs, targets)`` of rows ``index`` of ``split``."""
    inputs, targets = task.split_data(split)
    rows = torch.as_tensor(index, dtype=torch.long)
    return take(inputs, rows), targets[rows]


def one(inputs: Inputs) -> Inputs:
    """A single example's inputs (no batch dimension) with a batch dimension of 1 added."""
    if isinstance(inputs, Mapping):
        return {key: value.unsqueeze(0) for key, value in inputs.items()}
    return inputs.unsqueeze(0)


def frozen_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that training leaves alone (``requires_grad=False``)."""
    return [name for name, value in model.named_parameters() if not value.requires_grad]


# --- producing checkpoints ---------------------------------------------------------------
def ensemble_checkpoints(task: Task, curricula) -> Checkpoints:
    """The final weights of ``R`` runs trained along ``curricula`` int ``[R, T, B]`` (TRAK's ensemble).

    Costs ``R`` training runs (``trainings = R``), timed.
    """
    curricula = np.asarray(curricula)
    if curricula.ndim == 2:
        curricula = curricula[None]
    start = time.perf_counter()
    states = final_states(task, curricula)
    return Checkpoints(tuple(states), trainings=float(curricula.shape[0]), seconds=time.perf_counter() - start,
                       steps=np.full(len(states), curricula.shape[1], dtype=np.int64))


def trajectory_checkpoints(task: Task, curriculum, steps: Sequence[int] | int) -> Checkpoints:
    """The weights along one run at ``steps``, weighted for TracIn-CP.

    Args:
        task: the task.
        curriculum: int ``[T, B]`` the run's batches.
        steps: checkpoint steps in ``0..T`` (0: the starting weights), or a count ``K`` for the
            centres ``floor((2k + 1) T / 2K)`` of ``K`` equal segments of the run, so that each
            stands for about ``T / K`` steps.

    Returns:
        :class:`Checkpoints` with ``weights`` float64 ``[K]`` from
        :func:`~simfluence.func.checkpoints.checkpoint_weights` (each checkpoint's summed
        learning rate; they sum to the run's total) and ``trainings`` the fraction of the run
        replayed (``max(steps) / T``).
    """
    curriculum = np.asarray(curriculum)
    if curriculum.ndim != 2:
        raise UsageError(f"curriculum: expected shape [steps, batch], got {curriculum.shape}")
    num_steps = curriculum.shape[0]
    if isinstance(steps, (int, np.integer)):  # noqa: SIM108 - the branches narrow the type for mypy
        wanted = segment_centres(num_steps, int(steps), "steps")
    else:
        wanted = list(steps)
    chosen = np.asarray(sorted({int(step) for step in wanted}), dtype=np.int64)
    weights = checkpoint_weights(task.learning_rates(num_steps), chosen)
    start = time.perf_counter()
    states = train_states(task, curriculum, chosen.tolist())
    return Checkpoints(tuple(states), weights=weights, trainings=float(chosen.max()) / num_steps,
                       seconds=time.perf_counter() - start, steps=chosen)


def start_checkpoint(task: Task) -> Checkpoints:
    """The task's starting model (no training: ``trainings = 0``)."""
    return Checkpoints((state_copy(task.build_model()),), trainings=0.0, steps=np.zeros(1, dtype=np.int64))
