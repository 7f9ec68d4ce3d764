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
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from simfluence.runs.atomic import atomic_path
from simfluence.runs.interchange import read_npz_arrays
from simfluence.runs.log import PAD, RunDataError, RunSet, validate_curriculum, validate_losses

ANY_VALUE: Any = object()
"""In :attr:`Simulator.retired_params`: a removed setting that never changed the fit, whatever its value."""

FORMAT = "simfluence-simulator"
VERSION = 1
_REGISTRY: dict[str, type[Simulator]] = {}


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


def register(cls: type[SimulatorT]) -> type[SimulatorT]:
    """Class decorator: make simulator class ``cls`` loadable by its ``kind``."""
    _REGISTRY[cls.kind] = cls
    return cls


def simulator_kinds() -> list[str]:
    """The registered simulator kinds, sorted."""
    return sorted(_REGISTRY)


def mean_change(runs: RunSet) -> np.ndarray:
    """float64 ``[T + 1, M]``: mean over runs of ``L_t - L_0``, linearly interpolated between eval steps."""
    change = (runs.losses - runs.losses[:, :1]).mean(axis=0, dtype=np.float64)
    steps = np.arange(runs.num_steps + 1)
    if runs.every_step:
        return change
    return np.stack([np.interp(steps, runs.eval_steps, change[:, m]) for m in range(runs.num_test)], axis=1)


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
    """Base class: subclasses implement ``_fit``, ``_simulate``, ``_params`` and the array state."""

    kind: ClassVar[str]
    fitted_params: ClassVar[tuple[str, ...]] = ()
    """Keys of :meth:`_params` that record fitted state for loading (e.g. ``auto``'s choice), not settings."""
    retired_params: ClassVar[tuple[tuple[str, Any], ...]] = ()
    """Settings removed from the class, each with the one value a saved file may still hold for it.

    ``(name, value)``: :meth:`load` drops ``name`` from an old file's params when it holds ``value``
    (the removed option's default, which the fit did not depend on; :data:`ANY_VALUE`: whatever it
    holds) and refuses the file with a one-line error otherwise.
    """

    def __init__(self) -> None:
        # Fitted state, None until fit or load; every use is behind _check_fitted, so typed as fitted.
        self.train_ids: np.ndarray = None  # type: ignore[assignment]
        self.test_ids: np.ndarray = None  # type: ignore[assignment]
        self.mean_change: np.ndarray = None  # type: ignore[assignment]
        self.fit_digests: np.ndarray | None = None
        """str ``[R_fit]``: :func:`run_digests` of the fitting runs; ``None`` if saved without them."""
        self.fit_info: dict[str, Any] = {}

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
        for problem in self.extrapolation(curricula, initial):
            warnings.warn(f"{source}: extrapolating: {problem}; simulated losses there are guesses",
                          ExtrapolationWarning, stacklevel=2)
        trajectories = self._simulate(curricula, initial.astype(np.float64))
        bounds = self.fit_info.get("loss_range")
        if isinstance(bounds, list) and len(bounds) == 2 and bounds[0] >= 0:
            # Losses that were never negative (cross-entropy, squared error) are not simulated below 0.
            np.maximum(trajectories, 0, out=trajectories)
        return trajectories[0] if single else trajectories

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

    # --- to implement -------------------------------------------------------------
    @abstractmethod
    def _fit(self, runs: RunSet) -> None: ...

    @abstractmethod
    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray: ...

    def _params(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The settings the simulator was built with: :meth:`_params` without :attr:`fitted_params`.

        ``fit`` never changes them (fitted state lives in attributes ending in ``_`` and ``fit_info``).
        """
        return {key: value for key, value in self._params().items() if key not in self.fitted_params}

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
                  "fit_info": self.fit_info, "checksum": arrays_checksum(arrays)}
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
        params = config.get("params", {})
        if isinstance(params, dict):
            params = cls._without_retired(params, source)
        try:
            simulator = cls(**params)
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

    @classmethod
    def _without_retired(cls, params: dict[str, Any], source: str, field: str = "config.params") -> dict[str, Any]:
        """Saved ``params`` (``field`` of ``source``) without the :attr:`retired_params`.

        A one-line :class:`RunDataError` where a retired setting holds a value that mattered.
        """
        params = dict(params)
        for name, accepted in cls.retired_params:
            if name not in params:
                continue
            value = params.pop(name)
            if accepted is not ANY_VALUE and value != accepted:
                raise RunDataError(source, f"{field}.{name}", f"is {value!r}: '{cls.kind}' no longer has this "
                                   f"setting (only {accepted!r}, its old default, still loads)",
                                   "fit the simulator again with the current version")
        return params

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
