"""Collect many runs of your own Hugging Face ``Trainer`` setup, each along a curriculum we draw.

Simfluence learns from many runs that differ only in their curriculum. With a ``Trainer``
that means: build the same Trainer for every run, make it train exactly along a curriculum
drawn by one of our samplers, record it with :class:`~simfluence.recorder.SimfluenceCallback`,
and write every run into one resumable store. :func:`collect_trainer` does all of it::

    from simfluence.collect import UniformSampler
    from simfluence.collect.hf import collect_trainer

    def make_trainer(run_index, curriculum):          # a module-level function (workers import it)
        model = AutoModelForSequenceClassification.from_pretrained(CHECKPOINT, num_labels=4)
        args = TrainingArguments("out/tmp", max_steps=len(curriculum), learning_rate=5e-5,
                                 warmup_steps=5, per_device_train_batch_size=4, report_to=[])
        return Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)

    store = collect_trainer(make_trainer, "out/my-runs", num_runs=40, num_steps=50,
                            sampler=UniformSampler(len(train_dataset), batch_size=4),
                            train_ids=len(train_dataset), test_examples=test_examples,
                            test_collate=collator)

How the curriculum reaches the Trainer: :func:`use_curriculum` replaces the trainer's
training ``DataLoader`` with one whose batch sampler yields the curriculum's rows (split
into ``gradient_accumulation_steps`` micro-batches) and sets ``max_steps`` to its length.
The callback records the ids of the examples that actually went through each training
forward pass, and :func:`train_recorded` checks that they equal the curriculum drawn, so
what is stored is what was trained on.

Runs are independent and written atomically, one file per run id, so a collection that is
interrupted (Ctrl-C, ``kill -9``, a lost Ray node) resumes by training only the missing
runs. The local executor runs them in this process or a process pool; the Ray executor as
Ray tasks, with one GPU each when the cluster has GPUs.
"""

from __future__ import annotations

import functools
import math
import os
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simfluence.collect.curricula import Sampler, derive_seed
from simfluence.collect.executors import Executor, get_executor, run_id_of, split_chunks
from simfluence.collect.train import Checkpoint
from simfluence.errors import UsageError, require_extra
from simfluence.runs.log import PAD, validate_curriculum
from simfluence.runs.store import RunStore
from simfluence.tasks.base import state_copy
from simfluence.threads import torch_threads

MakeTrainer = Callable[[int, np.ndarray], Any]
"""``make_trainer(run_index, curriculum) -> transformers.Trainer``: a fresh Trainer for one run.

``curriculum`` is int32 ``[T, B]`` (``-1`` pads smaller batches); the Trainer is made to
follow it by :func:`use_curriculum`, so the function needs to do nothing with it except
where a setting depends on it. It must build the same model and settings for every run
(one fixed starting checkpoint); only the curriculum should differ."""


class CurriculumBatchSampler(torch.utils.data.Sampler):
    """Yields the rows of a curriculum as lists of dataset indices (``-1`` padding dropped).

    With ``micro_batches = G > 1`` each row is split into ``G`` consecutive, nearly equal
    parts, one per gradient-accumulation micro-batch, so one row is one optimizer step.
    """

    def __init__(self, curriculum: np.ndarray, micro_batches: int = 1):
        self.rows = [row[row != PAD].astype(np.int64) for row in np.asarray(curriculum)]
        self.micro_batches = int(micro_batches)
        for step, row in enumerate(self.rows, start=1):
            if row.size < self.micro_batches:
                raise UsageError(f"curriculum: step {step} has {row.size} examples, fewer than the "
                                 f"{self.micro_batches} gradient-accumulation micro-batches of a step")

    def __iter__(self) -> Iterator[list[int]]:
        for row in self.rows:
            for part in np.array_split(row, self.micro_batches):
                yield part.tolist()

    def __len__(self) -> int:
        return len(self.rows) * self.micro_batches


def use_curriculum(trainer: Any, curriculum: np.ndarray) -> Any:
    """Make ``trainer`` take one optimizer step per row of ``curriculum`` (int ``[T, B]``), in order.

    Replaces the trainer's ``get_train_dataloader`` (on this instance only) with a loader over
    :class:`CurriculumBatchSampler`, built with the trainer's own collator, workers and
    accelerator, and sets ``args.max_steps = T``. Call before ``trainer.train()``; it may be
    called before or after :meth:`SimfluenceCallback.attach`. Returns the trainer.
    """
    dataset = trainer.train_dataset
    if dataset is None:
        raise UsageError("use_curriculum: the trainer has no train_dataset")
    curriculum = validate_curriculum(curriculum, len(dataset), "curriculum")
    if curriculum.ndim != 2:
        raise UsageError(f"curriculum: expected one run's curriculum [T, B], got shape {curriculum.shape}")
    args = trainer.args
    if getattr(args, "world_size", 1) > 1:
        raise UsageError("use_curriculum: distributed training is not supported; train each run on one process")
    sampler = CurriculumBatchSampler(curriculum, args.gradient_accumulation_steps)
    args.max_steps = int(curriculum.shape[0])

    def get_train_dataloader(self):
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    trainer.get_train_dataloader = types.MethodType(get_train_dataloader, trainer)
    return trainer


@dataclass(frozen=True)
class TrainerSpec:
    """Everything a worker needs to train and record runs of one Trainer setup (picklable).

    Attributes:
        make_trainer: see :data:`MakeTrainer`.
        test_examples: the test examples, as your collator takes them (or a batch dict of
            tensors with one row per example, with ``test_collate=None``).
        test_collate: collate function for ``test_examples`` (default: each run's
            ``trainer.data_collator``).
        loss_fn: per-example test loss (default :func:`~simfluence.recorder.auto_loss`,
            chosen from the model's output type).
        train_ids, test_ids: str ids of the training examples (the indices of the
            Trainer's ``train_dataset``) and of the test examples.
        eval_every, eval_batch_size: as in :class:`~simfluence.recorder.Recorder`.
        meta: JSON facts stored with every run.
        checkpoint_steps: steps after which every collected run's model state is written to
            the store (``0``: the start), as :meth:`RunStore.write_checkpoint` files.
    """

    make_trainer: MakeTrainer
    test_examples: Any
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    test_collate: Callable[[list], Any] | None = None
    loss_fn: Callable | None = None
    eval_every: int = 1
    eval_batch_size: int = 64
    meta: dict = field(default_factory=dict)
    checkpoint_steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrainerChunk:
    """Runs that one worker trains one after another and writes to ``store_root``.

    Each run draws its curriculum from ``sampler`` (seeded per run), or, with ``curricula``
    (int ``[len(run_indices), T, B]``), trains along the given ones (retraining).
    """

    spec: TrainerSpec
    store_root: str
    run_indices: tuple[int, ...]
    num_steps: int
    seed: int
    sampler: Sampler | None
    num_threads: int | None = None
    curricula: np.ndarray | None = None


class _StateCallbackImpl:
    """Hands the model's state dict to ``on_checkpoint`` after each of ``steps`` (0: at ``on_train_begin``).

    ``on_step_end`` comes after the optimizer and scheduler step, so the state after step ``t`` is
    the one the next step's gradient is taken at. With ``stop``, training stops after the last
    of ``steps`` (the schedule still spans the whole curriculum: ``max_steps`` is unchanged).
    """

    def __init__(self, steps: Sequence[int], on_checkpoint: Checkpoint, stop: bool = False):
        self.steps = frozenset(int(step) for step in steps)
        self.last = max(self.steps)
        self.on_checkpoint = on_checkpoint
        self.stop = stop

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if 0 in self.steps:
            self.on_checkpoint(0, state_copy(model))
        if self.stop and self.last == 0:
            control.should_training_stop = True

    def on_step_begin(self, args, state, control, **kwargs):
        if self.stop and state.global_step >= self.last:   # stopped at step 0: take no step
            control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.on_checkpoint(int(state.global_step), state_copy(model))
        if self.stop and state.global_step >= self.last:
            control.should_training_stop = True


_state_callback_class: type | None = None


def state_callback(steps: Sequence[int], on_checkpoint: Checkpoint, stop: bool = False) -> Any:
    """A ``transformers.TrainerCallback`` calling ``on_checkpoint(step, state_dict)`` after each of ``steps``.

    ``0`` is the model before the first step; state dicts are copies on the CPU. With ``stop`` the
    Trainer stops after the last of ``steps``.
    """
    global _state_callback_class
    if _state_callback_class is None:
        from transformers import TrainerCallback

        _state_callback_class = type("StateCallback", (_StateCallbackImpl, TrainerCallback),
                                     {"__module__": __name__, "__qualname__": "StateCallback"})
    return _state_callback_class(steps, on_checkpoint, stop)


def run_trainer(make_trainer: MakeTrainer, run_index: int, curriculum: np.ndarray, *,
                prepare: Callable[[Any], object] | None = None, checkpoint_steps: Sequence[int] = (),
                on_checkpoint: Checkpoint | None = None, stop_after_checkpoints: bool = False) -> Any:
    """Train a fresh ``make_trainer(run_index, curriculum)`` along ``curriculum``: the one Trainer code path.

    Collection, retraining (:func:`train_recorded`) and replaying checkpoints (:func:`trainer_states`)
    all train through here.

    Args:
        make_trainer: see :data:`MakeTrainer`.
        run_index: passed to ``make_trainer``.
        curriculum: int ``[T, B]``, ``-1`` pads.
        prepare: called with the new trainer before training (e.g. a recorder's ``attach``).
        checkpoint_steps: steps in ``0..T`` after which ``on_checkpoint(step, state_dict)`` is called.
        on_checkpoint: see ``checkpoint_steps``.
        stop_after_checkpoints: stop training after the last of ``checkpoint_steps``.

    Returns:
        The trainer, trained.
    """
    trainer = make_trainer(run_index, curriculum)
    if prepare is not None:
        prepare(trainer)
    if checkpoint_steps:
        if on_checkpoint is None:
            raise UsageError("checkpoint_steps: given without on_checkpoint, so the checkpoints would be lost")
        trainer.add_callback(state_callback(checkpoint_steps, on_checkpoint, stop_after_checkpoints))
    use_curriculum(trainer, curriculum)
    trainer.train()
    return trainer


def trainer_states(make_trainer: MakeTrainer, curriculum, steps: Sequence[int],
                   run_index: int = 0) -> list[dict[str, torch.Tensor]]:
    """Model state dicts after each of ``steps`` (0: the start) of the Trainer run along ``curriculum``.

    Trains through :func:`run_trainer` (as collection does) and stops after the last wanted step; the
    learning-rate schedule is that of the whole curriculum. Runs are deterministic given the
    curriculum when the model has no dropout (as :class:`~simfluence.tasks.finetune.MiniLMFinetune`).

    Args:
        make_trainer: see :data:`MakeTrainer`.
        curriculum: int ``[T, B]``, ``-1`` pads (a step needs at least one example).
        steps: steps in ``0..T``, any order, repeats allowed.
        run_index: passed to ``make_trainer``.

    Returns:
        One state dict (CPU tensors) per distinct step, in increasing step order.
    """
    curriculum = np.asarray(curriculum)
    if curriculum.ndim != 2:
        raise UsageError(f"curriculum: expected one run's curriculum [T, B], got shape {curriculum.shape}")
    wanted = sorted({int(step) for step in steps})
    if not wanted or wanted[0] < 0 or wanted[-1] > curriculum.shape[0]:
        raise UsageError(f"steps: must lie in 0..{curriculum.shape[0]}, got {list(steps)}")
    states: dict[int, dict[str, torch.Tensor]] = {}

    def keep(step: int, state: dict[str, torch.Tensor]) -> None:
        states[step] = state

    run_trainer(make_trainer, run_index, curriculum, checkpoint_steps=wanted, on_checkpoint=keep,
                stop_after_checkpoints=True)
    missing = [step for step in wanted if step not in states]
    if missing:
        raise RuntimeError(f"trainer_states: the Trainer stopped before steps {missing}")
    return [states[step] for step in wanted]


def trainer_update_rule(make_trainer: MakeTrainer, curriculum, run_index: int = 0):
    """The :class:`~simfluence.func.optimizers.UpdateRule` the Trainer of ``make_trainer`` trains ``curriculum`` with.

    Read from the real thing: the optimizer and learning-rate scheduler the Trainer creates for a
    run of ``T = len(curriculum)`` steps (its parameter groups, betas, epsilon and weight decay;
    the rate of each step, as the scheduler sets it before that step) and
    ``args.max_grad_norm``. Nothing is trained.

    Raises:
        ValueError: for an optimizer the replay cannot follow (see
            :func:`~simfluence.func.optimizers.rule_from_optimizer`) or gradient accumulation.
    """
    from simfluence.func.optimizers import rule_from_optimizer

    num_steps = int(np.asarray(curriculum).shape[0])
    trainer = make_trainer(run_index, np.asarray(curriculum))
    if int(trainer.args.gradient_accumulation_steps) != 1:
        raise UsageError("gradient_accumulation_steps: the replay follows one batch per step, got "
                         f"{trainer.args.gradient_accumulation_steps}")
    trainer.create_optimizer_and_scheduler(num_training_steps=num_steps)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    optimizer = getattr(optimizer, "optimizer", optimizer)     # accelerate may wrap it
    rates = np.zeros((len(optimizer.param_groups), num_steps))
    with warnings.catch_warnings():   # "lr_scheduler.step() before optimizer.step()": on purpose, nothing trains
        warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)", category=UserWarning)
        for step in range(num_steps):
            rates[:, step] = [group["lr"] for group in optimizer.param_groups]
            scheduler.step()
    names = {id(param): name for name, param in trainer.model.named_parameters()}
    return rule_from_optimizer(optimizer, names, rates, trainer.args.max_grad_norm)


def train_recorded(spec: TrainerSpec, store: str | os.PathLike | RunStore, run_index: int, curriculum: np.ndarray,
                   seed: int) -> Any:
    """Train one run of ``spec`` along ``curriculum`` with the real Trainer, recorded into ``store``.

    With ``spec.checkpoint_steps`` the model's state after those steps is written to ``store``
    too (before the run itself, so a finished run has all of them).

    Returns the :class:`~simfluence.runs.log.RunLog` written. Raises ``RuntimeError`` if the
    batches that reached the model differ from ``curriculum`` (an internal invariant).
    """
    from simfluence.recorder import SimfluenceCallback, auto_loss

    callbacks: list[Any] = []

    def prepare(trainer: Any) -> None:
        collate = spec.test_collate if spec.test_collate is not None else trainer.data_collator
        if isinstance(spec.test_examples, dict):
            collate = None
        callback = SimfluenceCallback(
            store, test_inputs=spec.test_examples, test_collate=collate, loss_fn=spec.loss_fn or auto_loss,
            train_ids=list(spec.train_ids), test_ids=list(spec.test_ids), run_id=run_id_of(run_index),
            eval_every=spec.eval_every, eval_batch_size=spec.eval_batch_size, seed=seed, overwrite=True,
            meta={**spec.meta, "run_index": int(run_index)},
        )
        callback.attach(trainer)
        callbacks.append(callback)

    on_checkpoint = None
    if spec.checkpoint_steps:
        writer = store if isinstance(store, RunStore) else RunStore(store)
        on_checkpoint = functools.partial(writer.write_checkpoint, run_id_of(run_index))
    run_trainer(spec.make_trainer, run_index, curriculum, prepare=prepare, checkpoint_steps=spec.checkpoint_steps,
                on_checkpoint=on_checkpoint)
    log = callbacks[0].log
    if log is None:
        raise RuntimeError(f"run {run_index}: the Trainer finished without the callback writing the run")
    if not _same_batches(log.curriculum, curriculum):
        raise RuntimeError(f"run {run_index}: the batches the model trained on differ from the curriculum drawn")
    return log


def _same_batches(recorded: np.ndarray, curriculum: np.ndarray) -> bool:
    """Whether each step trained on the curriculum's examples, in order (``-1`` pads anywhere, any width)."""
    recorded, curriculum = np.asarray(recorded), np.asarray(curriculum)
    return len(recorded) == len(curriculum) and all(
        np.array_equal(a[a != PAD], b[b != PAD]) for a, b in zip(recorded, curriculum))


def run_trainer_chunk(chunk: TrainerChunk) -> list[str]:
    """Train and record the chunk's runs, one after another; returns their run ids."""
    run_ids = []
    with torch_threads(chunk.num_threads):
        for position, index in enumerate(chunk.run_indices):
            if chunk.curricula is not None:
                seed, curriculum = 0, chunk.curricula[position]
            else:
                assert chunk.sampler is not None
                seed = derive_seed(chunk.seed, index)
                curriculum = chunk.sampler.sample(chunk.num_steps, seed)
            train_recorded(chunk.spec, chunk.store_root, index, curriculum, seed)
            run_ids.append(run_id_of(index))
    return run_ids


def train_curricula(spec: TrainerSpec, curricula: np.ndarray, *, workers: int = 1, threads: int | None = 1,
                    progress: bool = False, desc: str = "retrain") -> np.ndarray:
    """float32 ``[R, T + 1, M]``: the test losses of training ``spec``'s Trainer along each curriculum.

    Every run is recorded (with ``spec.eval_every``, which must be 1) into a temporary run store
    and read back, so these losses are measured exactly as collected runs' are. ``-1`` pads are
    dropped from their step (a smaller batch); a step with no example left cannot be trained by
    a Trainer while keeping its place in the learning-rate schedule, so it is refused.
    """
    import tempfile

    from simfluence.progress import progress_bar

    curricula = np.asarray(curricula)
    if spec.eval_every != 1:
        raise UsageError(f"eval_every: retraining records every step, got {spec.eval_every}")
    empty = np.argwhere(~(curricula != PAD).any(axis=-1))
    if empty.size:
        run, step = (int(v) for v in empty[0])
        raise UsageError(f"curricula: run {run} has no example left at step {step + 1}; a Trainer cannot skip a "
                         "step and keep its learning-rate schedule, so keep at least one example per step")
    with tempfile.TemporaryDirectory(prefix="simfluence-retrain-") as root:
        store = RunStore.create(Path(root) / "runs", list(spec.train_ids), list(spec.test_ids),
                                {"collector": "retrain"})
        runner = get_executor("local", workers)
        indices = list(range(len(curricula)))
        size = max(1, math.ceil(len(indices) / (runner.workers * 4)))
        chunks = [TrainerChunk(spec, str(store.root), tuple(part), curricula.shape[1], 0, None, threads,
                               curricula[list(part)]) for part in split_chunks(indices, size)]
        with progress_bar(total=len(indices), unit="run", desc=desc, enabled=progress) as bar:
            for written in runner.map(run_trainer_chunk, chunks):
                bar.update(len(written))
        losses = [store.read(run_id_of(index)).losses for index in indices]
    return np.stack(losses).astype(np.float32)


def collect_trainer(
    make_trainer: MakeTrainer,
    out_dir: str | os.PathLike,
    num_runs: int,
    num_steps: int,
    *,
    sampler: Sampler,
    train_ids: Sequence[str] | int,
    test_examples: Any,
    test_ids: Sequence[str] | None = None,
    test_collate: Callable[[list], Any] | None = None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    eval_every: int = 1,
    eval_batch_size: int = 64,
    meta: dict | None = None,
    store_meta: dict | None = None,
    executor: str | Executor = "local",
    workers: int = 1,
    address: str | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> RunStore:
    """Train runs ``0 .. num_runs-1`` of your Trainer setup along sampled curricula into one store.

    Run ``r`` trains along ``sampler.sample(num_steps, derive_seed(seed, r))`` and is stored as
    ``run-<r>``; calling again with the same settings trains only the runs not yet stored
    (resume), with other settings it is refused (see :meth:`RunStore.create`).

    Args:
        make_trainer: ``make_trainer(run_index, curriculum) -> Trainer`` (:data:`MakeTrainer`);
            with worker processes or Ray it must be picklable (a module-level function).
        out_dir: the run store directory.
        num_runs: runs ``R`` the store should hold.
        num_steps: optimizer steps ``T`` per run.
        sampler: draws each run's curriculum over indices of the Trainer's ``train_dataset``.
        train_ids: ids of the training examples (or their number ``N``: ids ``"0".."N-1"``).
        test_examples: the test examples (this and the next five: see :class:`TrainerSpec`).
        test_ids: str ids of the test examples.
        test_collate: collate function for ``test_examples``.
        loss_fn: per-example test loss.
        eval_every: as in :class:`~simfluence.recorder.Recorder`.
        eval_batch_size: as in :class:`~simfluence.recorder.Recorder`.
        seed: collection seed.
        meta: JSON facts stored with every run.
        store_meta: extra facts for the store.
        executor: ``"local"`` (``workers`` processes; 1: this process) or ``"ray"`` (a local
            Ray instance with ``workers`` CPUs, or the cluster at ``address``; one GPU per task
            when the cluster has GPUs).
        workers: worker processes (local) or CPUs of a local Ray instance.
        address: the Ray cluster to use (``"ray"`` only).
        threads: torch threads per worker (``None``: leave as is).
        progress: a progress bar over runs (only on a terminal).

    Returns:
        The :class:`RunStore`.
    """
    require_extra("hf", "transformers", "collecting runs of a Hugging Face Trainer")
    for name, value in (("num_runs", num_runs), ("num_steps", num_steps), ("workers", workers)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise UsageError(f"{name}: must be a positive integer, got {value!r}")
    if not isinstance(sampler, Sampler):
        raise UsageError(f"sampler: expected a Sampler (UniformSampler, EpochSampler, FixedCurriculum), "
                         f"got {type(sampler).__name__}")
    train_ids = tuple(str(i) for i in (range(train_ids) if isinstance(train_ids, int) else train_ids))
    num_test = len(next(iter(test_examples.values()))) if isinstance(test_examples, dict) else len(test_examples)
    test_ids = tuple(str(i) for i in (range(num_test) if test_ids is None else test_ids))
    if sampler.max_index() >= len(train_ids):
        raise UsageError(f"sampler: draws index {sampler.max_index()} but there are {len(train_ids)} training "
                         f"examples; use indices below {len(train_ids)}")
    spec = TrainerSpec(make_trainer, test_examples, train_ids, test_ids, test_collate, loss_fn, int(eval_every),
                       int(eval_batch_size), dict(meta or {}))
    collection = {"collector": "trainer", "make_trainer": _qualified_name(make_trainer), "num_steps": int(num_steps),
                  "seed": int(seed), "sampler": sampler.describe(), "eval_every": int(eval_every),
                  **(store_meta or {})}
    return collect_spec(spec, out_dir, num_runs, num_steps, sampler, seed, collection, executor=executor,
                        workers=workers, address=address, threads=threads, progress=progress)


def collect_spec(spec: TrainerSpec, out_dir: str | os.PathLike, num_runs: int, num_steps: int, sampler: Sampler,
                 seed: int, store_meta: dict, *, executor: str | Executor = "local", workers: int = 1,
                 address: str | None = None, threads: int | None = 1, progress: bool = True,
                 desc: str = "collect") -> RunStore:
    """Create or resume the store with ``store_meta`` and train the runs it lacks (:func:`collect_trainer`'s core)."""
    from simfluence.progress import progress_bar

    store = RunStore.create(out_dir, list(spec.train_ids), list(spec.test_ids), store_meta, exist_ok=True)
    with store.collecting():
        done = set(store.run_ids())
        pending = [index for index in range(num_runs) if run_id_of(index) not in done]
        if not pending:
            return store
        runner = get_executor(executor, workers, address=address, gpus_per_task="auto")
        chunk_size = max(1, math.ceil(len(pending) / (runner.workers * 4)))
        chunks = [TrainerChunk(spec, str(Path(store.root).resolve()), indices, int(num_steps), int(seed), sampler,
                               threads) for indices in split_chunks(pending, chunk_size)]
        with progress_bar(total=len(pending), unit="run", desc=desc, enabled=progress) as bar:
            for written in runner.map(run_trainer_chunk, chunks):
                bar.update(len(written))
    return store


def _qualified_name(function: Callable) -> str:
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}.{name}"
