"""Static PNG plots of counterfactual queries, for the command line's ``--plot`` options.

Each function draws one figure with matplotlib's non-interactive Agg backend and writes
it atomically to ``path``; losses are in the task's units, steps count from 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from simfluence.query import InfluenceOverTime, OptimizedCurriculum, WhatIf
from simfluence.report.style import EFFECT_COLORMAP
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


def plot_whatif(result: WhatIf, test_ids: np.ndarray, path: str | os.PathLike, columns=None,
                train_ids: np.ndarray | None = None, max_panels: int = 6) -> Path:
    """Write :func:`whatif_figure` as a PNG to ``path``."""
    return _save(whatif_figure(result, test_ids, columns, train_ids, max_panels), path)


def whatif_figure(result: WhatIf, test_ids: np.ndarray, columns=None, train_ids: np.ndarray | None = None,
                  max_panels: int = 6):
    """Before/after trajectories, one panel per test example (a matplotlib figure).

    Args:
        result: the what-if query.
        test_ids: the model's test ids (indexed by ``result.test_index``); titles use them.
        columns: positions in ``result.test_index`` to draw, in order (what the command line
            printed); default the ``max_panels`` whose final loss moves most.
        train_ids: the model's training ids, to name the edited examples by id in the title.
        max_panels: at most this many panels when ``columns`` is not given.
    """
    plt = _pyplot()
    if columns is None:
        columns = np.argsort(-np.abs(result.final_change), kind="stable")[:max_panels]
    columns = np.asarray(columns)
    per_row = min(3, len(columns))
    num_rows = -(-len(columns) // per_row)
    fig, axes = plt.subplots(num_rows, per_row, figsize=(3.8 * per_row, 0.9 + 2.9 * num_rows), squeeze=False)
    for ax in axes.ravel()[len(columns):]:
        ax.set_visible(False)
    steps = np.arange(result.before.shape[0])
    for ax, column in zip(axes.ravel(), columns):
        ax.plot(steps, result.before[:, column], color="0.3", label="before")
        ax.plot(steps, result.after[:, column], color="tab:orange", label="after")
        ax.set_title(f"{test_ids[result.test_index[column]]}  (final {result.final_change[column]:+.3g})", fontsize=8)
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("simulated test loss")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower right", ncol=2, frameon=False)
    edits = ", ".join(edit.describe(train_ids) for edit in result.edits)
    fig.suptitle(f"what if: {edits[:120]}", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def plot_influence_over_time(result: InfluenceOverTime, train_ids: np.ndarray, path: str | os.PathLike,
                             column: int | None = None, max_examples: int = 40) -> Path:
    """Write :func:`influence_over_time_figure` as a PNG to ``path``."""
    return _save(influence_over_time_figure(result, train_ids, column, max_examples), path)


def influence_over_time_figure(result: InfluenceOverTime, train_ids: np.ndarray, column: int | None = None,
                               max_examples: int = 40):
    """Heat map (training examples x steps) of the final-loss effect of each occurrence.

    Blue: removing that occurrence would raise the final loss (it helped); red: it hurt
    (:mod:`simfluence.report.style`); blank: the example is not in that step's batch. Rows are the ``max_examples``
    examples with the largest total absolute effect.
    """
    plt = _pyplot()
    train_index, matrix = result.matrix(column)
    strength = np.nansum(np.abs(matrix), axis=1)
    rows = np.sort(np.argsort(-strength, kind="stable")[:max_examples])
    shown = matrix[rows]
    limit = float(np.nanmax(np.abs(shown))) if np.isfinite(shown).any() else 1.0
    height = 1.5 + 0.16 * len(rows)
    fig, ax = plt.subplots(figsize=(min(14.0, 3 + 0.06 * matrix.shape[1]), height))
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap=EFFECT_COLORMAP, vmin=-limit, vmax=limit,
                      interpolation="nearest", extent=(0.5, matrix.shape[1] + 0.5, len(rows) - 0.5, -0.5))
    ax.set_yticks(np.arange(len(rows)))
    ax.set_yticklabels([str(train_ids[i]) for i in train_index[rows]], fontsize=6)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, label="final loss without - with")
    ax.set_title("influence over time (blue: the occurrence helped; red: it hurt)", fontsize=9)
    fig.tight_layout()
    return fig


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
