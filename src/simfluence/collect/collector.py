"""``collect``: train many runs of a task on random curricula into a resumable run store.

Run ``r`` of a collection is fully determined by the task, the sampler, the number of
steps and ``derive_seed(seed, r)``: it can be (re)trained on its own, by any worker,
in any order. The store's manifest records those settings, so calling ``collect``
again on the same directory

* with the same settings trains only the runs whose files are missing (an interrupted
  collection resumes; a larger ``num_runs`` extends it),
* with different settings raises :class:`~simfluence.runs.RunDataError`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from simfluence.collect.curricula import Sampler, UniformSampler
from simfluence.collect.executors import Chunk, Executor, get_executor, run_chunk, run_id_of, split_chunks
from simfluence.collect.train import checkpoint_steps_of
from simfluence.errors import UsageError, require_extras
from simfluence.progress import progress_bar
from simfluence.runs.log import validate_eval_steps
from simfluence.runs.store import RunStore
from simfluence.tasks.base import Task
from simfluence.tasks.registry import get_task

MAX_CHUNK = 64
"""Default cap on runs per chunk: past ~64 runs the vectorised trainer gains little
speed per run on CPU, and smaller chunks give a finer progress bar and lose less work
when a worker dies."""


def collection_meta(task: Task, num_steps: int, seed: int, sampler: Sampler, eval_steps,
                    checkpoint_steps: tuple[int, ...] = ()) -> dict:
    """What the store records; a resume must match it exactly."""
    meta = {**task.meta(), "num_steps": int(num_steps), "seed": int(seed), "sampler": sampler.describe(),
            "eval_steps": None if eval_steps is None else [int(step) for step in eval_steps]}
    if checkpoint_steps:
        meta["checkpoint_steps"] = list(checkpoint_steps)
    return meta


def collect(
    task: str | Task,
    out_dir: str | os.PathLike,
    num_runs: int,
    num_steps: int,
    seed: int = 0,
    sampler: Sampler | None = None,
    *,
    eval_steps=None,
    workers: int = 1,
    executor: str | Executor = "local",
    address: str | None = None,
    vectorize: bool = True,
    chunk_size: int | None = None,
    threads: int = 1,
    checkpoint_steps=None,
    progress: bool = True,
) -> RunStore:
    """Train runs ``0 .. num_runs-1`` of ``task`` and store them in ``out_dir``.

    Args:
        task: a registered task name (see :func:`list_tasks`) or a :class:`Task`.
        out_dir: run store directory; created, or resumed if it holds a store made with
            the same settings.
        num_runs: runs ``R`` the store should hold when done.
        num_steps: optimizer steps ``T`` per run.
        seed: collection seed; run ``r`` draws its curriculum with ``derive_seed(seed, r)``.
        sampler: curriculum sampler; default uniform with replacement over
            ``task.default_pool()`` at ``task.batch_size``.
        eval_steps: int ``[K]`` steps at which to record test losses, starting at 0;
            default every step.
        workers: worker processes of the local executor (1: in this process); with
            ``executor="ray"``, the CPUs of the local Ray instance it starts. Also sets
            the default ``chunk_size``.
        executor: ``"local"``, ``"ray"`` (needs ``pip install 'ray>=2.9'``) or an
            :class:`~simfluence.collect.executors.Executor`.
        address: Ray cluster address for ``executor="ray"`` (default: the Ray already
            initialised in this process, else a local one).
        vectorize: train each chunk's runs at once with ``torch.func.vmap``.
        chunk_size: runs per chunk; default spreads the runs evenly over the workers,
            at most ``MAX_CHUNK`` per chunk.
        threads: torch threads per worker, default 1. Small models gain little from
            intra-op threads and lose a lot when the CPUs are shared (idle OpenMP
            threads spin): parallelise across runs with ``workers`` instead, and raise
            ``threads`` only for models whose single steps are big.
        checkpoint_steps: steps after which every run's weights are kept in the store
            (``0``: the starting checkpoint), for TracIn-CP; default none.
        progress: show a tqdm progress bar (runs).

    Returns:
        The :class:`RunStore` in ``out_dir``.
    """
    task = get_task(task)
    require_extras(task.extras, f"task '{task.name}'")
    for name, value in (("num_runs", num_runs), ("num_steps", num_steps), ("chunk_size", chunk_size),
                        ("threads", threads)):
        if value is not None and (int(value) != value or value < 1):
            raise UsageError(f"{name}: must be a positive integer, got {value!r}")
    sampler = UniformSampler(task.default_pool(), task.batch_size) if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        raise UsageError(f"sampler: expected a Sampler (UniformSampler, EpochSampler, FixedCurriculum), "
                         f"got {type(sampler).__name__}")
    if sampler.max_index() >= task.num_train:
        raise UsageError(f"sampler: draws index {sampler.max_index()} but task '{task.name}' has "
                         f"{task.num_train} training examples; use indices below {task.num_train}")
    if eval_steps is not None:
        eval_steps = tuple(int(step) for step in validate_eval_steps(list(eval_steps), num_steps, "eval_steps"))
    task.learning_rates(num_steps)  # an unknown schedule fails here, not in a worker
    checkpoint_steps = checkpoint_steps_of(checkpoint_steps, num_steps)
    if task.runner == "trainer":
        return _collect_with_trainer(task, out_dir, num_runs, num_steps, seed, sampler, eval_steps, checkpoint_steps,
                                     executor=executor, workers=workers, address=address, threads=threads,
                                     progress=progress)
    executor = get_executor(executor, workers, address=address)

    store = RunStore.create(out_dir, task.train_ids, task.test_ids,
                            collection_meta(task, num_steps, seed, sampler, eval_steps, checkpoint_steps),
                            exist_ok=True)
    with store.collecting():
        done = set(store.run_ids())
        pending = [index for index in range(num_runs) if run_id_of(index) not in done]
        if not pending:
            return store
        if chunk_size is None:
            chunk_size = min(MAX_CHUNK, math.ceil(len(pending) / executor.workers))
        chunks = [Chunk(task, str(Path(store.root).resolve()), indices, int(num_steps), int(seed), sampler,
                        eval_steps, vectorize, threads, checkpoint_steps)
                  for indices in split_chunks(pending, int(chunk_size))]
        with progress_bar(total=len(pending), unit="run", desc=f"collect {task.name}", enabled=progress) as bar:
            for written in executor.map(run_chunk, chunks):
                bar.update(len(written))
    return store


def trainer_spec(task: Task, eval_every: int = 1, checkpoint_steps: tuple[int, ...] = ()):
    """The :class:`~simfluence.collect.hf.TrainerSpec` of a task trained by the Hugging Face Trainer."""
    from simfluence.collect.hf import TrainerSpec

    trainer_task: Any = task   # a Trainer task also has make_trainer, examples, collator and eval_batch_size
    return TrainerSpec(trainer_task.make_trainer, trainer_task.examples("test"), tuple(task.train_ids.tolist()),
                       tuple(task.test_ids.tolist()), trainer_task.collator(), None, int(eval_every),
                       trainer_task.eval_batch_size, checkpoint_steps=tuple(checkpoint_steps))


def _collect_with_trainer(task: Task, out_dir, num_runs: int, num_steps: int, seed: int, sampler: Sampler,
                          eval_steps, checkpoint_steps, **options) -> RunStore:
    """Collect a task whose runs go through the Hugging Face ``Trainer`` (``task.runner == "trainer"``)."""
    from simfluence.collect.hf import collect_spec

    eval_every = 1
    if eval_steps is not None:
        eval_every = eval_steps[1] - eval_steps[0] if len(eval_steps) > 1 else num_steps
        regular = sorted(set(range(0, num_steps + 1, eval_every)) | {num_steps})
        if list(eval_steps) != regular:
            raise UsageError(f"eval_steps: task '{task.name}' evaluates every k-th step (and the last); "
                             f"give steps 0, k, 2k, ..., {num_steps}")
    spec = trainer_spec(task, eval_every, checkpoint_steps)
    meta = collection_meta(task, num_steps, seed, sampler, eval_steps, checkpoint_steps)
    return collect_spec(spec, out_dir, num_runs, num_steps, sampler, seed, meta, desc=f"collect {task.name}",
                        **options)
