"""Task registry: built-in tasks register themselves by name; users may add their own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from simfluence.errors import UsageError
from simfluence.runs.log import RunDataError
from simfluence.tasks.base import Task

_TASKS: dict[str, type[Task]] = {}


class TaskInfo(NamedTuple):
    """One line of ``simfluence tasks``."""

    name: str
    description: str
    source: str
    extras: tuple[str, ...] = ()


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``get_task(cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{cls.__name__}.name: a registered task needs a non-empty string name")
    if name in _TASKS and _TASKS[name] is not cls:
        raise UsageError(f"task name '{name}' is already registered by {_TASKS[name].__name__}; choose another name")
    _TASKS[name] = cls
    return cls


def get_task(name: str | Task, **options) -> Task:
    """The task called ``name``, built with ``options`` overriding its defaults (a Task passes through)."""
    if isinstance(name, Task):
        if options:
            raise UsageError("options: give options only with a task name, not with a Task object")
        return name
    if name not in _TASKS:
        raise UsageError(f"task '{name}' is unknown; choose one of: {', '.join(sorted(_TASKS))}")
    try:
        return _TASKS[name](**options)
    except TypeError as error:
        raise UsageError(f"task '{name}': bad options {sorted(options)} ({error})") from None


def task_for_runs(task: str | Task | None, options: Mapping[str, Any] | None, meta: Mapping[str, Any],
                  fix: str) -> Task:
    """The task behind some runs.

    ``task`` (a Task, or a name built with ``options``), else the one the runs' ``meta`` names,
    with the options it recorded unless ``options`` are given.

    ``fix`` completes the error raised when neither names a task.
    """
    if isinstance(task, Task):
        return task
    if task is None:
        if "task" not in meta:
            raise RunDataError("<runs>", "meta.task", "is missing, so the model and data behind the runs are unknown",
                               fix)
        task, options = meta["task"], meta.get("task_config", {}) if options is None else options
    return get_task(task, **dict(options or {}))


def replayable_task(task: Task) -> Task:
    """``task`` if our trainers can replay its runs (gradient methods, featurized), else a :class:`RunDataError`."""
    if task.runner != "torch":
        raise RunDataError("<runs>", "meta.task", f"task '{task.name}' trains with the Hugging Face Trainer "
                           f"({task.optimizer}), which gradient methods and featurized cannot replay (they replay "
                           "plain SGD)", "use auto or linear-trajectory for these runs")
    return task


def list_tasks() -> list[TaskInfo]:
    """Registered tasks, sorted by name."""
    return [TaskInfo(name, cls.description, cls.source, tuple(cls.extras)) for name, cls in sorted(_TASKS.items())]
