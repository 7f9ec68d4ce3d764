"""Settings of the simulators: one frozen dataclass per kind, validated in one place.

Each simulator kind declares a :class:`SimulatorConfig` subclass (``config_class``) whose
fields are its settings, each with a ``help`` text (``setting(default, help)``). A simulator
holds one in ``config``; ``fit`` never changes it (fitted state lives in attributes ending in
``_`` and in ``fit_info``). A saved simulator stores ``config.to_params()`` and is rebuilt
with :meth:`SimulatorConfig.from_params`.

Names mean one thing across kinds: ``ridge`` is an absolute penalty, ``*_factor`` a multiple
of a data scale, ``cg_max_iter`` / ``lbfgs_iterations`` / ``lanczos_rank`` name the
algorithm they bound. Names used before are accepted for one release (``renamed``), with a
``DeprecationWarning``, in code and in saved files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from simfluence.errors import UsageError

ConfigT = TypeVar("ConfigT", bound="SimulatorConfig")


def setting(default: Any, help: str) -> Any:
    """A config field with its ``help`` text (a tuple default is fine: configs are frozen)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SimulatorConfig:
    """Base of the settings dataclasses; a kind without settings uses it as is."""

    renamed: ClassVar[Mapping[str, str]] = {}
    """Old setting names still accepted (for one release), mapped to their new names."""
    retired: ClassVar[Mapping[str, Any]] = {}
    """Settings that no longer exist, with the one value that behaves as today (``None``: any value
    does); files saved with that value still load, the setting being dropped."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~simfluence.errors.UsageError` naming the first setting out of range.

        Subclasses check their own fields after ``super().validate()`` and may normalise
        values (``int`` for integral floats, tuples for sequences) with :meth:`_set`.
        """

    def _set(self, name: str, value: Any) -> None:
        """Normalise field ``name`` during validation (the dataclass is frozen afterwards)."""
        object.__setattr__(self, name, value)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each setting's help text, by name."""
        return {item.name: item.metadata.get("help", "") for item in dataclasses.fields(cls)}

    @classmethod
    def from_params(cls: type[ConfigT], params: Mapping[str, Any], source: str = "settings") -> ConfigT:
        """A config from keyword settings (or a saved file's params): old names mapped, unknown names refused."""
        known = {item.name for item in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in params.items():
            if name in cls.retired:
                if cls.retired[name] is not None and value != cls.retired[name]:
                    raise UsageError(f"{name}: this setting was removed; only {cls.retired[name]!r} (what every "
                                     f"fit does now) is accepted, got {value!r}")
                continue
            new = cls.renamed.get(name, name)
            if new != name:
                warnings.warn(f"{source}: '{name}' is now called '{new}'; the old name goes in the next release",
                              DeprecationWarning, stacklevel=3)
                if new in params:
                    raise UsageError(f"{name}: give '{new}' only ('{name}' is its old name)")
            if new not in known:
                raise UsageError(f"{name}: not a setting of {cls.__name__}; settings: {sorted(known) or 'none'}")
            values[new] = value
        return cls(**values)

    def to_params(self) -> dict[str, Any]:
        """The settings as JSON-ready values (tuples as lists), by name."""
        return {item.name: _plain(getattr(self, item.name)) for item in dataclasses.fields(self)}

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TaskConfig(SimulatorConfig):
    """Settings of kinds that read the task (model and data) beside the runs.

    A :class:`~simfluence.tasks.Task` object given as ``task`` is kept by the simulator
    (``task_object``, so its data loads once) and recorded here by name and options.
    """

    task: str | None = dataclasses.field(default=None, metadata={
        "help": "A registered task name; None: the task named in the fitting runs' meta (runs made by collect)."})
    task_options: dict[str, Any] | None = dataclasses.field(default=None, metadata={
        "help": "Options of a task given by name (default: the runs' task_config)."})

    def validate(self) -> None:
        """Check the task name and options are JSON-ready values."""
        super().validate()
        if self.task is not None and not isinstance(self.task, str):
            raise UsageError(f"task: expected a registered task name or a Task, got {type(self.task).__name__}")
        if self.task_options is not None:
            if not isinstance(self.task_options, Mapping):
                raise UsageError(f"task_options: expected a mapping of option names, got {self.task_options!r}")
            self._set("task_options", dict(self.task_options))


def split_task(settings: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(settings, task object)``: a Task given as ``settings["task"]`` replaced by its name and options."""
    task = settings.get("task")
    if task is None or isinstance(task, str) or not hasattr(task, "config"):
        return dict(settings), None
    return {**settings, "task": task.name, "task_options": task.config()}, task


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


# --- shared checks: each raises UsageError naming the setting -----------------------------
def integer(name: str, value: Any, least: int, note: str = "") -> int:
    """``value`` as an int ``>= least`` (integral floats accepted; bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < least:
        raise UsageError(f"{name}: expected an integer >= {least}{note}, got {value!r}")
    return int(value)


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (no truthiness: ``"yes"`` or ``1`` are refused)."""
    if not isinstance(value, bool):
        raise UsageError(f"{name}: expected true or false, got {value!r}")
    return value


def store_path(name: str, value: Any) -> str | None:
    """``value`` as a run store path (a ``str``; ``os.PathLike`` is converted), or ``None``."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{name}: expected a run store path, got {type(value).__name__}")
    return value


def positive(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> float | None:
    """``value`` as a finite float ``> 0`` (or ``>= 0``; or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UsageError(f"{name}: expected a finite number {bound}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def one_of(name: str, value: Any, options: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``options``."""
    if value not in options:
        raise UsageError(f"{name}: expected one of {list(options)}, got {value!r}")
    return value


def positive_grid(name: str, values: Any) -> tuple[float, ...]:
    """A non-empty tuple of finite numbers ``> 0``."""
    grid = tuple(values) if isinstance(values, (list, tuple)) else None
    if not grid:
        raise UsageError(f"{name}: expected a non-empty list of numbers > 0, got {values!r}")
    return tuple(float(positive(name, value)) for value in grid)  # type: ignore[arg-type]
