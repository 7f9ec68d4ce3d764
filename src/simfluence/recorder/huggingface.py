"""Hugging Face ``Trainer`` pieces: record the run a ``Trainer`` trains with :class:`SimfluenceCallback`.

:class:`IndexedDataset` and :class:`IndexedCollator` carry each training example's index
through the Trainer's dataloader into the batch; :class:`SimfluenceCallback` (a
``transformers.TrainerCallback``) reads the indices of every optimizer step and drives a
:class:`~simfluence.recorder.Recorder`. ``transformers`` is imported only when
:class:`SimfluenceCallback` is first used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from simfluence.errors import UsageError
from simfluence.recorder.losses import LossFn, auto_loss
from simfluence.recorder.recorder import Recorder
from simfluence.runs.log import RunLog
from simfluence.runs.store import RunStore

INDEX_KEY = "example_index"
"""Batch key under which :class:`IndexedCollator` passes the training-example indices."""


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
            raise UsageError("SimfluenceCallback.attach: the trainer has no train_dataset")
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
                raise UsageError("SimfluenceCallback: give train_ids (or use attach(trainer))")
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
