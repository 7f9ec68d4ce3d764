"""Task registry: built-in tasks register themselves by name; users may add their own."""

from __future__ import annotations

from typing import NamedTuple

from simfluence.collect.tasks.base import Task

_TASKS: dict[str, type[Task]] = {}


class TaskInfo(NamedTuple):
    """One line of ``simfluence tasks``."""

    name: str
    description: str
    source: str


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``get_task(cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.name: a registered task needs a non-empty string name")
    if name in _TASKS and _TASKS[name] is not cls:
        raise ValueError(f"task name '{name}' is already registered by {_TASKS[name].__name__}; choose another name")
    _TASKS[name] = cls
    return cls


def get_task(name: str | Task, **options) -> Task:
    """The task called ``name``, built with ``options`` overriding its defaults (a Task passes through)."""
    if isinstance(name, Task):
        if options:
            raise ValueError("options: give options only with a task name, not with a Task object")
        return name
    if name not in _TASKS:
        raise ValueError(f"task '{name}' is unknown; choose one of: {', '.join(sorted(_TASKS))}")
    try:
        return _TASKS[name](**options)
    except TypeError as error:
        raise ValueError(f"task '{name}': bad options {sorted(options)} ({error})") from None


def list_tasks() -> list[TaskInfo]:
    """Registered tasks, sorted by name."""
    return [TaskInfo(name, cls.description, cls.source) for name, cls in sorted(_TASKS.items())]
