"""Collect real training runs of a task: curriculum samplers, trainers, executors, the collector.

Typical use::

    from simfluence.collect import collect
    store = collect("digits-mlp", "runs/digits", num_runs=50, num_steps=100, seed=0)
    runs = store.load()            # a RunSet: curricula [R, T, B], losses [R, T+1, M]

The tasks themselves live in :mod:`simfluence.tasks`; recording a training loop of your own
(or a Hugging Face ``Trainer``) in :mod:`simfluence.recorder`.
"""

from simfluence.collect.collector import collect, collection_meta
from simfluence.collect.curricula import EpochSampler, FixedCurriculum, Sampler, UniformSampler, derive_seed
from simfluence.collect.executors import Chunk, Executor, LocalExecutor, get_executor, run_chunk, run_id_of
from simfluence.collect.train import train_run, train_runs_vmap

__all__ = ["Chunk", "EpochSampler", "Executor", "FixedCurriculum", "LocalExecutor", "Sampler", "UniformSampler",
           "collect", "collection_meta", "derive_seed", "get_executor", "run_chunk", "run_id_of", "train_run",
           "train_runs_vmap"]
