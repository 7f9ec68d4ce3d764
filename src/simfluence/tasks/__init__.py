"""Tasks: the :class:`Task` interface, the built-in tasks, their registry and learning-rate schedules."""

from simfluence.tasks.base import Inputs, Task, TaskData, num_examples, take
from simfluence.tasks.digits import DigitsMLP
from simfluence.tasks.finetune import MiniLMFinetune
from simfluence.tasks.lm import TinyLM
from simfluence.tasks.registry import TaskInfo, get_task, list_tasks, register_task
from simfluence.tasks.text import TextMiniLM

__all__ = ["DigitsMLP", "Inputs", "MiniLMFinetune", "Task", "TaskData", "TaskInfo", "TextMiniLM", "TinyLM", "get_task",
           "list_tasks", "num_examples", "register_task", "take"]
