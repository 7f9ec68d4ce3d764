r"""Feature vectors of a task's examples, for methods that predict an example's effect from them.

A method that must say something about examples no fitting run contained (``featurized``,
``gptfluence``) describes each training and test example by a feature row. They come from

* the task: :meth:`~simfluence.tasks.Task.example_features` (what its model sees of
  the example: pixels and hidden activations, text embeddings, ...);
* gradients: :func:`gradient_sketch`, per-example gradients at ``K`` checkpoints
  (:func:`checkpoint_steps` of a replayed run, :func:`checkpoint_states`), count-sketched,
  so that inner products of the rows are Grad-Dot's (one checkpoint) or TracIn-CP's sum;
* the caller: arrays checked by :func:`check_features` (:func:`given_features` for a pair).

:func:`task_features` concatenates the sources asked for into one float32 ``[n, D]`` table in
the order of the wanted ids, and returns each source's column range (a *block*, ``[J, 2]``).
:func:`block_scales` and :func:`scale_blocks` bring each block to unit root mean square, so
that no block dominates by its units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from simfluence.errors import UsageError
from simfluence.func.gradients import per_example_gradients, trainable_params
from simfluence.runs.log import RunDataError
from simfluence.tasks.base import num_examples, take

SOURCES = ("task", "gradients")
"""What :func:`task_features` can read features from."""

State = Mapping[str, torch.Tensor] | None
"""A model state dict; ``None`` stands for the task's starting checkpoint."""


def gradient_sketch(task: Any, split: str, dim: int = 4096, seed: int = 0, chunk_size: int = 64,
                    states: Sequence[State] = (None,)) -> np.ndarray:
    """float32 ``[n, K min(P, dim)]``: per-example gradients at ``K`` checkpoints, each sketched to ``dim``.

    ``states`` are the checkpoints' state dicts (``None``: the task's starting checkpoint);
    their sketches are concatenated, so inner products of the result add the checkpoints'
    gradient inner products, as TracIn-CP does.

    ``P`` is the number of trainable weights (:func:`~simfluence.func.gradients.per_example_gradients`).
    When ``P <= dim`` the gradients are returned as they are. Otherwise each flattened gradient
    ``g`` becomes ``S g`` with ``S`` a ``[dim, P]`` count sketch: coordinate ``j`` goes to a
    random bucket ``h(j)`` with a random sign, so ``E[(S g) . (S g')] = g . g'`` (the inner
    products Grad-Dot uses) with relative error about ``1 / sqrt(dim)``, in ``O(P)`` memory.
    ``seed`` fixes ``S``; both splits share it.
    """
    from simfluence.progress import progress_bar

    inputs, targets = task.split_data(split)
    count = num_examples(inputs)
    blocks = []
    for state in progress_bar(states, desc=f"gradient features ({split})", unit="checkpoint", leave=False,
                              enabled=len(states) >= 2):
        model = task.build_model().eval()
        if state is not None:
            model.load_state_dict(state)
        params = trainable_params(model)
        size = sum(value.numel() for value in params.values())
        width = min(size, dim)
        generator = torch.Generator().manual_seed(seed)
        buckets = torch.randint(0, width, (size,), generator=generator)
        signs = torch.randint(0, 2, (size,), generator=generator).to(torch.float32).mul_(2).sub_(1)
        out = torch.zeros(count, width)
        for start in range(0, count, chunk_size):
            index = torch.arange(start, min(start + chunk_size, count))
            grads = per_example_gradients(task, model, params, take(inputs, index), targets[index], chunk_size)
            grads = grads.to(torch.float32)
            if size > dim:
                grads = torch.zeros(index.numel(), width).index_add_(1, buckets, grads * signs)
            out[index] = grads
        blocks.append(out)
    return torch.cat(blocks, dim=1).numpy()


def checkpoint_steps(num_steps: int, checkpoints: int) -> list[int]:
    """Steps ``0, T/K, 2T/K, ...`` (rounded, distinct) of a ``T``-step run after which to take ``K`` checkpoints."""
    return sorted({round(k * num_steps / checkpoints) for k in range(checkpoints)})


def checkpoint_states(task: Any, curriculum: np.ndarray | None, steps: Sequence[int]) -> Sequence[State]:
    """The model states after ``steps`` of ``curriculum`` ``[T, B]``, replayed with the task's trainer.

    ``[None]`` (the starting checkpoint, nothing to replay) when ``steps`` is ``[0]``.
    """
    if list(steps) == [0]:
        return [None]
    from simfluence.collect.train import train_states

    return train_states(task, curriculum, steps)


def check_features(features: Any, ids: np.ndarray, name: str, dims: int | None = None) -> np.ndarray:
    """float32 ``[len(ids), D]`` or a one-line :class:`RunDataError` naming ``name``."""
    array = np.asarray(features)
    if array.dtype.kind not in "fiu":
        raise RunDataError(name, "dtype", f"expected numbers, got {array.dtype}", "pass a float array [examples, D]")
    if array.ndim != 2 or array.shape[0] != ids.size or array.shape[1] == 0:
        raise RunDataError(name, "shape", f"expected [{ids.size}, D] (one row per id), got {array.shape}",
                           "give one feature row per example, in the order of the runs' ids")
    if dims is not None and array.shape[1] != dims:
        raise RunDataError(name, "shape", f"has {array.shape[1]} feature columns, the simulator was fitted on {dims}",
                           "compute the features the same way as for fitting")
    if not np.isfinite(array).all():
        raise RunDataError(name, "values", "contain NaN or inf", "replace or drop those examples")
    return array.astype(np.float32)


def given_features(train: Any, test: Any, train_ids: np.ndarray,
                   test_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The caller's ``train_features`` ``[N, D]`` and ``test_features`` ``[M, D']``, checked; ``None`` if neither.

    Both or neither: one without the other is a one-line :class:`RunDataError`.
    """
    if train is None and test is None:
        return None
    if train is None or test is None:
        missing = "train_features" if train is None else "test_features"
        raise RunDataError(missing, "value", "is missing", "pass both train_features and test_features, or neither")
    return check_features(train, train_ids, "train_features"), check_features(test, test_ids, "test_features")


def align_features(features: np.ndarray, feature_ids: np.ndarray, wanted: np.ndarray, name: str) -> np.ndarray:
    """Rows of ``features`` (one per ``feature_ids``) in the order of ``wanted``."""
    position = {key: row for row, key in enumerate(feature_ids.tolist())}
    missing = [key for key in wanted.tolist() if key not in position]
    if missing:
        raise RunDataError(name, "ids", f"{len(missing)} ids have no features, e.g. {missing[:3]}",
                           "use runs of the same task, or pass the features directly")
    return features[[position[key] for key in wanted.tolist()]]


def task_features(task: Any, split: str, ids: np.ndarray, sources: Sequence[str] = ("task",),
                  sketch_dim: int = 4096, seed: int = 0,
                  states: Sequence[State] = (None,)) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled features of the ``split`` examples ``ids`` from ``task``, one block per source.

    Args:
        task: the task, whose ``<split>_ids`` name its examples.
        split: ``"train"`` or ``"test"``.
        ids: str ``[n]``: the examples wanted, in this order.
        sources: some of :data:`SOURCES`, in the order their blocks are concatenated.
        sketch_dim: width of each checkpoint's gradient sketch (:func:`gradient_sketch`).
        seed: seed of the gradient sketch.
        states: checkpoints of the gradient features (:func:`checkpoint_states`).

    Returns:
        float32 ``[n, D]`` and int ``[J, 2]``, the column range of each source's block.
        A task without :meth:`~simfluence.tasks.Task.example_features` raises its
        ``NotImplementedError`` when ``"task"`` is asked for.
    """
    unknown = [source for source in sources if source not in SOURCES]
    if unknown or not sources:
        raise UsageError(f"sources must be some of {list(SOURCES)}, got {list(sources)}")
    blocks = [np.asarray(task.example_features(split)) if source == "task"
              else gradient_sketch(task, split, sketch_dim, seed, states=states) for source in sources]
    ends = np.cumsum([block.shape[1] for block in blocks])
    table = np.concatenate(blocks, axis=1).astype(np.float32)
    name = f"task '{task.name}' {split} features"
    features = check_features(align_features(table, getattr(task, f"{split}_ids"), ids, name), ids, name)
    return features, np.stack([ends - [block.shape[1] for block in blocks], ends], axis=1)


def block_scales(features: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """float64 ``[J]``: the root mean square of each block of ``features`` (at least ``1e-12``)."""
    return np.array([max(float(np.sqrt(np.mean(np.square(features[:, start:stop], dtype=np.float64)))), 1e-12)
                     for start, stop in blocks])


def scale_blocks(features: np.ndarray, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 copy of ``features`` with each block divided by its scale."""
    out = features.astype(np.float32, copy=True)
    for (start, stop), scale in zip(blocks, scales):
        out[:, start:stop] /= scale
    return out
