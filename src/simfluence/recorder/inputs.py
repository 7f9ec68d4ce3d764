"""Nested model inputs: a tensor, a dict or a tuple of tensors with the examples along dim 0.

Map a function over every tensor of such inputs, count their rows (examples) and slice rows,
for a :class:`~simfluence.recorder.Recorder` preparing and moving its test batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from simfluence.errors import UsageError

Inputs = torch.Tensor | Mapping[str, Any] | Sequence[Any]
"""Model inputs: a tensor, a dict of tensors or a tuple of tensors, examples along dim 0."""


def map_tensors(inputs: Any, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> Any:
    """``inputs`` with ``fn`` applied to each tensor (NumPy arrays become tensors first); ``name`` is for errors."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, np.ndarray):
        return fn(torch.from_numpy(inputs))
    if isinstance(inputs, Mapping):
        return {key: map_tensors(value, fn, f"{name}[{key!r}]") for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(value, fn, f"{name}[{i}]") for i, value in enumerate(inputs))
    raise TypeError(f"{name}: expected a tensor, a dict or a tuple of tensors, got {type(inputs).__name__}")


def num_rows(inputs: Any, name: str) -> int:
    """The number of examples (rows) of ``inputs``; a ``ValueError`` if its tensors disagree."""
    sizes: set[int] = set()

    def note_rows(tensor: torch.Tensor) -> torch.Tensor:
        sizes.add(int(tensor.shape[0]))
        return tensor

    map_tensors(inputs, note_rows, name)
    if len(sizes) != 1:
        raise UsageError(f"{name}: tensors disagree on the number of examples {sorted(sizes)}; "
                         "give every tensor one row per test example")
    return sizes.pop()


def row_slicer(rows: slice | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that takes ``rows`` (a slice, or indices moved to the tensor's device) of a tensor."""
    if isinstance(rows, slice):
        return lambda tensor: tensor[rows]
    return lambda tensor: tensor[rows.to(tensor.device)]

