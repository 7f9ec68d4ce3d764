"""Built-in tasks and the task registry."""

from simfluence.collect.tasks.base import Inputs, Task, TaskData, num_examples, take
from simfluence.collect.tasks.digits import DigitsMLP
from simfluence.collect.tasks.finetune import MiniLMFinetune
from simfluence.collect.tasks.lm import TinyLM
from simfluence.collect.tasks.registry import TaskInfo, get_task, list_tasks, register_task
from simfluence.collect.tasks.text import TextMiniLM

__all__ = ["DigitsMLP", "Inputs", "MiniLMFinetune", "Task", "TaskData", "TaskInfo", "TextMiniLM", "TinyLM", "get_task",
           "list_tasks", "num_examples", "register_task", "take"]
