"""Executors: where the chunks of a collection run.

A collection is split into :class:`Chunk` s, each a few runs that one worker trains
(vectorised) and writes to the store itself. Chunks are independent, picklable and
idempotent: a run's file is named by its run id and written atomically, so a chunk
that is retried (a lost worker, a preempted node) or run twice just rewrites
identical files. That is all an executor needs to know, so adding one (a job queue)
means implementing :meth:`Executor.map` over :func:`run_chunk`.

Executors: :class:`LocalExecutor` (this process or a process pool) and
:class:`RayExecutor` (a local Ray instance or an existing Ray cluster; Ray is imported
only when it is used).
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from simfluence.collect.curricula import Sampler, derive_seed
from simfluence.errors import SimfluenceError, UsageError, require_extra
from simfluence.tasks.base import Task
from simfluence.threads import torch_threads

if TYPE_CHECKING:
    from simfluence.runs.log import RunLog

WRITER_THREADS = 4

ChunkT = TypeVar("ChunkT")
"""A chunk type: :class:`Chunk`, or another picklable unit of work (:class:`~simfluence.collect.hf.TrainerChunk`)."""


def run_id_of(index: int) -> str:
    """Run id of run ``index`` of a collection: ``run-000042``."""
    return f"run-{index:06d}"


@dataclass(frozen=True)
class Chunk:
    """Runs that one worker trains together and writes to ``store_root``.

    Attributes:
        task: the task (pickled without its data; the worker reloads it).
        store_root: the run store directory (must exist, created by the collector).
        run_indices: indices ``r`` of the runs; run ``r`` has id ``run_id_of(r)`` and
            curriculum ``sampler.sample(num_steps, derive_seed(seed, r))``.
        num_steps, seed, sampler, eval_steps: the collection's settings.
        vectorize: train the chunk's runs at once with ``vmap`` (else one by one).
        num_threads: torch threads in the worker (``None``: leave as is).
        checkpoint_steps: steps after which each run's weights are stored (``0``: the start).
    """

    task: Task
    store_root: str
    run_indices: tuple[int, ...]
    num_steps: int
    seed: int
    sampler: Sampler
    eval_steps: tuple[int, ...] | None = None
    vectorize: bool = True
    num_threads: int | None = None
    checkpoint_steps: tuple[int, ...] = ()


def run_chunk(chunk: Chunk) -> list[str]:
    """Train and write the chunk's runs; returns their run ids. Safe to call twice."""
    from simfluence.collect.train import train_run, train_runs_vmap
    from simfluence.runs.store import RunStore

    store = RunStore(chunk.store_root)
    seeds = [derive_seed(chunk.seed, index) for index in chunk.run_indices]
    run_ids = [run_id_of(index) for index in chunk.run_indices]
    curricula = chunk.sampler.sample_many(chunk.num_steps, seeds)
    eval_steps = None if chunk.eval_steps is None else np.asarray(chunk.eval_steps)
    # Writes go to a few threads: each ends in an fsync that would otherwise stall
    # training (about 10 ms a run, as long as training one digits run vectorised).
    with torch_threads(chunk.num_threads), concurrent.futures.ThreadPoolExecutor(WRITER_THREADS) as writers:
        # Checkpoints are written while training, so before the run's own file.
        logs: Iterable[RunLog]
        if chunk.vectorize:
            logs = train_runs_vmap(chunk.task, curricula, eval_steps, run_ids=run_ids, seeds=seeds,
                                   checkpoint_steps=chunk.checkpoint_steps,
                                   on_checkpoint=lambda r, step, state: store.write_checkpoint(run_ids[r], step, state))
        else:
            logs = (train_run(chunk.task, curriculum, eval_steps, run_id=run_id, seed=seed,
                              checkpoint_steps=chunk.checkpoint_steps,
                              on_checkpoint=functools.partial(store.write_checkpoint, run_id))
                    for curriculum, run_id, seed in zip(curricula, run_ids, seeds))
        writes = [writers.submit(store.write, log) for log in logs]
        for write in writes:
            write.result()  # re-raises a failed write
    return run_ids


def exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """In a worker process: end it as soon as process ``parent`` is gone (killed with ``kill -9``, say).

    A pool's workers otherwise wait forever on a queue whose other end died with the parent.
    A daemon thread checks every ``interval`` seconds whether the worker was re-parented.
    """
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class Executor(ABC):
    """Runs independent chunks; yields each chunk's result as it finishes (any order)."""

    workers: int = 1

    @abstractmethod
    def map(self, function: Callable[[ChunkT], list[str]], chunks: Sequence[ChunkT]) -> Iterator[list[str]]:
        """``function(chunk)`` for every chunk, results in completion order; errors propagate."""


class LocalExecutor(Executor):
    """In this process (``workers == 1``) or in a pool of ``workers`` spawned processes.

    Spawned, not forked: a forked child inherits torch's thread pools and locks in
    whatever state the parent had them, which can deadlock.
    """

    def __init__(self, workers: int = 1):
        if int(workers) != workers or workers < 1:
            raise UsageError(f"workers: must be a positive integer, got {workers!r}")
        self.workers = int(workers)

    def map(self, function, chunks):
        """``function(chunk)`` for every chunk, in this process or the spawned pool; completion order."""
        if self.workers == 1:
            for chunk in chunks:
                yield function(chunk)
            return
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context, initializer=exit_with_parent,
                                                    initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(function, chunk) for chunk in chunks]
            try:
                for future in concurrent.futures.as_completed(futures):
                    yield future.result()
            finally:
                # On an error or Ctrl-C, do not start the chunks still queued.
                for future in futures:
                    future.cancel()

    def __repr__(self) -> str:
        return f"LocalExecutor(workers={self.workers})"


def _import_ray():
    """``ray``, or a :class:`~simfluence.errors.MissingExtraError` naming the ``ray`` extra."""
    require_extra("ray", "ray", "executor 'ray'")
    import ray

    return ray


class RayUnreachableError(SimfluenceError, ConnectionError):
    """No Ray cluster answers at the address given (one line, raised at once instead of Ray's endless retries)."""


CONNECT_TIMEOUT = 5.0
"""Seconds :func:`check_ray_address` waits for a Ray cluster's address to accept a connection."""


def check_ray_address(address: str | None, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise :class:`RayUnreachableError` unless ``address`` accepts a TCP connection in ``timeout`` seconds.

    ``address`` is ``host:port`` or ``ray://host:port``.

    ``ray.init`` retries an address where nothing listens for minutes; this fails in seconds. Addresses
    without a port (``"auto"``, ``"local"``, ``None``) are left to Ray.
    """
    import socket

    if not address:
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    host = host.strip("[]")   # [::1]:6379
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as error:   # refused, timed out, unknown host, port out of range
        reason = "timed out" if isinstance(error, TimeoutError) else (getattr(error, "strerror", None) or str(error))
        raise RayUnreachableError(
            f"address: no Ray cluster answers at '{address}' ({reason}) (start one with `ray start --head` and give "
            "the address it prints, or leave the address out to start a local Ray)") from None


class RayExecutor(Executor):
    """Each chunk is a Ray task (1 CPU, retried up to ``max_retries`` times if its worker dies).

    Results are yielded as tasks finish (``ray.wait``), so a progress bar moves. A
    retried task, or one that ran twice, writes each of its runs at most once in
    effect: the store names a run's file by its run id and writes it atomically
    (temporary file, then rename), so a second write replaces the file with an
    identical one and a killed write leaves no partial file.

    Args:
        workers: with ``address=None`` and no Ray initialised in this process, the CPUs
            of the local Ray instance started (``ray.init(num_cpus=workers)``, no
            dashboard); it also sets the default chunk size of :func:`collect`
            (runs spread over ``workers`` chunks). On a cluster, pass its CPU count.
        address: of an existing Ray cluster (``"auto"``, ``"ray://host:10001"``, ...);
            ``None``: use the Ray already initialised in this process, else start a
            local one. Ray is left running after :meth:`map` (call ``ray.shutdown()``).
        max_retries: retries of a task whose worker died (Ray's ``max_retries``);
            exceptions raised by the task itself are not retried.
        gpus_per_task: GPUs each task asks Ray for (``"auto"``: 1 where the cluster has
            GPUs, else 0); default 0.

    Workers must be able to import ``simfluence``: local workers use this interpreter
    (so its virtual environment); on a cluster, install the package on every node or
    pass ``runtime_env`` (e.g. ``{"py_modules": [simfluence]}``). Torch threads per task
    follow the chunk's ``num_threads`` (``collect(threads=1)`` by default), and Ray
    also sets ``OMP_NUM_THREADS`` to the task's single CPU.
    """

    def __init__(self, workers: int = 1, address: str | None = None, max_retries: int = 2,
                 runtime_env: dict | None = None, gpus_per_task: float | str = 0):
        if int(workers) != workers or workers < 1:
            raise UsageError(f"workers: must be a positive integer, got {workers!r}")
        if int(max_retries) != max_retries or max_retries < 0:
            raise UsageError(f"max_retries: must be a non-negative integer, got {max_retries!r}")
        ray = _import_ray()  # fail now, not after the store is created
        if address is not None and not ray.is_initialized():
            check_ray_address(address)   # fail in seconds where Ray would retry for minutes
        self.workers = int(workers)
        self.address = address
        self.max_retries = int(max_retries)
        self.runtime_env = runtime_env
        if gpus_per_task != "auto" and (isinstance(gpus_per_task, str) or not gpus_per_task >= 0):
            raise UsageError(f"gpus_per_task: expected a number >= 0 or 'auto', got {gpus_per_task!r}")
        self.gpus_per_task = gpus_per_task

    def _init(self):
        ray = _import_ray()
        if not ray.is_initialized():
            options = {} if self.runtime_env is None else {"runtime_env": self.runtime_env}
            if self.address is None:
                ray.init(num_cpus=self.workers, include_dashboard=False, **options)
            else:
                try:
                    ray.init(address=self.address, **options)
                except ConnectionError as error:   # something answers there, but not a Ray cluster
                    raise RayUnreachableError(f"address: cannot connect to a Ray cluster at '{self.address}' "
                                              f"({str(error).splitlines()[0] if str(error) else 'no answer'}) "
                                              "(check the address that `ray start --head` printed)") from None
        return ray

    def map(self, function, chunks):
        """``function(chunk)`` for every chunk as a Ray task (``max_retries`` each); completion order."""
        ray = self._init()
        gpus = self.gpus_per_task
        if gpus == "auto":   # one GPU per task where the cluster has GPUs
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=self.max_retries)(function)
        pending = [task.remote(chunk) for chunk in chunks]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield ray.get(ref)  # re-raises the task's error
        finally:
            # On an error or Ctrl-C, drop the chunks not yet finished.
            for ref in pending:
                ray.cancel(ref)

    def __repr__(self) -> str:
        return f"RayExecutor(workers={self.workers}, address={self.address!r})"


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def get_executor(executor: str | Executor, workers: int = 1, address: str | None = None,
                 gpus_per_task: float | str = 0) -> Executor:
    """An executor by name (``"local"``, ``"ray"``), or pass an :class:`Executor` through.

    ``address`` is the Ray cluster's (``executor="ray"`` only; default: a local Ray);
    ``gpus_per_task`` the GPUs each Ray task asks for (``"auto"``: 1 where the cluster has GPUs).
    """
    if isinstance(executor, Executor):
        return executor
    if executor not in EXECUTORS:
        raise UsageError(f"executor '{executor}' is unknown; choose one of: {', '.join(sorted(EXECUTORS))}")
    if executor == "ray":
        return RayExecutor(workers, address=address, gpus_per_task=gpus_per_task)
    if address is not None:
        raise UsageError(f"address: only for executor='ray', got executor='{executor}'")
    return EXECUTORS[executor](workers)


def split_chunks(indices: Iterable[int], chunk_size: int) -> list[tuple[int, ...]]:
    """Consecutive groups of at most ``chunk_size`` indices."""
    indices = list(indices)
    return [tuple(indices[start:start + chunk_size]) for start in range(0, len(indices), chunk_size)]
