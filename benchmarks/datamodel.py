r"""Diagnosis: how much across-run ranking do the runs' final losses carry on their own?

A *datamodel* (Ilyas et al. 2022) of the final loss, fitted on the fitting runs of each split of
``benchmarks/splits.py``: per test example ``m``,

.. math::

    L_T^m(c) \approx w_0^m + \sum_i \phi_i(c)\, w_i^m,

with ``φ(c)`` per-example features of the curriculum (``counts``: occurrences; ``rates``:
occurrences weighted by their step's learning rate; ``blocks``: occurrences in each fifth of the
run), a ridge whose strength each test example chooses by exact leave-one-run-out error (hat
matrix of an unpenalised intercept plus the ridge, :func:`loo_ridge`). It uses the final losses
only, no trajectory and no gradients: what a simulator could learn of "which curriculum helps"
from the runs alone, at this number of runs. Prints across-run Spearman and final MSE as a ratio to
the fitting runs' mean final loss, per split and feature kind.

Usage::

    python benchmarks/datamodel.py RUNS --heldout 20 --seeds 0,1,2
"""

from __future__ import annotations

import numpy as np
from _common import benchmark_parser, write_json

from simfluence import load_runs
from simfluence.evaluate import spearman, split_runs
from simfluence.runs.log import PAD
from simfluence.tasks.schedules import run_learning_rates

FEATURES = ("counts", "rates", "blocks")
GRID = 10.0 ** np.arange(-3.0, 4.5, 0.5)
"""Ridge strengths as multiples of the mean squared norm of a run's centred features."""


def curriculum_features(curricula: np.ndarray, num_train: int, kind: str, rates: np.ndarray | None) -> np.ndarray:
    """float64 ``[R, F]``: the features ``φ`` of ``curricula`` ``[R, T, B]`` (``F = N``, or ``5 N`` for blocks)."""
    num_runs, num_steps = curricula.shape[:2]
    if kind == "counts" or (kind == "rates" and rates is None):
        weights = [np.ones(num_steps)]
    elif kind == "rates":
        weights = [rates / rates.mean()]
    else:
        block = np.minimum(np.arange(num_steps) * 5 // num_steps, 4)
        weights = [(block == b).astype(np.float64) for b in range(5)]
    out = []
    for step_weights in weights:
        features = np.zeros((num_runs, num_train))
        runs, steps, _ = np.nonzero(curricula != PAD)
        ids = curricula[curricula != PAD]
        np.add.at(features, (runs, ids), step_weights[steps])
        out.append(features)
    return np.concatenate(out, axis=1)


def loo_ridge(features: np.ndarray, targets: np.ndarray, new: np.ndarray,
              grid: np.ndarray = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Ridge with an unpenalised intercept, strength per target column chosen by exact leave-one-out.

    Args:
        features: ``[R, F]`` features of the fitting runs.
        targets: ``[R, M]`` their final losses.
        new: ``[R', F]`` features of the runs to predict.
        grid: candidate strengths, multiples of the mean squared norm of a centred feature row.

    Returns:
        predictions ``[R', M]`` at each column's chosen strength, and the leave-one-out MSE ``[M]``
        there. With centred features ``X`` and hat matrix ``H = 11^T / R + X (X^T X + λ)^{-1} X^T``,
        the leave-one-out residual is ``(y - H y) / (1 - H_ii)`` exactly.
    """
    mean_x, mean_y = features.mean(0), targets.mean(0)
    centred, y = features - mean_x, targets - mean_y
    kernel = centred @ centred.T
    values, vectors = np.linalg.eigh(kernel)
    values = np.clip(values, 0.0, None)
    scale = max(float(np.trace(kernel)) / len(kernel), 1e-300)
    best_error = np.full(targets.shape[1], np.inf)
    best = np.zeros((len(new), targets.shape[1]))
    for strength in grid * scale:
        shrink = values / (values + strength)
        hat = (vectors * shrink) @ vectors.T
        residual = (y - hat @ y) / (1.0 - np.diag(hat) - 1.0 / len(y))[:, None]
        error = (residual ** 2).mean(0)
        dual = (vectors / (values + strength)) @ (vectors.T @ y)          # (K + λ)^-1 y
        predicted = mean_y + (new - mean_x) @ (centred.T @ dual)
        better = error < best_error
        best_error[better], best[:, better] = error[better], predicted[:, better]
    return best, best_error


def main() -> None:
    """Fit and score the datamodels on every split; print one line per split and feature kind, then means."""
    parser = benchmark_parser(__doc__, seed=None)
    parser.add_argument("runs", help="a run store or interchange file (every step or the final step logged)")
    parser.add_argument("--heldout", type=int, default=20, help="held-out runs per split")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated split seeds")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    rates = run_learning_rates(runs.meta, runs.num_steps)     # None: the runs' meta has no schedule
    results: dict[str, list[dict]] = {kind: [] for kind in FEATURES}
    for seed in (int(part) for part in args.seeds.split(",")):
        fitting, heldout = split_runs(runs, args.heldout, seed)
        targets, truth = fitting.losses[:, -1].astype(np.float64), heldout.losses[:, -1].astype(np.float64)
        baseline = float(((targets.mean(0) - truth) ** 2).mean())
        for kind in FEATURES:
            predicted, _ = loo_ridge(curriculum_features(fitting.curricula, runs.num_train, kind, rates), targets,
                                     curriculum_features(heldout.curricula, runs.num_train, kind, rates))
            row = {"seed": seed, "across_run_spearman": float(np.nanmean(spearman(predicted, truth, axis=0))),
                   "final_mse_ratio": float(((predicted - truth) ** 2).mean()) / baseline}
            results[kind].append(row)
            print(f"split {seed}  {kind:<7} across-run Spearman {row['across_run_spearman']:.3f}  "
                  f"final MSE / mean {row['final_mse_ratio']:.3f}", flush=True)
    for kind, rows in results.items():
        print(f"mean     {kind:<7} across-run Spearman {np.mean([r['across_run_spearman'] for r in rows]):.3f}  "
              f"final MSE / mean {np.mean([r['final_mse_ratio'] for r in rows]):.3f}")
    write_json(args.json, {"runs": args.runs, "heldout": args.heldout, "results": results})


if __name__ == "__main__":
    main()
