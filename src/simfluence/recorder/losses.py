"""Per-example test losses: functions ``loss_fn(model, inputs, targets) -> [n]`` for a :class:`Recorder`.

:func:`auto_loss` chooses the loss from a Hugging Face model's output type;
:func:`causal_lm_loss` and :func:`causal_lm_example_loss` give the mean next-token loss of
each example; :func:`from_criterion` turns a ``reduction="none"`` criterion into a ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from simfluence.errors import UsageError

LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]
"""``loss_fn(model, inputs, targets) -> [n]``: the loss of each of ``n`` examples.

``targets`` is ``None`` when the test set has no separate targets (e.g. labels inside a
Hugging Face batch)."""


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
        raise UsageError(f"causal_lm_example_loss: expected logits [n, L, V] and labels [n, L], "
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
        raise UsageError(f"from_criterion: the criterion reduces over examples (reduction={reduction!r}); "
                         "construct it with reduction='none'")

    def loss_fn(model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        inputs, labels = _split_labels(inputs, targets)
        if labels is None:
            raise UsageError("from_criterion: no targets: pass test_targets, or put 'labels' in the test batches")
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
        raise UsageError(f"auto_loss: no per-example loss is known for model outputs of type {kind}; pass "
                         "loss_fn=your_loss(model, inputs, targets) -> [n] (or from_criterion(...))")
    logits = _logits(outputs)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if "CausalLM" in kind:
        if labels is None:
            labels = inputs["input_ids"]
        return causal_lm_example_loss(logits, labels, mask)
    if labels is None:
        raise UsageError(f"auto_loss: the test batches of a {kind} model need 'labels' (or pass test_targets)")
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
    raise UsageError(f"model outputs of type {type(outputs).__name__} hold no logits tensor; pass your own loss_fn")


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)

