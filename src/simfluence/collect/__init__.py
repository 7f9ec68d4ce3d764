"""Collect real training runs: curriculum samplers, tasks, trainers, executors.

Typical use::

    from simfluence.collect import collect
    store = collect("digits-mlp", "runs/digits", num_runs=50, num_steps=100, seed=0)
    runs = store.load()            # a RunSet: curricula [R, T, B], losses [R, T+1, M]
"""

from simfluence.collect.collector import collect, collection_meta
from simfluence.collect.curricula import EpochSampler, FixedCurriculum, Sampler, UniformSampler, derive_seed
from simfluence.collect.executors import Chunk, Executor, LocalExecutor, get_executor, run_chunk, run_id_of
from simfluence.collect.tasks import DigitsMLP, Task, TaskData, TaskInfo, get_task, list_tasks, register_task
from simfluence.collect.train import train_run, train_runs_vmap

__all__ = ["Chunk", "DigitsMLP", "EpochSampler", "Executor", "FixedCurriculum", "LocalExecutor", "Sampler",
           "Task", "TaskData", "TaskInfo", "UniformSampler", "collect", "collection_meta", "derive_seed",
           "get_executor", "get_task", "list_tasks", "register_task", "run_chunk", "run_id_of", "train_run",
           "train_runs_vmap"]
