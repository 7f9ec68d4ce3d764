"""The simulator protocol, shared input checks, and pickle-free persistence.

A *simulator* learns from logged runs how a curriculum moves each test example's loss:

* ``fit(runs)`` learns from a :class:`~simfluence.runs.RunSet`;
* ``simulate(curricula, initial_losses)`` maps int ``[R, T, B]`` curricula (``-1`` pads)
  and float ``[R, M]`` losses before training to float32 ``[R, T + 1, M]`` trajectories,
  index 0 being the given initial losses;
* ``save(path)`` / ``load(path)`` persist it as one ``.npz`` of plain arrays plus a JSON
  config string; loading never unpickles (``allow_pickle=False``).

Every fitted simulator also keeps the mean loss change of its fitting runs per step
(``mean_change``, ``[T_fit + 1, M]``), so the mean-trajectory baseline can always be
reported beside it, even from a saved model alone, and a digest of each fitting run
(``fit_digests``, :func:`run_digests`), so that evaluating on runs it was fitted on
(which are not held out) can be flagged.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

from simfluence.errors import UsageError
from simfluence.runs.atomic import atomic_path
from simfluence.runs.interchange import read_npz_arrays
from simfluence.runs.log import PAD, RunDataError, RunSet, validate_curriculum, validate_losses
from simfluence.simulators.config import SimulatorConfig, split_task

FORMAT = "simfluence-simulator"
VERSION = 1
_REGISTRY: dict[str, type[Simulator]] = {}
EXPECTED_ESTIMATORS = ("closed form", "control variate", "sampled")
"""The ways :meth:`Simulator.simulate_expected` computes an expectation (:attr:`Simulator.expected_estimator`)."""


def arrays_checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) of named arrays: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def config_checksum(config: dict) -> str:
    """SHA-256 (hex) of a saved simulator's config (kind, params, fit_info, ...) without its checksums."""
    rest = {key: value for key, value in config.items() if key not in ("checksum", "config_checksum")}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


class ExtrapolationWarning(UserWarning):
    """A simulation goes beyond what the fitting runs covered (:meth:`Simulator.extrapolation`)."""


class NotFittedError(RuntimeError):
    """The simulator was used before ``fit`` (or ``load``)."""


SimulatorT = TypeVar("SimulatorT", bound="Simulator")


FAMILIES = ("learned", "extension", "gradient", "baseline")
"""The groups simulators are listed and benchmarked in, in this order."""


@dataclass(frozen=True)
class Capabilities:
    """What a simulator kind is and can do, declared by its class; read instead of probing.

    The command line's choices and options, the benchmarks' groups and the queries' fast
    paths all come from these declarations (:func:`simulator_kinds`, :func:`capabilities`).

    Attributes:
        family: ``"learned"`` (fitted on logged runs, the core methods), ``"extension"``
            (learned, beyond the core: intervals, pair terms, peers of the idea),
            ``"gradient"`` (additive scores from the model's gradients) or ``"baseline"``.
        task: whether ``fit`` needs the task (model and data) beside the runs:
            ``"none"``, ``"optional"`` (example features come from the task unless passed)
            or ``"required"`` (gradients of the model).
        attribution: its predictions depend on which examples a curriculum holds (the
            baselines' do not), so it attributes and can be scored by LDS.
        ridge: has a ``ridge`` strength, chosen by cross-validation when not given.
        cross_validation: chooses settings by cross-validation over ``cv_folds`` folds.
        device: fits on a torch ``device``.
        precision: fits in a chosen ``dtype`` (``float32`` or ``float64``).
        checkpoints: reads model checkpoints from a run store (``checkpoints``).
        intervals: has :meth:`Simulator.simulate_interval`.
        new_test_examples: can be moved to test examples it was not fitted on
            (``for_test_examples``).
        column_rollout: its rollout is the Simfluence-Linear recurrence of its coefficient
            table, so a query about a few test examples can roll out only their columns
            (:meth:`Simulator.column_rollout`).
        expected_rollout: :meth:`Simulator.simulate_expected` has a closed form (one rollout of
            the expected batch) instead of averaging sampled curricula.
        replay_runs: training runs whose checkpoints it reads instead of learning from the
            logged losses (``0``: the initial model only); ``None``: it learns from the runs.
        trainer_tasks: it reads the task only through its starting model and its own
            training (:func:`~simfluence.collect.train.train_states`), so it runs on tasks
            trained with the Hugging Face Trainer too (the other task-reading kinds replay
            plain SGD or read example features those tasks lack).
        transitions: it is fitted on teacher-forced one-step transitions ``L_{t-1} -> L_t``, so
            its runs must record the losses after at least two consecutive steps (runs collected
            with ``--eval-every k > 1`` have none; the trajectory kinds fit those).
    """

    family: Literal["learned", "extension", "gradient", "baseline"]
    task: Literal["none", "optional", "required"] = "none"
    attribution: bool = True
    ridge: bool = False
    cross_validation: bool = False
    device: bool = False
    precision: bool = False
    checkpoints: bool = False
    intervals: bool = False
    new_test_examples: bool = False
    column_rollout: bool = False
    expected_rollout: bool = False
    replay_runs: int | None = None
    trainer_tasks: bool = False
    transitions: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {FAMILIES}, got {self.family!r}")
        if self.task not in ("none", "optional", "required"):
            raise ValueError(f"task: expected 'none', 'optional' or 'required', got {self.task!r}")


def register(cls: type[SimulatorT]) -> type[SimulatorT]:
    """Class decorator: make simulator class ``cls`` loadable and listed by its ``kind``.

    The class must declare its own ``kind`` and :class:`Capabilities` (not inherit them:
    a subclass that changes the rollout must not inherit a parent's fast paths unseen).
    """
    for name in ("kind", "capabilities"):
        if name not in vars(cls):
            raise TypeError(f"{cls.__name__} must declare its own '{name}' to be registered")
    if not isinstance(cls.capabilities, Capabilities):
        raise TypeError(f"{cls.__name__}.capabilities must be a Capabilities")
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise TypeError(f"simulator kind '{cls.kind}' is registered twice ({_REGISTRY[cls.kind].__name__}, "
                        f"{cls.__name__})")
    _REGISTRY[cls.kind] = cls
    return cls


def simulator_kinds(family: str | None = None, **declared: Any) -> list[str]:
    """Registered kinds, by family (in :data:`FAMILIES` order) then registration order.

    Args:
        family: only this family (see :class:`Capabilities`).
        declared: only kinds whose capabilities have these values, e.g. ``ridge=True`` or
            ``task="required"``.
    """
    known = {item.name for item in fields(Capabilities)}
    unknown = sorted(set(declared) - known)
    if unknown:
        raise TypeError(f"simulator_kinds: unknown capabilities {unknown}; known: {sorted(known)}")
    chosen = [kind for kind, cls in _REGISTRY.items()
              if (family is None or cls.capabilities.family == family)
              and all(getattr(cls.capabilities, key) == value for key, value in declared.items())]
    return sorted(chosen, key=lambda kind: FAMILIES.index(_REGISTRY[kind].capabilities.family))


def simulator_class(kind: str) -> type[Simulator]:
    """The registered class of ``kind``; a :class:`~simfluence.errors.UsageError` naming the known kinds otherwise."""
    if kind not in _REGISTRY:
        raise UsageError(f"unknown simulator '{kind}': choose one of {simulator_kinds()}")
    return _REGISTRY[kind]


def capabilities(kind: str) -> Capabilities:
    """The declared :class:`Capabilities` of simulator ``kind``."""
    return simulator_class(kind).capabilities


def run_folds(num_runs: int, num_folds: int, seed: int) -> list[np.ndarray]:
    """The cross-validation folds of ``num_runs`` runs: ``min(num_folds, num_runs)`` shuffled, near-equal index sets."""
    return np.array_split(np.random.default_rng(seed).permutation(num_runs), min(num_folds, num_runs))


def pool_curricula(pool: np.ndarray, num_steps: int, batch: int, draws: int, seed: int, index: int) -> np.ndarray:
    """Curricula int ``[draws, T, B]`` that :meth:`Simulator.simulate_expected` samples from ``pool`` (bool ``[N]``).

    Each slot is drawn uniformly from the pool (the ``uniform`` sampler). Draw ``d`` of the pool at
    ``index`` is seeded ``derive_seed(derive_seed(seed, index), d)``.
    """
    from simfluence.collect.curricula import derive_seed, pool_sampler

    sampler = pool_sampler("uniform", np.flatnonzero(pool), batch)
    return sampler.sample_many(num_steps, [derive_seed(derive_seed(seed, index), d) for d in range(draws)])


def excess_over(fold_errors, reference: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error ``[W, K]`` over folds of each option's errors minus option ``reference``'s.

    ``fold_errors`` ``[F, W, K]``: ``F >= 2`` folds, ``W`` options, ``K`` kinds of error.
    """
    errors = np.asarray(fold_errors, dtype=np.float64)
    if errors.ndim != 3 or errors.shape[0] < 2 or not 0 <= reference < errors.shape[1]:
        raise ValueError(f"fold_errors: expected [folds >= 2, options > {reference}, errors], got shape {errors.shape}")
    excess = errors - errors[:, reference:reference + 1]                     # [F, W, K]
    return excess.mean(axis=0), excess.std(axis=0, ddof=1) / np.sqrt(errors.shape[0])


def one_standard_error_choice(fold_errors, scores, reference: int = 0) -> int:
    """Index of the best-scoring option among those no worse than option ``reference`` beyond the folds' noise.

    ``fold_errors`` ``[F, W, K]``: each fold's held-out errors of each option (e.g. all-steps and
    final-step MSE); ``scores`` ``[W]``: a cross-validated quality to maximise (e.g. the across-run
    Spearman). An option is allowed where, for every kind of error, its mean excess over the
    reference's across the folds is at most one standard error of that excess (the
    one-standard-error rule; the reference itself always passes). Among the allowed options with a
    finite score the best wins, ties going to the smaller index; with none, the reference.
    """
    scores = np.asarray(scores, dtype=np.float64)
    mean, standard_error = excess_over(fold_errors, reference)
    if scores.shape != (mean.shape[0],):
        raise ValueError(f"scores: expected one per option ({mean.shape[0]}), got shape {scores.shape}")
    allowed = (mean <= standard_error).all(axis=1) & np.isfinite(scores)
    if not allowed.any():
        return reference
    best = np.where(allowed, scores, -np.inf)
    return int(np.flatnonzero(best == best.max())[0])


def mean_change(runs: RunSet) -> np.ndarray:
    """float64 ``[T + 1, M]``: mean over runs of ``L_t - L_0``, linearly interpolated between eval steps."""
    change = (runs.losses - runs.losses[:, :1]).mean(axis=0, dtype=np.float64)
    steps = np.arange(runs.num_steps + 1)
    if runs.every_step:
        return change
    return np.stack([np.interp(steps, runs.eval_steps, change[:, m]) for m in range(runs.num_test)], axis=1)


def mean_prediction(change: np.ndarray, initial: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """float64 ``[R, len(steps), M]``: the mean trajectory ``L_0 + change[t]`` at ``steps``.

    ``change`` is a ``mean_change`` ``[T_fit + 1, M]``, ``initial`` ``[R, M]``; past the last step
    of ``change`` its last value is held. The mean-trajectory baseline
    (:func:`~simfluence.simulators.baselines.mean_trajectory`) is this at every step.
    """
    held = np.minimum(np.asarray(steps), change.shape[0] - 1)
    return initial.astype(np.float64)[:, None, :] + change[held][None].astype(np.float64)


def run_digests(runs: RunSet) -> np.ndarray:
    """Str ``[R]``: SHA-256 (hex) of each run's curriculum and losses before training.

    The digest depends on the run's content only: not its id, nor padding columns that
    none of its steps uses, so a run matches itself whether it comes from a store, an
    interchange file or memory, and whichever runs it was loaded beside.
    """
    curricula = np.asarray(runs.curricula, dtype="<i4")
    initial = np.asarray(runs.losses[:, 0], dtype="<f4")
    digests = []
    for curriculum, losses in zip(curricula, initial):
        used = np.flatnonzero((curriculum != PAD).any(axis=0))
        width = int(used[-1]) + 1 if used.size else 0
        digest = hashlib.sha256(f"simfluence-run:{curriculum.shape[0]}x{width}:{losses.size}:".encode())
        digest.update(np.ascontiguousarray(curriculum[:, :width]).tobytes())
        digest.update(np.ascontiguousarray(losses).tobytes())
        digests.append(digest.hexdigest())
    return np.array(digests, dtype="<U64").reshape(-1)


class Simulator(ABC):
    """Base class of every simulator kind.

    Subclasses declare ``kind``, ``capabilities`` and ``config_class`` and implement ``_fit``,
    ``_simulate`` and the array state (``_arrays`` / ``_restore``).
    """

    kind: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    """What the kind is and can do (see :class:`Capabilities`)."""
    config_class: ClassVar[type[SimulatorConfig]] = SimulatorConfig
    """The kind's settings dataclass (see :mod:`simfluence.simulators.config`)."""
    fitted_params: ClassVar[tuple[str, ...]] = ()
    """Keys that files saved before the ``fitted`` entry kept in ``params`` (e.g. ``auto``'s choice)."""

    def __init__(self, config: SimulatorConfig | None = None, **settings: Any) -> None:
        """Build from a ``config`` of the kind's :attr:`config_class`, or from its fields as keywords."""
        settings, self.task_object = split_task(settings)
        """The :class:`~simfluence.tasks.Task` object given as ``task``, if one was (its name is in ``config``)."""
        if config is None:
            config = self.config_class.from_params(settings, type(self).__name__)
        elif settings:
            raise UsageError(f"{type(self).__name__}: give a config or settings, not both (got {sorted(settings)})")
        elif type(config) is not self.config_class:
            raise UsageError(f"{type(self).__name__}: config must be a {self.config_class.__name__}, "
                             f"got {type(config).__name__}")
        self.config = config
        """The settings (frozen; ``fit`` never changes them)."""
        # Fitted state, None until fit or load; every use is behind _check_fitted, so typed as fitted.
        self.train_ids: np.ndarray = None  # type: ignore[assignment]
        self.test_ids: np.ndarray = None  # type: ignore[assignment]
        self.mean_change: np.ndarray = None  # type: ignore[assignment]
        self.fit_digests: np.ndarray | None = None
        """str ``[R_fit]``: :func:`run_digests` of the fitting runs; ``None`` if saved without them."""
        self.fit_info: dict[str, Any] = {}

    def _batch_size(self, runs: RunSet | None = None) -> int | None:
        """The batch size effects are scaled to under a batch-mean loss (``config.batch_mean``).

        ``runs``' batch size while fitting on them, else the fitting runs' (``fit_info``);
        ``None`` for kinds without that setting or with it off (effects are plain sums).
        """
        if not getattr(self.config, "batch_mean", False):
            return None
        size = runs.batch_size if runs is not None else self.fit_info.get("batch_size")
        return int(size) if isinstance(size, (int, np.integer)) else None

    @property
    def task_spec(self) -> Any:
        """The task to read: the Task object given, else the configured name (``None``: the runs' meta)."""
        return self.task_object if self.task_object is not None else getattr(self.config, "task", None)

    # --- protocol -----------------------------------------------------------------
    def fit(self, runs: RunSet) -> Simulator:
        """Learn from ``runs``; returns ``self``."""
        if not isinstance(runs, RunSet):
            raise TypeError(f"fit expects a RunSet, got {type(runs).__name__}")
        if runs.num_runs == 0:
            raise RunDataError("<runs>", "runs", "no runs to fit on")
        self.train_ids, self.test_ids = runs.train_ids, runs.test_ids
        self.mean_change = mean_change(runs)
        self.fit_digests = run_digests(runs)
        self.fit_info = {"num_runs": runs.num_runs, "num_steps": runs.num_steps, "batch_size": runs.batch_size,
                         "loss_range": [float(runs.losses.min()), float(runs.losses.max())]}
        self._fit(runs)
        return self

    def simulate(self, curricula: Any, initial_losses: Any, source: str = "<input>") -> np.ndarray:
        """Roll out trajectories.

        Args:
            curricula: int ``[R, T, B]`` (or ``[T, B]`` for one run) training-example indices, ``-1`` pads.
            initial_losses: float ``[R, M]`` (or ``[M]``) losses of the test examples before training.
            source: names the inputs in error messages.

        Returns:
            float32 ``[R, T + 1, M]`` (``[T + 1, M]`` for one run) simulated losses; never below 0
            when the fitting runs' losses were all non-negative.
        """
        self._check_fitted()
        curricula = validate_curriculum(curricula, self.train_ids.size, source, "curricula")
        single = curricula.ndim == 2
        if single:
            curricula = curricula[None]
        if curricula.ndim != 3:
            raise RunDataError(source, "curricula", f"expected shape [runs, steps, batch], got {curricula.shape}")
        if curricula.shape[0] == 0 or curricula.shape[1] == 0:
            raise RunDataError(source, "curricula", f"holds no {'runs' if curricula.shape[0] == 0 else 'steps'} "
                               f"(shape {curricula.shape})", "give at least one run of at least one step")
        initial = validate_losses(initial_losses, source, "initial_losses")
        initial = initial[None] if initial.ndim == 1 else initial
        if initial.shape != (curricula.shape[0], self.test_ids.size):
            raise RunDataError(source, "initial_losses", f"shape {initial.shape} does not match (runs, test examples)"
                               f" = ({curricula.shape[0]}, {self.test_ids.size})")
        self._warn_extrapolating(curricula, initial, source)
        trajectories = self._non_negative(self._simulate(curricula, initial.astype(np.float64)))
        return trajectories[0] if single else trajectories

    @property
    def _clips_at_zero(self) -> bool:
        """Whether simulated losses are clipped at 0: the fitting losses were never negative."""
        bounds = self.fit_info.get("loss_range")
        return isinstance(bounds, list) and len(bounds) == 2 and bounds[0] >= 0

    def _non_negative(self, trajectories: np.ndarray) -> np.ndarray:
        """``trajectories`` clipped at 0 (in place) where :attr:`_clips_at_zero`."""
        if self._clips_at_zero:
            # Losses that were never negative (cross-entropy, squared error) are not simulated below 0.
            np.maximum(trajectories, 0, out=trajectories)
        return trajectories

    def simulate_expected(self, pools: Any, num_steps: int, initial_losses: Any, *, batch_size: int | None = None,
                          draws: int = 16, seed: int = 0, source: str = "<input>") -> np.ndarray:
        r"""Expected trajectories of training on random batches from each pool.

        Every batch slot of every step is drawn independently and uniformly from the pool (the
        ``uniform`` sampler). Kinds that declare ``capabilities.expected_rollout`` (see
        :attr:`expected_in_closed_form`) compute the expectation in closed form from one rollout of
        the expected batch (their step is affine in the batch's example counts, and independent
        batches make :math:`E[L_t] = E[\alpha_t] E[L_{t-1}] + E[\beta_t]`; see their
        ``_expected``). The Linear and trajectory kinds in ``log`` / ``margin`` space average ``draws``
        sampled curricula per pool around the closed form of their expected ``z`` (a control variate,
        :attr:`expected_estimator`). The other kinds average :meth:`simulate` over ``draws`` sampled
        curricula per pool. So do the closed forms for a pool's test examples whose expected loss dips
        below 0 where :meth:`simulate` clips at 0 (the clip then binds on some curricula, and the mean of
        clipped trajectories is not the clipped mean); the other pools keep the closed form. Warns
        as :meth:`simulate` does when extrapolating.

        Args:
            pools: bool ``[P, N]`` (or ``[N]`` for one pool): the training examples each pool holds.
            num_steps: ``T``, steps of training.
            initial_losses: float ``[M]`` or ``[P, M]`` losses of the test examples before training.
            batch_size: slots per batch (default: the fitting runs' batch size).
            draws: sampled curricula per pool where there is no closed form (:func:`pool_curricula`).
            seed: seeds those curricula (pool ``p``, draw ``d``: ``derive_seed(derive_seed(seed, p), d)``).
            source: names the inputs in error messages.

        Returns:
            float32 ``[P, T + 1, M]`` (``[T + 1, M]`` for one pool), clipped at 0 as :meth:`simulate`.
        """
        self._check_fitted()
        pools = np.asarray(pools)
        single = pools.ndim == 1
        pools = pools[None] if single else pools
        if pools.dtype != bool or pools.ndim != 2 or pools.shape[1] != self.train_ids.size:
            raise RunDataError(source, "pools", f"expected a bool [pools, {self.train_ids.size}] membership array, "
                               f"got {pools.dtype} {pools.shape}")
        if not pools.any(axis=1).all():
            raise RunDataError(source, "pools", "a pool holds no training example", "give every pool an example")
        if int(num_steps) != num_steps or num_steps < 1:
            raise RunDataError(source, "num_steps", f"must be a positive integer, got {num_steps!r}")
        batch = self.fit_info.get("batch_size") if batch_size is None else batch_size
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise RunDataError(source, "batch_size", f"must be a positive integer, got {batch!r}",
                               "pass batch_size (the fitting runs' is unknown)")
        initial = validate_losses(initial_losses, source, "initial_losses").astype(np.float64)
        if initial.shape == (self.test_ids.size,):
            initial = np.broadcast_to(initial, (pools.shape[0], self.test_ids.size))
        if initial.shape != (pools.shape[0], self.test_ids.size):
            raise RunDataError(source, "initial_losses", f"shape {initial.shape} does not match (pools, test "
                               f"examples) = ({pools.shape[0]}, {self.test_ids.size})")
        if int(draws) != draws or draws < 1:
            raise RunDataError(source, "draws", f"must be a positive integer, got {draws!r}")
        num_steps, batch, draws = int(num_steps), int(batch), int(draws)
        self._warn_extrapolating(np.zeros((1, num_steps, batch), dtype=np.int64), initial, source)
        if not self.expected_in_closed_form:
            trajectories = self._sampled_expected(pools, num_steps, batch, initial, draws, seed, source)
            return trajectories[0] if single else trajectories
        weights = pools / pools.sum(axis=1, keepdims=True)
        trajectories = self._expected(weights, num_steps, batch, np.ascontiguousarray(initial)).astype(np.float32)
        below: np.ndarray = np.asarray((trajectories < 0).any(axis=1) & self._clips_at_zero)   # [P, M]
        if below.any():
            # simulate clips each trajectory at 0; where the expected one dips below, the clip binds on
            # some curricula and the closed form is not the mean of the clipped ones: those pools' test
            # examples are sampled (the other pools keep their closed form).
            rows = np.flatnonzero(below.any(axis=1))
            sampled = self._sampled_expected(pools, num_steps, batch, initial, draws, seed, source, rows)
            for p in rows:
                trajectories[p][:, below[p]] = sampled[p][:, below[p]]
        trajectories = self._non_negative(trajectories)
        return trajectories[0] if single else trajectories

    def _sampled_expected(self, pools: np.ndarray, num_steps: int, batch: int, initial: np.ndarray, draws: int,
                          seed: int, source: str, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[P, T + 1, M]``: :meth:`simulate` averaged over ``draws`` uniform curricula per pool.

        Only the pools ``rows`` (default: all) are sampled, each with the seeds of its own index
        (:func:`pool_curricula`); the other rows are left NaN.
        """
        trajectories = np.full((pools.shape[0], num_steps + 1, self.test_ids.size), np.nan, dtype=np.float32)
        with warnings.catch_warnings():   # simulate_expected has warned once about extrapolating
            warnings.simplefilter("ignore", ExtrapolationWarning)
            for p in range(pools.shape[0]) if rows is None else rows:
                curricula = pool_curricula(pools[p], num_steps, batch, draws, seed, p)
                trajectories[p] = self.simulate(curricula, np.repeat(initial[p][None], len(curricula), 0),
                                                source).mean(axis=0)
        return trajectories

    def _warn_extrapolating(self, curricula: np.ndarray, initial: np.ndarray, source: str) -> None:
        """Warn once per :meth:`extrapolation` problem, attributed to the caller of the public method."""
        for problem in self.extrapolation(curricula, initial):
            warnings.warn(f"{source}: extrapolating: {problem}; simulated losses there are guesses",
                          ExtrapolationWarning, stacklevel=3)

    def extrapolation(self, curricula: np.ndarray, initial: np.ndarray) -> list[str]:
        """How the inputs go beyond the fitting runs.

        More steps, larger batches, or losses before training outside the range of the fitting
        losses. Empty when they do not (or the model was saved without that information).

        Args:
            curricula: int ``[R, T, B]``.
            initial: float ``[R, M]``.
        """
        problems = []
        steps, batch = self.fit_info.get("num_steps"), self.fit_info.get("batch_size")
        if isinstance(steps, int) and curricula.shape[1] > steps:
            problems.append(f"{curricula.shape[1]} steps, the fitting runs had {steps}")
        widest = int((curricula != PAD).sum(axis=2).max()) if curricula.size else 0
        if isinstance(batch, int) and widest > batch:
            problems.append(f"batches of up to {widest} examples, the fitting runs had {batch}")
        bounds = self.fit_info.get("loss_range")
        if isinstance(bounds, list) and len(bounds) == 2 and initial.size:
            low, high = bounds
            margin = 0.5 * (high - low)
            if initial.min() < low - margin or initial.max() > high + margin:
                problems.append(f"losses before training in [{initial.min():.4g}, {initial.max():.4g}], the fitting "
                                f"losses lie in [{low:.4g}, {high:.4g}]")
        return problems

    def simulate_interval(self, curricula: Any, initial_losses: Any, level: float = 0.9,
                          source: str = "<input>") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lower, prediction, upper)``, each like :meth:`simulate`: a ``level`` prediction interval.

        Only kinds that declare ``capabilities.intervals`` have one; the others raise ``TypeError``.
        """
        raise TypeError(f"a '{self.kind}' simulator has no prediction intervals (fit linear-bootstrap)")

    def column_rollout(self, test_index: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """A rollout of only the ``test_index`` test examples, or ``None`` when the kind has none.

        Kinds that declare ``capabilities.column_rollout`` return ``run(curricula [R, T, B],
        initial [R, M]) -> [R, T + 1, len(test_index)]``, equal to slicing the columns of a
        full rollout (without validation or clipping) at ``len(test_index) / M`` of the cost.
        """
        return None

    @property
    def expected_estimator(self) -> str:
        """How :meth:`simulate_expected` computes the expectation, one of :data:`EXPECTED_ESTIMATORS`.

        ``"closed form"``: one rollout of the expected batch (the kind's
        ``capabilities.expected_rollout``); ``"control variate"``: sampled curricula around a closed
        form that holds in the kind's own loss space (unbiased, with far less noise than the plain
        mean; the Linear and trajectory kinds in ``log`` / ``margin`` space); ``"sampled"``: the mean over sampled
        curricula. ``auto``: its chosen candidate's.
        """
        return "closed form" if type(self).capabilities.expected_rollout else "sampled"

    @property
    def expected_in_closed_form(self) -> bool:
        """Whether :meth:`simulate_expected` is in closed form (:attr:`expected_estimator`)."""
        return self.expected_estimator == "closed form"

    def _expected(self, weights: np.ndarray, num_steps: int, batch_size: int, initial: np.ndarray) -> np.ndarray:
        """Closed-form :meth:`simulate_expected` of kinds declaring ``capabilities.expected_rollout``.

        ``weights`` float64 ``[P, N]`` (rows sum to 1: one slot's distribution), ``initial``
        float64 ``[P, M]``; returns ``[P, T + 1, M]`` before clipping.
        """
        raise NotImplementedError(f"'{self.kind}' declares expected_rollout but has no _expected")

    # --- to implement -------------------------------------------------------------
    @abstractmethod
    def _fit(self, runs: RunSet) -> None: ...

    @abstractmethod
    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray: ...

    def _params(self) -> dict[str, Any]:
        """The settings, JSON-ready (``config.to_params()``)."""
        return self.config.to_params()

    def settings(self) -> dict[str, Any]:
        """The settings the simulator was built with, by name (``fit`` never changes them)."""
        return self.config.to_params()

    def _fitted_settings(self) -> dict[str, Any]:
        """Choices ``fit`` made that loading needs before :meth:`_restore` (JSON-ready); none by default."""
        return {}

    def _load_fitted_settings(self, values: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Inverse of :meth:`_fitted_settings`, called by :meth:`load` before :meth:`_restore`."""

    def _arrays(self) -> dict[str, np.ndarray]:
        """Fitted numeric state."""
        return {}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:  # noqa: B027 - optional hook: no state, nothing to do
        """Inverse of :meth:`_arrays`."""

    # --- persistence --------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (an ``.npz``) atomically: arrays plus a JSON config, no pickle."""
        self._check_fitted()
        arrays = {f"state.{name}": np.asarray(value) for name, value in self._arrays().items()}
        arrays.update(train_ids=self.train_ids.astype(str), test_ids=self.test_ids.astype(str),
                      mean_change=np.asarray(self.mean_change))
        if self.fit_digests is not None:
            arrays["fit_digests"] = np.asarray(self.fit_digests, dtype="<U64")
        config = {"format": FORMAT, "version": VERSION, "kind": self.kind, "params": self._params(),
                  "fitted": self._fitted_settings(), "fit_info": self.fit_info, "checksum": arrays_checksum(arrays)}
        # The config decides the simulation too (the kind, the loss range clipped to): covered by its own checksum.
        config["config_checksum"] = config_checksum(json.loads(json.dumps(config)))
        path = Path(path)
        with atomic_path(path, suffix=".npz") as temporary:
            # numpy's stubs let ``**arrays`` fill ``allow_pickle`` (a bool): a false alarm
            np.savez(temporary, config=np.array(json.dumps(config)), **arrays)  # type: ignore[arg-type]
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> Simulator:
        """Load any saved simulator; the class comes from the file's config."""
        source = str(path)
        arrays = read_npz_arrays(path, ("config", "train_ids", "test_ids", "mean_change"), ("fit_digests",),
                                 prefixes=("state.",))
        try:
            config = json.loads(str(arrays["config"].reshape(())))
        except (json.JSONDecodeError, ValueError, RecursionError):
            raise RunDataError(source, "config", "is not a JSON string") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise RunDataError(source, "config.format", f"expected '{FORMAT}': not a saved simulator")
        if config.get("version") != VERSION:
            raise RunDataError(source, "config.version", f"unsupported version {config.get('version')!r}")
        kind = config.get("kind")
        if kind not in _REGISTRY:
            raise RunDataError(source, "config.kind", f"unknown simulator '{kind}'", f"known: {simulator_kinds()}")
        cls = _REGISTRY[kind]
        params, fitted = config.get("params", {}), config.get("fitted", {})
        if not isinstance(params, dict) or not isinstance(fitted, dict):
            raise RunDataError(source, "config.params", "expected JSON objects for params and fitted")
        fitted = {**{key: params[key] for key in cls.fitted_params if key in params}, **fitted}  # older files
        params = {key: value for key, value in params.items() if key not in cls.fitted_params}
        try:
            simulator = cls(**params)
            simulator._load_fitted_settings(fitted)
        except (TypeError, ValueError) as error:   # unknown or out-of-range parameters
            raise RunDataError(source, "config.params", str(error)) from None
        simulator.train_ids, simulator.test_ids = arrays["train_ids"], arrays["test_ids"]
        simulator.mean_change = arrays["mean_change"]
        digests = arrays.get("fit_digests")  # absent in files saved before digests were recorded
        if digests is not None and (digests.dtype.kind != "U" or digests.ndim != 1):
            raise RunDataError(source, "fit_digests", f"expected a 1-D str array, got dtype {digests.dtype} "
                               f"shape {digests.shape}")
        simulator.fit_digests = digests
        simulator.fit_info = config.get("fit_info", {})
        state = {name.removeprefix("state."): value for name, value in arrays.items() if name.startswith("state.")}
        for name, value in [("mean_change", arrays["mean_change"]), *((f"state.{k}", v) for k, v in state.items())]:
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                raise RunDataError(source, name, "holds NaN or inf values: the saved model is broken",
                                   "fit it again")
        try:
            simulator._restore(state)
        except (KeyError, ValueError) as error:
            raise RunDataError(source, "state", f"does not fit a '{kind}' simulator ({error})") from None
        # Last, so that a damaged file whose arrays do not even fit the simulator is named by what is wrong.
        checksum = config.get("checksum")   # absent in files saved before checksums were written
        if checksum is not None and checksum != arrays_checksum({k: v for k, v in arrays.items() if k != "config"}):
            raise RunDataError(source, "checksum", "the arrays do not match the checksum saved with them (the file was "
                               "altered or damaged)", "fit the simulator again")
        saved = config.get("config_checksum")   # absent in files saved before the config was covered
        if saved is not None and saved != config_checksum(config):
            raise RunDataError(source, "config_checksum", "the config (kind, params, fit_info) does not match the "
                               "checksum saved with it (the file was altered or damaged)", "fit the simulator again")
        return simulator

    # --- helpers ------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.train_ids is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(runs) or Simulator.load")

    def fitting_runs_among(self, runs: RunSet) -> int | None:
        """How many of ``runs`` the simulator was fitted on (same digest); ``None`` when unknown."""
        self._check_fitted()
        if self.fit_digests is None:
            return None
        return int(np.isin(run_digests(runs), self.fit_digests).sum())

    def check_compatible(self, runs: RunSet, source: str = "<runs>") -> None:
        """Raise unless ``runs`` use this simulator's training and test ids."""
        self._check_fitted()
        for name, mine, theirs in (("train_ids", self.train_ids, runs.train_ids),
                                   ("test_ids", self.test_ids, runs.test_ids)):
            if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
                raise RunDataError(source, name, "differ from the ids the simulator was fitted on",
                                   "evaluate on runs of the same task")

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self._params().items())
        return f"{type(self).__name__}({params})"
