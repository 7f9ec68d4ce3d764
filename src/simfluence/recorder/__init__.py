"""Record a training run of your own: a plain PyTorch loop or a Hugging Face ``Trainer``.

Simfluence learns from logged runs: the ids of the training examples in every batch and
the loss of every test example before training and after every step (or every ``k``-th
step). This package logs exactly that from training code you already have and writes one
:class:`~simfluence.runs.log.RunLog` into a :class:`~simfluence.runs.store.RunStore`.

Plain PyTorch::

    from simfluence.recorder import Recorder

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

    from simfluence.recorder import SimfluenceCallback

    callback = SimfluenceCallback("runs/", test_inputs=test_examples, test_collate=collator,
                                  eval_every=1)   # loss_fn: auto_loss, chosen from the model's output
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)
    callback.attach(trainer)          # wraps dataset and collator, adds the callback
    trainer.train()                   # the run is written when training ends

``transformers`` is imported only when :class:`SimfluenceCallback` is first used.

One job per module: :mod:`~simfluence.recorder.recorder` (:class:`Recorder`, for your own
loop), :mod:`~simfluence.recorder.losses` (per-example loss functions),
:mod:`~simfluence.recorder.inputs` (nested model inputs: mapping, counting and slicing
their rows) and :mod:`~simfluence.recorder.huggingface` (the ``Trainer`` pieces).
"""

from typing import Any

from simfluence.recorder.huggingface import INDEX_KEY, IndexedCollator, IndexedDataset
from simfluence.recorder.losses import LossFn, auto_loss, causal_lm_example_loss, causal_lm_loss, from_criterion
from simfluence.recorder.recorder import Recorder

__all__ = [  # SimfluenceCallback is built on first access, see __getattr__
    "INDEX_KEY", "IndexedCollator", "IndexedDataset", "LossFn", "Recorder", "SimfluenceCallback",
    "auto_loss", "causal_lm_example_loss", "causal_lm_loss", "from_criterion",
]


def __getattr__(name: str) -> Any:
    # SimfluenceCallback subclasses transformers.TrainerCallback; it is built on first use so that
    # importing this package (for Recorder) does not import transformers.
    if name == "SimfluenceCallback":
        from simfluence.recorder import huggingface

        return huggingface.SimfluenceCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
