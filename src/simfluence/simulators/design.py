"""The batch-indicator design matrix of a set of training steps, as a sparse operator.

For steps ``s = 1..S`` with batches ``c_s``, the count matrix ``X`` of shape ``[S, N]`` has
``X[s, i]`` = number of times training example ``i`` is in batch ``c_s`` (usually 0 or 1).
Every simulator of the Simfluence family reads its per-step coefficients as ``X @ table``:
``alpha(c_s) = sum_{i in c_s} A_i = (X @ A)[s]``. Products run through
``torch.nn.functional.embedding_bag`` (sum mode), which gathers and adds table rows without
materialising ``X`` and runs on any torch device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.functional import embedding_bag

from simfluence.runs.log import PAD


class BatchDesign:
    """Sparse ``X [S, N]`` built from batches ``[S, B]`` of indices (``-1`` pads).

    Args:
        batches: int ``[S, B]`` training-example indices per step: an array, or a torch
            tensor on any device (never converted through NumPy).
        num_train: ``N``, the number of training examples.
        device: torch device for all products.
        batch_size: with a batch size ``n``, a step of ``k`` examples weighs each ``n / k``
            (``X[s, i]`` = count x ``n / k``): under a batch-mean loss, the examples left in a
            batch that lost some move the model as much as the full batch did. ``None``: plain
            counts (a sum over the batch).
    """

    def __init__(self, batches: np.ndarray | torch.Tensor, num_train: int, device: str | torch.device = "cpu",
                 batch_size: int | None = None):
        if isinstance(batches, torch.Tensor):
            # Stays on its own device (a CUDA tensor has no NumPy view); indices are built there.
            batches = batches.detach().to(torch.int64)
        else:
            batches = torch.as_tensor(np.asarray(batches), dtype=torch.int64)
        if batches.ndim != 2:
            raise ValueError(f"batches must be [steps, batch], got shape {tuple(batches.shape)}")
        self.num_steps, self.num_train = int(batches.shape[0]), int(num_train)
        self.device = torch.device(device)
        # Unique (step, example) pairs with their multiplicity: duplicates in one batch count twice.
        valid = batches != PAD
        steps = torch.arange(self.num_steps, device=batches.device).unsqueeze(1).expand_as(batches)[valid]
        examples = batches[valid]
        keys, counts = torch.unique(steps * self.num_train + examples, return_counts=True)
        rows, cols = keys // self.num_train, keys % self.num_train
        counts = counts.to(torch.float64)
        if batch_size is not None:
            sizes = valid.sum(dim=1).to(torch.float64)          # [S]: examples in each step
            counts = counts * (float(batch_size) / sizes[rows].clamp_min(1.0))
        # Row-major (by step) for X @ W, column-major (by example) for X^T @ G.
        self._row_cols = cols.to(self.device)
        self._row_offsets = _offsets(rows, self.num_steps).to(self.device)
        self._row_counts = counts.to(self.device)
        order = torch.argsort(cols, stable=True)
        self._col_rows = rows[order].to(self.device)
        self._col_offsets = _offsets(cols[order], self.num_train).to(self.device)
        self._col_counts = counts[order].to(self.device)
        self.occurrences = torch.bincount(cols, weights=counts, minlength=self.num_train).cpu()
        """float64 ``[N]`` on the CPU: how many times each example was trained on (weighted as ``X``)."""

    @property
    def nnz(self) -> int:
        """Number of distinct (step, example) pairs: the stored entries of the design matrix."""
        return int(self._row_cols.numel())

    def matmul(self, table: torch.Tensor) -> torch.Tensor:
        """``X @ table``: ``[N, K] -> [S, K]``, the per-step sums of table rows."""
        weights = self._row_counts.to(table.dtype)
        return embedding_bag(self._row_cols, table, self._row_offsets, mode="sum", per_sample_weights=weights)

    def rmatmul(self, values: torch.Tensor, squared: bool = False) -> torch.Tensor:
        """``X^T @ values``: ``[S, K] -> [N, K]``; with ``squared``, ``(X * X)^T @ values``."""
        weights = self._col_counts.to(values.dtype)
        if squared:
            weights = weights * weights
        return embedding_bag(self._col_rows, values, self._col_offsets, mode="sum", per_sample_weights=weights)


def _offsets(sorted_keys: torch.Tensor, num_bags: int) -> torch.Tensor:
    """Start of each bag in a key-sorted list; empty bags get the next start (sum = 0)."""
    counts = torch.bincount(sorted_keys, minlength=num_bags)
    return torch.cumsum(counts, 0) - counts
