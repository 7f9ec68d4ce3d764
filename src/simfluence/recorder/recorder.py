"""The :class:`Recorder`: log one training run of your own PyTorch loop into a run store.

It records the batch of every optimizer step and the loss of every test example before
training and after every (``eval_every``-th) step, and writes one
:class:`~simfluence.runs.log.RunLog` into a :class:`~simfluence.runs.store.RunStore`
(see :mod:`simfluence.recorder` for an example).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from simfluence.errors import UsageError
from simfluence.recorder.inputs import map_tensors, num_rows, row_slicer
from simfluence.recorder.losses import LossFn
from simfluence.runs.log import PAD, RunDataError, RunLog, RunSet, check_run_id
from simfluence.runs.store import MANIFEST, RunStore, ids_digest

FLUSH_BYTES = 64 << 20
"""Recorded losses kept on an accelerator are moved to host memory in blocks of about this size."""


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _ids_array(ids: Any, name: str) -> np.ndarray:
    if isinstance(ids, (int, np.integer)):
        return np.arange(int(ids)).astype(str)
    array = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    if array.ndim != 1:
        raise UsageError(f"{name}: expected a 1-D list of ids, got shape {array.shape}")
    return array.astype(str)



class Recorder:
    """Log one training run of a plain PyTorch loop into a :class:`RunStore`.

    Args:
        store: a :class:`RunStore` or a directory. A directory without a store is created
            (``RunStore.create(..., exist_ok=True)``) when the run is written, not before.
        model: the model being trained (any ``nn.Module``).
        loss_fn: ``loss_fn(model, inputs, targets) -> [n]`` per-example test loss, e.g.
            :func:`causal_lm_loss`, or :func:`from_criterion` around
            ``nn.CrossEntropyLoss(reduction="none")``.
        train_ids: the ids of the training examples (str, or an int ``N`` for ``"0".."N-1"``).
            Batches passed to :meth:`step` name examples by position in this list (ints) or
            by id (strs).
        test_inputs: the test examples: a tensor / dict of tensors / tuple of tensors with
            one row per example, or, with ``test_collate``, a sequence of raw examples.
        test_targets: tensor with one row per test example, or ``None`` (then ``loss_fn``
            gets ``targets=None``; e.g. the labels are inside ``test_inputs``).
        test_collate: optional collate function; turns each chunk of ``eval_batch_size``
            raw examples of ``test_inputs`` into model inputs once, at start.
        test_ids: ids of the rows of ``test_inputs`` (default ``"0".."M-1"``).
        test_subset: optional indices of the rows of ``test_inputs`` to evaluate; the run
            (and the store) then hold only those test examples, under their ids.
        run_id: the run's name in the store; default the first free ``run-NNNNNN``.
        eval_every: evaluate after every ``k``-th step: eval steps ``0, k, 2k, ...`` and
            always the last step ``T``.
        eval_batch_size: test examples per forward pass.
        meta: JSON facts about this run (learning rate, ...), stored with the run.
        store_meta: the store's task-level meta, used when the store is created; when
            given for an existing store it must equal the store's meta.
        seed: the seed of this run's data order, stored with the run, when there is one.
        device: where to evaluate; default the device of the model's first parameter
            (looked up at :meth:`start`).
        test_on_device: move the test inputs to ``device`` once at start (default) rather
            than per evaluation.
        sort_by_length: with ``test_collate``, collate the test examples in order of length
            (``len(example["input_ids"])`` or ``len(example)``), so each chunk is padded only to
            its own longest member; losses are put back in ``test_ids`` order.
        overwrite: replace an existing run of the same id (default: refuse at start).

    Evaluation runs under ``torch.no_grad()`` with the model in eval mode; every module's
    train/eval flag is restored afterwards. Losses stay on the device until the run is
    written (moved to host memory in blocks of :data:`FLUSH_BYTES`), so evaluating costs no
    extra host synchronisation per step.
    """

    def __init__(
        self,
        store: RunStore | str | Path,
        *,
        model: nn.Module,
        loss_fn: LossFn,
        train_ids: Sequence[str] | int,
        test_inputs: Any,
        test_targets: Any = None,
        test_collate: Callable[[list], Any] | None = None,
        test_ids: Sequence[str] | None = None,
        test_subset: Sequence[int] | None = None,
        run_id: str | None = None,
        eval_every: int = 1,
        eval_batch_size: int = 256,
        meta: dict | None = None,
        store_meta: dict | None = None,
        seed: int | None = None,
        device: str | torch.device | None = None,
        test_on_device: bool = True,
        sort_by_length: bool = True,
        overwrite: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn: expected a callable loss_fn(model, inputs, targets) -> [n]")
        if isinstance(eval_every, bool) or not isinstance(eval_every, (int, np.integer)) or eval_every < 1:
            raise UsageError(f"eval_every: expected an integer >= 1, got {eval_every!r}")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, (int, np.integer)) \
                or eval_batch_size < 1:
            raise UsageError(f"eval_batch_size: expected an integer >= 1, got {eval_batch_size!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.eval_every = int(eval_every)
        self.eval_batch_size = int(eval_batch_size)
        self.seed = None if seed is None else int(seed)
        self.meta = dict(meta or {})
        self.store_meta = store_meta
        self.overwrite = overwrite
        self.test_on_device = test_on_device
        self.sort_by_length = sort_by_length
        self._inverse: torch.Tensor | None = None   # puts length-sorted losses back in id order
        self._device = None if device is None else torch.device(device)
        self._store: RunStore | None = store if isinstance(store, RunStore) else None
        self._root = store.root if isinstance(store, RunStore) else Path(store)
        self._auto_run_id = run_id is None
        self.run_id = run_id

        # Test set: rows, ids, subset.
        self._test_collate = test_collate
        if test_collate is None:
            num_test = num_rows(test_inputs, "test_inputs")
            if test_targets is not None and num_rows(test_targets, "test_targets") != num_test:
                raise UsageError(f"test_targets: has {num_rows(test_targets, 'test_targets')} rows, "
                                 f"test_inputs has {num_test}; give one target row per test example")
        else:
            if test_targets is not None:
                raise UsageError("test_targets: must be None with test_collate (the collated batch holds targets)")
            num_test = len(test_inputs)
        all_test_ids = np.arange(num_test).astype(str) if test_ids is None else _ids_array(test_ids, "test_ids")
        if all_test_ids.size != num_test:
            raise UsageError(f"test_ids: has {all_test_ids.size} ids for {num_test} test examples "
                             "(test_ids names every row of test_inputs; choose rows with test_subset)")
        if test_subset is None:
            subset = np.arange(num_test)
        else:
            subset = np.asarray(test_subset)
            if subset.ndim != 1 or subset.size == 0 or subset.dtype.kind not in "iu":
                raise UsageError("test_subset: expected a non-empty 1-D list of row indices")
            if subset.min() < 0 or subset.max() >= num_test:
                raise UsageError(f"test_subset: indices must lie in [0, {num_test - 1}]")
        self._subset = subset.astype(np.int64)
        self._test_inputs = test_inputs
        self._test_targets = test_targets

        # Ids, validated by the same rules as a store's (unique, non-empty strings).
        train_id_array = _ids_array(train_ids, "train_ids")
        ids = RunSet.create(np.zeros((0, 1, 1), np.int32), np.zeros((0, 2, self._subset.size), np.float32),
                            train_id_array, all_test_ids[self._subset], meta=store_meta, source="Recorder")
        self.train_ids: np.ndarray = ids.train_ids
        self.test_ids: np.ndarray = ids.test_ids
        self._train_lookup: dict[str, int] | None = None
        self._digest = ids_digest(self.train_ids.tolist(), self.test_ids.tolist())   # lists: much faster

        self._state = "new"   # new -> recording -> finished | aborted
        self._batches: list[np.ndarray] = []
        self._eval_steps: list[int] = []
        self._pending: list[torch.Tensor] = []   # losses not yet moved to host
        self._host: list[np.ndarray] = []        # blocks of losses on the host
        self._chunks: list[tuple[Any, Any]] = []
        self._chunk_sizes: list[int] = []
        self._modules: list[nn.Module] = []
        self._plain: list[bool] = []
        self._plain_train = False
        self.log: RunLog | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, exc_type, exc, traceback) -> Literal[False]:
        if exc_type is None:
            self.finish()
        else:
            self.abort()
        return False

    def start(self) -> Recorder:
        """Check the store, prepare the test set and evaluate step 0 (before training)."""
        if self._state != "new":
            raise RuntimeError(f"Recorder.start: the recorder is {self._state}; use a new Recorder per run")
        self._check_store()
        self._device = self._device or _model_device(self.model)
        self._modules = list(self.model.modules())
        self._plain = [type(module).__setattr__ is nn.Module.__setattr__ for module in self._modules]
        self._plain_train = all(self._plain) and all(type(module).train is nn.Module.train
                                                     for module in self._modules)
        self._chunks = self._prepare_chunks()
        self._chunk_sizes = [min(self.eval_batch_size, self._subset.size - start)
                             for start in range(0, self._subset.size, self.eval_batch_size)]
        self._state = "recording"
        try:
            losses = self.evaluate()
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                bad = self.test_ids[int(torch.nonzero(~finite)[0, 0])]
                raise UsageError(f"loss_fn: the loss of test example '{bad}' at step 0 is NaN or inf "
                                 "(e.g. no target tokens); fix or drop that example")
        except BaseException:
            self.abort()
            raise
        self._keep(0, losses)
        return self

    def step(self, batch_ids: Any, evaluate: bool | None = None) -> torch.Tensor | None:
        """Record the batch of the optimizer step just taken; evaluate if it is an eval step.

        Args:
            batch_ids: the training examples of this step, as positions in ``train_ids``
                (ints; list, NumPy array or tensor) or as ids (strs). Call once per
                optimizer step, after ``optimizer.step()``, with all examples of that step
                (all micro-batches when accumulating gradients).
            evaluate: force (``True``) or skip (``False``) the evaluation of this step;
                default: every ``eval_every``-th step.

        Returns:
            The test losses ``[M]`` (float32, on the evaluation device) when this step was
            evaluated, else ``None``. It is the recorded tensor itself: read, don't modify.
        """
        if self._state != "recording":
            raise RuntimeError(f"Recorder.step: the recorder is {self._state}; "
                               "call start() first (or use `with Recorder(...) as rec`)")
        self._batches.append(self._batch_indices(batch_ids, len(self._batches) + 1))
        step = len(self._batches)
        if not (step % self.eval_every == 0 if evaluate is None else evaluate):
            return None
        losses = self.evaluate()
        self._keep(step, losses)
        return losses

    def finish(self, evaluate_last: bool = True) -> RunLog:
        """Evaluate the last step if needed and write the run atomically; return it.

        Args:
            evaluate_last: evaluate the last step ``T`` if it was not an evaluation step
                (default). ``False`` keeps the evaluations made so far, for when the model
                no longer holds the weights of step ``T``.
        """
        if self._state != "recording":
            raise RuntimeError(f"Recorder.finish: the recorder is {self._state}")
        try:
            if not self._batches:
                raise RuntimeError("Recorder.finish: no step was recorded (call rec.step(batch_ids) after "
                                   "each optimizer step); nothing was written")
            if evaluate_last and self._eval_steps[-1] != len(self._batches):
                self._keep(len(self._batches), self.evaluate())
            log = self._build_log()
            store = self._open_store(create=True)
            assert store is not None  # create=True always opens one
            if self._auto_run_id and log.run_id in store:
                log = RunLog(self._free_run_id(store), log.curriculum, log.losses, log.eval_steps,
                             log.seed, log.meta)
                self.run_id = log.run_id
            elif not self.overwrite and log.run_id in store:
                raise RunDataError(str(store.run_path(log.run_id)), "run_id", "already exists in the store",
                                   "choose another run_id or pass overwrite=True")
            path = store.write(log)
        except BaseException:
            self.abort()
            raise
        self._state = "finished"
        self.log = log.validated(store.train_ids.size, store.test_ids.size, str(path))
        self._release()
        return self.log

    def abort(self) -> None:
        """Discard the run: nothing is written."""
        if self._state in ("new", "recording"):
            self._state = "aborted"
        self._release()

    def _release(self) -> None:
        self._chunks = []
        self._pending = []
        self._modules = []

    # --- what has been recorded ---------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Optimizer steps recorded so far."""
        return len(self._batches)

    @property
    def eval_steps(self) -> np.ndarray:
        """int32 ``[K]``: the steps evaluated so far."""
        return np.asarray(self._eval_steps, dtype=np.int32)

    @property
    def losses(self) -> np.ndarray:
        """float32 ``[K, M]``: the losses recorded so far (moves pending ones to the host)."""
        self._flush()
        if not self._host:
            return np.zeros((0, self.test_ids.size), np.float32)
        return np.concatenate(self._host)

    @property
    def store(self) -> RunStore | None:
        """The store, once it exists."""
        return self._store

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> torch.Tensor:
        """Loss of every recorded test example under the current weights: float32 ``[M]``.

        Runs in eval mode under ``torch.no_grad()`` and restores each module's mode.
        """
        if self._state != "recording":
            raise RuntimeError(f"Recorder.evaluate: the recorder is {self._state}")
        flags = [module.training for module in self._modules]
        if self._plain_train:   # what model.eval() does, without its recursion
            for module in self._modules:
                object.__setattr__(module, "training", False)
        else:
            self.model.eval()
        try:
            with torch.no_grad():
                parts = []
                for (inputs, targets), size in zip(self._chunks, self._chunk_sizes):
                    if not self.test_on_device:
                        inputs, targets = self._to_device(inputs), self._to_device(targets)
                    part = self.loss_fn(self.model, inputs, targets)
                    if not isinstance(part, torch.Tensor) or part.shape != (size,):
                        shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                        raise UsageError(f"loss_fn: returned {shape} for a chunk of {size} test examples; it "
                                         f"must return one loss per example, shape [{size}] (reduction='none')")
                    parts.append(part.detach())
        finally:
            # Restore each module's own flag (model.train() would switch on modules the user keeps in
            # eval mode). Plain nn.Modules take a direct attribute write, which is what their
            # __setattr__ does for a bool, at a fraction of the cost.
            for module, flag, plain in zip(self._modules, flags, self._plain):
                if plain:
                    object.__setattr__(module, "training", flag)
                else:
                    module.training = flag
        losses = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self._inverse is not None:
            losses = losses[self._inverse.to(losses.device)]
        if losses._base is not None:   # a view would keep the loss_fn's outputs alive
            losses = losses.clone()
        return losses.float()

    def _to_device(self, values: Any) -> Any:
        if values is None:
            return None
        return map_tensors(values, lambda tensor: tensor.to(self._device, non_blocking=True), "test_inputs")

    def _prepare_chunks(self) -> list[tuple[Any, Any]]:
        size = self.eval_batch_size
        order = self._length_order()
        subset = self._subset if order is None else self._subset[order]
        self._inverse = None if order is None else torch.from_numpy(np.argsort(order))
        rows = [subset[start:start + size] for start in range(0, subset.size, size)]
        chunks = []
        if self._test_collate is not None:
            for index in rows:
                inputs = self._test_collate([self._test_inputs[int(i)] for i in index])
                chunks.append((map_tensors(inputs, torch.as_tensor, "collated test batch"), None))
        else:
            whole = self._subset.size == num_rows(self._test_inputs, "test_inputs") and \
                bool((self._subset == np.arange(self._subset.size)).all())
            for index in rows:
                take = row_slicer(slice(int(index[0]), int(index[-1]) + 1) if whole   # views, no copy
                                   else torch.from_numpy(index))
                inputs = map_tensors(self._test_inputs, take, "test_inputs")
                targets = None if self._test_targets is None else \
                    map_tensors(self._test_targets, take, "test_targets")
                chunks.append((inputs, targets))
        if self.test_on_device:
            chunks = [(self._to_device(inputs), self._to_device(targets)) for inputs, targets in chunks]
        return chunks

    def _length_order(self) -> np.ndarray | None:
        """Positions in ``test_ids`` sorted by example length (stable), or ``None`` to keep the order."""
        if self._test_collate is None or not self.sort_by_length:
            return None
        lengths = []
        for row in self._subset:
            example = self._test_inputs[int(row)]
            tokens: Any = example.get("input_ids") if isinstance(example, Mapping) else example
            try:
                lengths.append(len(tokens))
            except TypeError:
                return None
        order = np.argsort(np.asarray(lengths), kind="stable")
        return None if bool((order == np.arange(order.size)).all()) else order

    def _keep(self, step: int, losses: torch.Tensor) -> None:
        self._eval_steps.append(step)
        if losses.device.type == "cpu":
            self._host.append(losses.numpy()[None])
            return
        self._pending.append(losses)
        if len(self._pending) * losses.numel() * 4 >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            block = torch.stack(self._pending).cpu().numpy()
            self._host.append(block)
            self._pending = []

    # --- batches -------------------------------------------------------------------------------
    def _batch_indices(self, batch_ids: Any, step: int) -> np.ndarray:
        where = f"Recorder.step (step {step})"
        if isinstance(batch_ids, torch.Tensor):
            batch_ids = batch_ids.detach().cpu().numpy()
        if isinstance(batch_ids, (str, bytes, int, np.integer)):
            raise TypeError(f"{where}: batch_ids must be a sequence of ids (a list, array or tensor), "
                            f"got a single {type(batch_ids).__name__}")
        array = np.asarray(batch_ids).reshape(-1) if not isinstance(batch_ids, np.ndarray) \
            else batch_ids.reshape(-1)
        if array.size == 0:
            raise UsageError(f"{where}: the batch is empty; every step must train on at least one example")
        if array.dtype.kind in "iu":
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= self.train_ids.size:
                raise UsageError(f"{where}: index out of range [{low}, {high}]; integer batch ids are positions "
                                 f"in train_ids, [0, {self.train_ids.size - 1}]")
            return array.astype(np.int64)
        if array.dtype.kind in "USO":
            if self._train_lookup is None:
                self._train_lookup = {train_id: i for i, train_id in enumerate(self.train_ids.tolist())}
            try:
                return np.fromiter((self._train_lookup[str(i)] for i in array.tolist()), np.int64, array.size)
            except KeyError as error:
                raise UsageError(f"{where}: unknown training id {error.args[0]!r} (not in train_ids)") from None
        raise TypeError(f"{where}: batch_ids must be ints (positions in train_ids) or str ids, "
                        f"got dtype {array.dtype}")

    def _build_log(self) -> RunLog:
        assert self.run_id is not None  # named by _check_store at start
        width = max(batch.size for batch in self._batches)
        curriculum = np.full((len(self._batches), width), PAD, dtype=np.int32)
        for row, batch in zip(curriculum, self._batches):
            row[:batch.size] = batch
        return RunLog(self.run_id, curriculum, self.losses, self.eval_steps, self.seed, self.meta)

    # --- store ---------------------------------------------------------------------------------
    def _check_store(self) -> None:
        """Fail before training, not after: ids, meta and run id against an existing store."""
        store = self._open_store(create=False)
        if self.run_id is None:
            self.run_id = self._free_run_id(store)
        check_run_id(self.run_id, str(self._root))
        try:
            json.dumps(self.meta)
        except TypeError as error:
            raise RunDataError("Recorder", "meta", f"is not JSON-serialisable: {error}") from None
        if store is not None and not self.overwrite and not self._auto_run_id and self.run_id in store:
            raise RunDataError(str(store.run_path(self.run_id)), "run_id", "already exists in the store",
                               "choose another run_id or pass overwrite=True")

    def _open_store(self, create: bool) -> RunStore | None:
        if self._store is None:
            exists = (self._root / MANIFEST).is_file()
            if exists and self.store_meta is None:
                self._store = RunStore(self._root)
            elif exists or create:
                self._store = RunStore.create(self._root, self.train_ids, self.test_ids,
                                              meta=self.store_meta or {}, exist_ok=True)
            else:
                return None
        if self._store.digest != self._digest:
            raise RunDataError(str(self._root), "train_ids/test_ids",
                               "differ from the ids of the existing store",
                               "record runs of other data (or another test subset) into another store")
        return self._store

    def _free_run_id(self, store: RunStore | None) -> str:
        taken = set(store.run_ids()) if store is not None else set()
        number = len(taken)
        while f"run-{number:06d}" in taken:
            number += 1
        return f"run-{number:06d}"

    def __repr__(self) -> str:
        return (f"Recorder(run_id={self.run_id!r}, state={self._state}, steps={self.num_steps}, "
                f"evals={len(self._eval_steps)}, test={self.test_ids.size}, store='{self._root}')")
