"""Built-in tasks and the task registry."""

from simfluence.collect.tasks.base import Inputs, Task, TaskData, num_examples, take
from simfluence.collect.tasks.registry import TaskInfo, get_task, list_tasks, register_task
from simfluence.collect.tasks.digits import DigitsMLP  # noqa: E402  (registers "digits-mlp")

__all__ = ["DigitsMLP", "Inputs", "Task", "TaskData", "TaskInfo", "get_task", "list_tasks", "num_examples",
           "register_task", "take"]
