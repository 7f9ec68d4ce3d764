"""Record a training run of your own: a plain PyTorch loop or a Hugging Face ``Trainer``.

Simfluence learns from logged runs: the ids of the training examples in every batch and
the loss of every test example before training and after every step (or every ``k``-th
step). This module logs exactly that from training code you already have and writes one
:class:`~simfluence.runs.log.RunLog` into a :class:`~simfluence.runs.store.RunStore`.

Plain PyTorch::

    from simfluence.collect.recorder import Recorder

    def per_example_loss(model, inputs, targets):          # -> [n], one loss per example
        return F.cross_entropy(model(inputs), targets, reduction="none")

    with Recorder("runs/", model=model, loss_fn=per_example_loss,
                  test_inputs=x_test, test_targets=y_test,
                  train_ids=train_ids, test_ids=test_ids, meta={"lr": 0.1}) as rec:
        for batch_ids, (x, y) in loader:                    # batch_ids: this batch's examples
            optimizer.zero_grad()
            per_example_loss(model, x, y).mean().backward()
            optimizer.step()
            rec.step(batch_ids)                             # after each optimizer step

Entering evaluates the test set (step 0, before training); :meth:`Recorder.step` records the
batch and evaluates after every ``eval_every``-th step; leaving the block evaluates the last
step (if it was not already) and writes the run atomically. If the block raises, nothing is
written. Without ``with``: :meth:`Recorder.start`, :meth:`Recorder.step`,
:meth:`Recorder.finish` (or :meth:`Recorder.abort`).

Hugging Face ``Trainer`` (see :class:`SimfluenceCallback` for how batches are identified)::

    from simfluence.collect.recorder import SimfluenceCallback

    callback = SimfluenceCallback("runs/", test_inputs=test_examples, test_collate=collator,
                                  eval_every=1)   # loss_fn: auto_loss, chosen from the model's output
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)
    callback.attach(trainer)          # wraps dataset and collator, adds the callback
    trainer.train()                   # the run is written when training ends

``transformers`` is imported only when :class:`SimfluenceCallback` is first used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from simfluence.runs.log import PAD, RunDataError, RunLog, RunSet, check_run_id
from simfluence.runs.store import MANIFEST, RunStore, ids_digest

Inputs = torch.Tensor | Mapping[str, Any] | Sequence[Any]
"""Model inputs: a tensor, a dict of tensors or a tuple of tensors, examples along dim 0."""

LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]
"""``loss_fn(model, inputs, targets) -> [n]``: the loss of each of ``n`` examples.

``targets`` is ``None`` when the test set has no separate targets (e.g. labels inside a
Hugging Face batch)."""

INDEX_KEY = "example_index"
"""Batch key under which :class:`IndexedCollator` passes the training-example indices."""

FLUSH_BYTES = 64 << 20
"""Recorded losses kept on an accelerator are moved to host memory in blocks of about this size."""

__all__ = [  # noqa: F822 (SimfluenceCallback is built on first access, see __getattr__)
    "INDEX_KEY", "IndexedCollator", "IndexedDataset", "Recorder", "SimfluenceCallback",
    "auto_loss", "causal_lm_example_loss", "causal_lm_loss", "from_criterion",
]


# --- per-example losses ------------------------------------------------------------------
def causal_lm_example_loss(logits: torch.Tensor, labels: torch.Tensor,
                           attention_mask: torch.Tensor | None = None,
                           ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of each example: float32 ``[n]``.

    Args:
        logits: ``[n, L, V]`` (any float dtype; the loss is computed in float32).
        labels: ``[n, L]`` token ids; position ``j`` is predicted from logits at ``j - 1``
            (the Hugging Face convention: labels are *not* pre-shifted). Entries equal to
            ``ignore_index`` (``-100``) do not count.
        attention_mask: optional ``[n, L]``; positions where it is 0 (padding) do not count.
        ignore_index: the label value of positions that do not count.

    Example ``i``'s loss is the mean over its counted target tokens, which for a single
    example equals Hugging Face's ``model(input_ids, labels=labels).loss``. An example with
    no counted token gets NaN (0 / 0) rather than a silent 0; :class:`Recorder` rejects NaN
    at step 0 with the offending test id.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"causal_lm_example_loss: expected logits [n, L, V] and labels [n, L], "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return _token_mean_loss(logits[:, :-1], labels[:, 1:], None if attention_mask is None else attention_mask[:, 1:],
                            ignore_index)


def _token_mean_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                     ignore_index: int = -100) -> torch.Tensor:
    """float32 ``[n]``: each example's mean cross-entropy over its counted tokens.

    ``logits`` ``[n, L, V]``, ``labels`` ``[n, L]`` aligned with them; tokens whose label is
    ``ignore_index`` or whose ``mask`` (``[n, L]``, optional) is 0 do not count. An example with
    no counted token gets NaN (0 / 0).
    """
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    token_loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.masked_fill(~valid, ignore_index)
                                             .flatten(), ignore_index=ignore_index, reduction="none").view(labels.shape)
    return token_loss.sum(dim=1) / valid.sum(dim=1)


def causal_lm_loss(model: nn.Module, inputs: Mapping[str, torch.Tensor],
                   targets: torch.Tensor | None = None) -> torch.Tensor:
    """``loss_fn`` for a Hugging Face causal LM: mean token loss per example, float32 ``[n]``.

    ``inputs`` is a batch dict (``input_ids``, ``attention_mask``, ...). The labels are
    ``targets`` if given, else ``inputs["labels"]``, else ``input_ids`` (padding excluded
    through ``attention_mask``). Labels are never passed to the model, so it does not
    compute its own (batch-mean) loss.
    """
    inputs, labels = _split_labels(dict(inputs), targets)
    if labels is None:
        labels = inputs["input_ids"]
    return causal_lm_example_loss(model(**inputs).logits, labels, inputs.get("attention_mask"))


def from_criterion(criterion: Callable[[Any, Any], torch.Tensor]) -> LossFn:
    """Turn a per-element criterion ``criterion(logits, targets)`` into a ``loss_fn``.

    The criterion must not reduce over examples, e.g. ``nn.CrossEntropyLoss(reduction="none")``;
    losses with more than one value per example (``nn.MSELoss(reduction="none")`` on
    ``[n, d]`` outputs) are averaged over the non-example dimensions.

    The criterion gets the model's logits (``outputs.logits`` of a Hugging Face output, the
    first element of a tuple, or the tensor itself) and the targets: ``targets`` when given,
    else the ``labels`` of a dict batch, which is then not passed to the model.
    """
    reduction = getattr(criterion, "reduction", "none")
    if reduction != "none":
        raise ValueError(f"from_criterion: the criterion reduces over examples (reduction={reduction!r}); "
                         "construct it with reduction='none'")

    def loss_fn(model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        inputs, labels = _split_labels(inputs, targets)
        if labels is None:
            raise ValueError("from_criterion: no targets: pass test_targets, or put 'labels' in the test batches")
        losses = criterion(_logits(_call(model, inputs)), labels)
        return losses.flatten(1).mean(dim=1) if losses.ndim > 1 else losses

    return loss_fn


def auto_loss(model: nn.Module, inputs: Any, targets: Any = None) -> torch.Tensor:
    """``loss_fn`` chosen from the model's output type: float32 ``[n]``, one loss per example.

    * ``*CausalLMOutput*``: mean next-token cross-entropy (:func:`causal_lm_example_loss`;
      labels default to ``input_ids`` with padding excluded);
    * ``*SequenceClassifierOutput*``: cross-entropy of the class logits ``[n, C]`` for int labels
      ``[n]``; squared error for one output (``num_labels=1``, regression); mean binary
      cross-entropy for float multi-label targets ``[n, C]``;
    * ``*TokenClassifierOutput*``: mean cross-entropy over each example's labelled tokens
      (labels ``-100`` and padding excluded).

    Labels are ``targets`` when given, else the batch's ``labels`` (never passed to the model,
    so it does not compute its own batch-mean loss). Any other output type is a ``ValueError``
    naming it: pass your own ``loss_fn`` then.
    """
    inputs, labels = _split_labels(inputs, targets)
    outputs = _call(model, inputs)
    kind = type(outputs).__name__
    if not any(known in kind for known in ("CausalLM", "SequenceClassifier", "TokenClassifier")):
        raise ValueError(f"auto_loss: no per-example loss is known for model outputs of type {kind}; pass "
                         "loss_fn=your_loss(model, inputs, targets) -> [n] (or from_criterion(...))")
    logits = _logits(outputs)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if "CausalLM" in kind:
        if labels is None:
            labels = inputs["input_ids"]
        return causal_lm_example_loss(logits, labels, mask)
    if labels is None:
        raise ValueError(f"auto_loss: the test batches of a {kind} model need 'labels' (or pass test_targets)")
    if "SequenceClassifier" in kind:
        logits = logits.float()
        if logits.shape[-1] == 1 and labels.ndim == 1:
            return (logits[:, 0] - labels.float()) ** 2
        if labels.is_floating_point() and labels.shape == logits.shape:
            return nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)
        return nn.functional.cross_entropy(logits, labels.long(), reduction="none")
    return _token_mean_loss(logits, labels, mask)   # token classification


def _split_labels(inputs: Any, targets: Any) -> tuple[Any, Any]:
    """``(inputs without 'labels', targets or the batch's labels)``."""
    labels = targets
    if isinstance(inputs, Mapping) and "labels" in inputs:
        inputs = dict(inputs)
        batch_labels = inputs.pop("labels")
        if labels is None:
            labels = batch_labels
    return inputs, labels


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"model outputs of type {type(outputs).__name__} hold no logits tensor; pass your own loss_fn")


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


# --- nested inputs -------------------------------------------------------------------------
def _map_tensors(inputs: Any, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> Any:
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, np.ndarray):
        return fn(torch.from_numpy(inputs))
    if isinstance(inputs, Mapping):
        return {key: _map_tensors(value, fn, f"{name}[{key!r}]") for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_map_tensors(value, fn, f"{name}[{i}]") for i, value in enumerate(inputs))
    raise TypeError(f"{name}: expected a tensor, a dict or a tuple of tensors, got {type(inputs).__name__}")


def _num_rows(inputs: Any, name: str) -> int:
    sizes: set[int] = set()

    def note_rows(tensor: torch.Tensor) -> torch.Tensor:
        sizes.add(int(tensor.shape[0]))
        return tensor

    _map_tensors(inputs, note_rows, name)
    if len(sizes) != 1:
        raise ValueError(f"{name}: tensors disagree on the number of examples {sorted(sizes)}; "
                         "give every tensor one row per test example")
    return sizes.pop()


def _row_slicer(rows: slice | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(rows, slice):
        return lambda tensor: tensor[rows]
    return lambda tensor: tensor[rows.to(tensor.device)]


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
        raise ValueError(f"{name}: expected a 1-D list of ids, got shape {array.shape}")
    return array.astype(str)


# --- the recorder ----------------------------------------------------------------------------
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
            raise ValueError(f"eval_every: expected an integer >= 1, got {eval_every!r}")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, (int, np.integer)) \
                or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: expected an integer >= 1, got {eval_batch_size!r}")
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
            num_test = _num_rows(test_inputs, "test_inputs")
            if test_targets is not None and _num_rows(test_targets, "test_targets") != num_test:
                raise ValueError(f"test_targets: has {_num_rows(test_targets, 'test_targets')} rows, "
                                 f"test_inputs has {num_test}; give one target row per test example")
        else:
            if test_targets is not None:
                raise ValueError("test_targets: must be None with test_collate (the collated batch holds targets)")
            num_test = len(test_inputs)
        all_test_ids = np.arange(num_test).astype(str) if test_ids is None else _ids_array(test_ids, "test_ids")
        if all_test_ids.size != num_test:
            raise ValueError(f"test_ids: has {all_test_ids.size} ids for {num_test} test examples "
                             "(test_ids names every row of test_inputs; choose rows with test_subset)")
        if test_subset is None:
            subset = np.arange(num_test)
        else:
            subset = np.asarray(test_subset)
            if subset.ndim != 1 or subset.size == 0 or subset.dtype.kind not in "iu":
                raise ValueError("test_subset: expected a non-empty 1-D list of row indices")
            if subset.min() < 0 or subset.max() >= num_test:
                raise ValueError(f"test_subset: indices must lie in [0, {num_test - 1}]")
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
                raise ValueError(f"loss_fn: the loss of test example '{bad}' at step 0 is NaN or inf "
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
                        raise ValueError(f"loss_fn: returned {shape} for a chunk of {size} test examples; it "
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
        return _map_tensors(values, lambda tensor: tensor.to(self._device, non_blocking=True), "test_inputs")

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
                chunks.append((_map_tensors(inputs, torch.as_tensor, "collated test batch"), None))
        else:
            whole = self._subset.size == _num_rows(self._test_inputs, "test_inputs") and \
                bool((self._subset == np.arange(self._subset.size)).all())
            for index in rows:
                take = _row_slicer(slice(int(index[0]), int(index[-1]) + 1) if whole   # views, no copy
                                   else torch.from_numpy(index))
                inputs = _map_tensors(self._test_inputs, take, "test_inputs")
                targets = None if self._test_targets is None else \
                    _map_tensors(self._test_targets, take, "test_targets")
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
            raise ValueError(f"{where}: the batch is empty; every step must train on at least one example")
        if array.dtype.kind in "iu":
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= self.train_ids.size:
                raise ValueError(f"{where}: index out of range [{low}, {high}]; integer batch ids are positions "
                                 f"in train_ids, [0, {self.train_ids.size - 1}]")
            return array.astype(np.int64)
        if array.dtype.kind in "USO":
            if self._train_lookup is None:
                self._train_lookup = {train_id: i for i, train_id in enumerate(self.train_ids.tolist())}
            try:
                return np.fromiter((self._train_lookup[str(i)] for i in array.tolist()), np.int64, array.size)
            except KeyError as error:
                raise ValueError(f"{where}: unknown training id {error.args[0]!r} (not in train_ids)") from None
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


# --- Hugging Face Trainer ------------------------------------------------------------------------
class IndexedDataset(torch.utils.data.Dataset):
    """Wrap a map-style dataset so that item ``i`` is ``(i, dataset[i])``.

    Use with :class:`IndexedCollator`, which strips the index before your collator sees
    the example. Index ``i`` is the training example's position in ``train_ids``.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return int(index), self.dataset[index]


class IndexedCollator:
    """Collate ``(index, example)`` pairs: ``collator(examples)`` plus ``batch["example_index"]``.

    Args:
        collator: your collate function (default ``transformers.default_data_collator``).
        columns: if given, dict examples are reduced to these keys before ``collator``
            (what ``Trainer(remove_unused_columns=True)`` would have done; set by
            :meth:`SimfluenceCallback.attach`).
        key: the batch key for the int64 tensor of indices (default ``"example_index"``).

    The Trainer's own column removal passes the ``(index, example)`` pairs through
    untouched (it only edits dict examples), so the index survives any
    ``remove_unused_columns`` setting and any number of dataloader worker processes.
    """

    def __init__(self, collator: Callable[[list], Any] | None = None, columns: Sequence[str] | None = None,
                 key: str = INDEX_KEY):
        self.collator = collator
        self.columns = None if columns is None else set(columns)
        self.key = key

    def __call__(self, features: list) -> Any:
        """Collate ``(index, example)`` pairs: the wrapped collator's batch plus the indices under ``key``."""
        if not features or not all(isinstance(item, tuple) and len(item) == 2 for item in features):
            raise TypeError("IndexedCollator: expected (index, example) pairs; wrap the training dataset "
                            "in IndexedDataset")
        indices = torch.tensor([int(index) for index, _ in features], dtype=torch.int64)
        examples = [example for _, example in features]
        if self.columns is not None:
            examples = [{k: v for k, v in example.items() if k in self.columns} if isinstance(example, dict)
                        else example for example in examples]
        collator = self.collator
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        batch = collator(examples)
        if not isinstance(batch, Mapping):
            raise TypeError(f"IndexedCollator: the collator returned a {type(batch).__name__}; it must return a "
                            "dict batch (model(**batch)) for the index to travel with it")
        batch = dict(batch)
        batch[self.key] = indices
        return batch


class _SimfluenceCallbackImpl:
    """Logic of :class:`SimfluenceCallback`; combined with ``transformers.TrainerCallback`` lazily."""

    def __init__(
        self,
        store: RunStore | str | Path,
        *,
        test_inputs: Any,
        test_targets: Any = None,
        test_collate: Callable[[list], Any] | None = None,
        loss_fn: LossFn = auto_loss,
        train_ids: Sequence[str] | int | None = None,
        test_ids: Sequence[str] | None = None,
        test_subset: Sequence[int] | None = None,
        run_id: str | None = None,
        eval_every: int = 1,
        eval_batch_size: int = 64,
        meta: dict | None = None,
        store_meta: dict | None = None,
        seed: int | None = None,
        overwrite: bool = False,
        sort_by_length: bool = True,
        key: str = INDEX_KEY,
    ):
        self.store = store
        self.options = dict(
            test_inputs=test_inputs, test_targets=test_targets, test_collate=test_collate, loss_fn=loss_fn,
            test_ids=test_ids, test_subset=test_subset, run_id=run_id, eval_every=eval_every,
            eval_batch_size=eval_batch_size, store_meta=store_meta, seed=seed, overwrite=overwrite,
            sort_by_length=sort_by_length,
        )
        self.train_ids = train_ids
        self.meta = dict(meta or {})
        self.key = key
        self.recorder: Recorder | None = None
        self.log: RunLog | None = None
        self._hook = None
        self._in_step = False
        self._micro_batches: list[torch.Tensor] = []
        self._rates: list[float] = []

    def attach(self, trainer: Any) -> Any:
        """Wrap ``trainer``'s training dataset and collator for indexing, and add this callback.

        Call before ``trainer.train()``. Keeps the Trainer's removal of unused columns
        (when ``remove_unused_columns``) by passing the model's input names to
        :class:`IndexedCollator`. Returns the trainer.
        """
        if trainer.train_dataset is None:
            raise ValueError("SimfluenceCallback.attach: the trainer has no train_dataset")
        if not isinstance(trainer.train_dataset, IndexedDataset):
            if self.train_ids is None:
                self.train_ids = len(trainer.train_dataset)
            trainer.train_dataset = IndexedDataset(trainer.train_dataset)
        if not isinstance(trainer.data_collator, IndexedCollator):
            columns = None
            if getattr(trainer.args, "remove_unused_columns", False) and \
                    hasattr(trainer, "_set_signature_columns_if_needed"):
                trainer._set_signature_columns_if_needed()
                columns = list(getattr(trainer, "_signature_columns", None) or []) or None
            trainer.data_collator = IndexedCollator(trainer.data_collator, columns=columns, key=self.key)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return trainer

    # --- Trainer events ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if getattr(args, "world_size", 1) > 1:
            raise RuntimeError("SimfluenceCallback: distributed training is not supported (each process sees "
                               "only its shard of every batch); record on a single process")
        if state.global_step != 0:
            raise RuntimeError(f"SimfluenceCallback: training starts at step {state.global_step} (resumed from "
                               "a checkpoint); a run must be recorded from step 0")
        train_ids = self.train_ids
        if train_ids is None:
            dataset = getattr(train_dataloader, "dataset", None)
            if dataset is None:
                raise ValueError("SimfluenceCallback: give train_ids (or use attach(trainer))")
            train_ids = len(dataset)
        self._remove_hook()
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.log = None
        self._rates = []
        self.recorder = Recorder(self.store, model=model, train_ids=train_ids,
                                 meta={**_trainer_meta(args, state), **self.meta},
                                 **self.options)
        try:
            self.recorder.start()
        except BaseException:
            self._remove_hook()
            raise

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._in_step = True
        self._micro_batches = []
        # The scheduler steps after the optimizer, so the rate now is the one this step uses.
        if optimizer is not None and optimizer.param_groups:
            self._rates.append(float(optimizer.param_groups[0]["lr"]))

    def on_step_end(self, args, state, control, **kwargs):
        self._in_step = False
        if self.recorder is None:
            return
        if not self._micro_batches:
            self.recorder.abort()
            self._remove_hook()
            raise RuntimeError(
                f"SimfluenceCallback: no '{self.key}' reached the model in step {state.global_step}: wrap the "
                f"training dataset in IndexedDataset and the collator in IndexedCollator (callback.attach(trainer) "
                f"does both), or give each example an '{self.key}' column with remove_unused_columns=False")
        batch = torch.cat([index.reshape(-1) for index in self._micro_batches])
        self._micro_batches = []
        # The last step is evaluated here, not at on_train_end: by then the Trainer may have
        # loaded its best checkpoint (load_best_model_at_end).
        last = state.max_steps and state.global_step >= state.max_steps
        self.recorder.step(batch, evaluate=True if last or control.should_training_stop else None)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()
        if self.recorder is not None and self.recorder._state == "recording":
            if len(self._rates) == self.recorder.num_steps and all(map(math.isfinite, self._rates)):
                self.recorder.meta["learning_rates"] = self._rates
            # Stopped early (e.g. EarlyStoppingCallback) after an unevaluated step: evaluate the
            # model now unless the Trainer has swapped in its best checkpoint.
            self.log = self.recorder.finish(evaluate_last=not getattr(args, "load_best_model_at_end", False))

    def _pre_forward(self, module, args, kwargs):
        index = kwargs.pop(self.key, None)
        if index is None:
            return None
        if self._in_step:
            self._micro_batches.append(index.detach().to("cpu") if isinstance(index, torch.Tensor)
                                       else torch.as_tensor(index))
        return args, kwargs

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


TRAINER_KEYS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "weight_decay",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "seed", "data_seed", "fp16", "bf16", "tf32", "label_smoothing_factor",
    "dataloader_drop_last", "use_cpu",
)
"""``TrainingArguments`` fields that decide a run, recorded in its meta under ``"trainer"``."""


def _trainer_meta(args: Any, state: Any = None) -> dict:
    """The run-deciding Trainer settings, with the steps actually taken (``state.max_steps``).

    ``num_train_epochs`` is recorded only when it decides the run length (``max_steps <= 0``).
    """
    meta = {}
    for key in TRAINER_KEYS + (("num_train_epochs",) if getattr(args, "max_steps", 0) <= 0 else ()):
        value = getattr(args, key, None)
        value = getattr(value, "value", value)   # enums
        if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            meta[key] = value
    if state is not None and getattr(state, "max_steps", None):
        meta["effective_steps"] = int(state.max_steps)
    device = getattr(args, "device", None)
    if device is not None:
        meta["device"] = str(device)
    return {"trainer": meta}


_CALLBACK_DOC = """Hugging Face ``TrainerCallback`` that records the run a ``Trainer`` trains.

How batches are identified: the Trainer shuffles through its own sampler and may
prefetch batches, run collation in worker processes and accumulate gradients, so the
callback does not guess. :class:`IndexedDataset` makes item ``i`` the pair
``(i, example)`` and :class:`IndexedCollator` collates the examples with your collator
and adds ``batch["example_index"]`` (int64 ``[b]``). The callback registers a forward
pre-hook on the model that removes ``example_index`` from the keyword arguments before
the model runs (so any model accepts the batch) and, between ``on_step_begin`` and
``on_step_end``, keeps it. A step's batch is therefore exactly the examples that went
through a training forward pass in that optimizer step: with gradient accumulation all
its micro-batches in order; batches prefetched but never trained on (``max_steps``) are
not counted. ``attach(trainer)`` sets both wrappers and adds the callback. Alternatively
put an ``example_index`` column in your data yourself and pass
``remove_unused_columns=False``.

At ``on_train_begin`` it evaluates step 0; at each ``on_step_end`` (after the optimizer
and scheduler step) it records the batch and evaluates the test set every
``eval_every`` steps and at the last step (``max_steps``, or when a callback stops
training); at ``on_train_end`` it writes the run (attribute ``log``). A run stopped after
an unevaluated step is evaluated at ``on_train_end``, unless ``load_best_model_at_end``
has replaced the weights: then its evaluations end before its last step. If training raises, nothing is written. The
Trainer's settings (learning rate, batch size, ...) are stored in the run's meta under
``"trainer"``. Single-process training only; a resumed run (``global_step > 0``) is refused.

Args are those of :class:`Recorder` except ``model`` (the Trainer's) and ``device`` (the
model's); ``loss_fn`` defaults to :func:`auto_loss` (chosen from the model's output type); ``train_ids`` defaults to
``"0".."N-1"`` for the ``N`` training examples; ``test_inputs`` is either a batch dict of
tensors (one row per test example) or, with ``test_collate`` (e.g. your data collator),
a sequence of test examples, collated ``eval_batch_size`` at a time; ``key`` renames
``example_index``.
"""

_callback_class: type | None = None


def _callback() -> type:
    global _callback_class
    if _callback_class is None:
        from transformers import TrainerCallback

        _callback_class = type("SimfluenceCallback", (_SimfluenceCallbackImpl, TrainerCallback),
                               {"__doc__": _CALLBACK_DOC, "__module__": __name__,
                                "__qualname__": "SimfluenceCallback"})
    return _callback_class


def __getattr__(name: str) -> Any:
    # SimfluenceCallback subclasses transformers.TrainerCallback; build it on first use so that
    # importing this module (for Recorder) does not import transformers.
    if name == "SimfluenceCallback":
        return _callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
