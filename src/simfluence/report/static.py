"""Static PNG plots of counterfactual queries, for the command line's ``--plot`` options.

Each function draws one figure with matplotlib's non-interactive Agg backend and writes
it atomically to ``path``; losses are in the task's units, steps count from 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from simfluence.query import InfluenceOverTime, OptimizedCurriculum, WhatIf
from simfluence.runs.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    _pyplot().close(fig)
    return path


def plot_whatif(result: WhatIf, test_ids: np.ndarray, path: str | os.PathLike, max_panels: int = 6) -> Path:
    """Before/after trajectories, one panel per test example (those whose final loss moves most first).

    ``test_ids`` are the model's test ids (indexed by ``result.test_index``).
    """
    plt = _pyplot()
    columns = np.argsort(-np.abs(result.final_change), kind="stable")[:max_panels]
    per_row = min(3, len(columns))
    num_rows = -(-len(columns) // per_row)
    fig, axes = plt.subplots(num_rows, per_row, figsize=(3.8 * per_row, 0.4 + 2.9 * num_rows), squeeze=False)
    for ax in axes.ravel()[len(columns):]:
        ax.set_visible(False)
    steps = np.arange(result.before.shape[0])
    for ax, column in zip(axes.ravel(), columns):
        ax.plot(steps, result.before[:, column], color="0.3", label="before")
        ax.plot(steps, result.after[:, column], color="tab:red", label="after")
        ax.set_title(f"{test_ids[result.test_index[column]]}  (final {result.final_change[column]:+.3g})", fontsize=8)
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("simulated test loss")
    axes[0][0].legend(fontsize=7)
    edits = ", ".join(str(edit) for edit in result.edits)
    fig.suptitle(f"what if: {edits[:120]}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_influence_over_time(result: InfluenceOverTime, train_ids: np.ndarray, path: str | os.PathLike,
                             column: int | None = None, max_examples: int = 40) -> Path:
    """Heat map (training examples x steps) of the final-loss effect of each occurrence.

    Red: removing that occurrence would raise the final loss (it helped); blue: it hurt;
    blank: the example is not in that step's batch. Rows are the ``max_examples`` examples
    with the largest total absolute effect.
    """
    plt = _pyplot()
    train_index, matrix = result.matrix(column)
    strength = np.nansum(np.abs(matrix), axis=1)
    rows = np.sort(np.argsort(-strength, kind="stable")[:max_examples])
    shown = matrix[rows]
    limit = float(np.nanmax(np.abs(shown))) if np.isfinite(shown).any() else 1.0
    height = 1.5 + 0.16 * len(rows)
    fig, ax = plt.subplots(figsize=(min(14.0, 3 + 0.06 * matrix.shape[1]), height))
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                      interpolation="nearest", extent=(0.5, matrix.shape[1] + 0.5, len(rows) - 0.5, -0.5))
    ax.set_yticks(np.arange(len(rows)))
    ax.set_yticklabels([str(train_ids[i]) for i in train_index[rows]], fontsize=6)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, label="final loss without - with")
    ax.set_title("influence over time (positive: the occurrence helped)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_optimized(result: OptimizedCurriculum, path: str | os.PathLike) -> Path:
    """Histogram of the random curricula's simulated objective, with the optimised one marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(result.random_objectives, bins=30, color="0.7", label=f"{result.random_objectives.size} random")
    ax.axvline(result.random_median, color="0.3", linestyle="--", label="random median")
    ax.axvline(result.objective, color="tab:red", label="optimised")
    ax.set_xlabel("simulated mean final loss on the targets")
    ax.set_ylabel("curricula")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
