"""Scoring simulators on held-out runs, always beside the trivial baselines.

Predictions are rolled out from each held-out run's true ``L_0`` and compared at the
recorded steps after 0. With ``P`` and ``L`` of shape ``[R, K, M]`` (runs, recorded steps,
test examples) and ``K - 1`` the final recorded step:

* ``mse`` / ``mae``: mean over runs, test examples and recorded steps ``>= 1`` of
  ``(P - L)^2`` / ``|P - L|``;
* ``final_mse``: the same at the final step only;
* ``final_spearman``: per run, Spearman correlation across test examples of ``P`` vs ``L``
  at the final step, averaged over runs (mostly measures example difficulty);
* ``across_run_spearman``: per test example, Spearman correlation across runs of ``P`` vs
  ``L`` at the final step, averaged over test examples: does the simulator know which
  curriculum helps this example? Undefined (NaN) for predictions that do not vary across
  runs, such as the baselines'.

Every metric is also kept per test example (``[M]``).

Held-out runs that the simulator was fitted on (recognised by their digest,
:func:`simfluence.simulators.base.run_digests`) are not held out: :func:`evaluate` warns
(:class:`UserWarning`) and says so in the table.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

from simfluence.errors import UsageError
from simfluence.runs.log import RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.baselines import mean_trajectory

METRICS = ("mse", "mae", "final_mse", "final_spearman", "across_run_spearman")


def spearman(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    """Spearman correlation of ``x`` and ``y`` along ``axis`` (NaN where either is constant)."""
    rx, ry = rankdata(x, axis=axis), rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=axis) / np.where(denominator > 0, denominator, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


@dataclass
class Metrics:
    """Summary metrics (floats; NaN where undefined) and their per-test-example arrays ``[M]``."""

    mse: float
    mae: float
    final_mse: float
    final_spearman: float
    across_run_spearman: float
    per_example: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def as_dict(self) -> dict[str, float | None]:
        """The metrics by name, non-finite values as ``None`` (JSON-safe)."""
        return {name: _json_float(getattr(self, name)) for name in METRICS}


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def score(predicted: np.ndarray, runs: RunSet) -> Metrics:
    """Metrics of ``predicted`` ``[R, T + 1, M]`` trajectories against ``runs``' recorded losses."""
    if predicted.shape[:1] + predicted.shape[2:] != (runs.num_runs, runs.num_test) or \
            predicted.shape[1] != runs.num_steps + 1:
        raise UsageError(f"predictions of shape {predicted.shape} do not match {runs!r}")
    if runs.eval_steps.size < 2:
        raise UsageError("held-out runs need losses recorded after at least one step")
    pred = predicted[:, runs.eval_steps[1:]].astype(np.float64)
    true = runs.losses[:, 1:].astype(np.float64)
    error = pred - true
    per_example = {
        "mse": (error**2).mean(axis=(0, 1)),
        "mae": np.abs(error).mean(axis=(0, 1)),
        "final_mse": (error[:, -1] ** 2).mean(axis=0),
        "across_run_spearman": spearman(pred[:, -1], true[:, -1], axis=0) if runs.num_runs >= 3
        else np.full(runs.num_test, np.nan),
    }
    per_run_final_spearman = spearman(pred[:, -1], true[:, -1], axis=1) if runs.num_test >= 3 \
        else np.full(runs.num_runs, np.nan)
    return Metrics(
        mse=float(per_example["mse"].mean()),
        mae=float(per_example["mae"].mean()),
        final_mse=float(per_example["final_mse"].mean()),
        final_spearman=_nanmean(per_run_final_spearman),
        across_run_spearman=_nanmean(per_example["across_run_spearman"]),
        per_example=per_example,
    )


@dataclass
class Evaluation:
    """Metrics of one simulator and of the baselines on the same held-out runs.

    ``fitting_runs``: how many of the held-out runs the simulator was fitted on (0 when none,
    ``None`` when unknown: a simulator saved without the digests of its fitting runs).
    """

    method: str
    metrics: Metrics
    baselines: dict[str, Metrics]
    num_runs: int
    num_steps: int
    num_test: int
    fitting_runs: int | None = None
    extrapolation: tuple[str, ...] = ()
    """How the held-out runs go beyond the fitting runs (:meth:`Simulator.extrapolation`); empty if not."""

    def fitting_runs_note(self) -> str | None:
        """One line saying how many held-out runs were also fitting runs, or ``None`` when none were."""
        if not self.fitting_runs:
            return None
        return (f"{self.fitting_runs} of {self.num_runs} held-out runs were also fitting runs of this simulator: "
                "these metrics are not held-out (evaluate on runs it was not fitted on)")

    def as_dict(self) -> dict:
        """The evaluation as a flat JSON-safe dict; baseline metrics prefixed ``baseline_<name>_``."""
        out = {"method": self.method, "num_runs": self.num_runs, "num_steps": self.num_steps,
               "num_test": self.num_test, "heldout_fitting_runs": self.fitting_runs,
               "extrapolation": list(self.extrapolation), **self.metrics.as_dict()}
        for name, metrics in self.baselines.items():
            prefix = "baseline_" + name.replace("-", "_")
            out.update({f"{prefix}_{key}": value for key, value in metrics.as_dict().items()})
        return out

    def table(self) -> str:
        """A plain-text table: one row per method, baselines below."""
        rows = [(self.method, self.metrics)] + [(f"{name} (baseline)", m) for name, m in self.baselines.items()]
        header = ["method", "all-steps MSE", "MAE", "final MSE", "final Spearman", "across-run Spearman"]
        body = [[name, *(_fmt(getattr(m, key)) for key in METRICS)] for name, m in rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        baseline = self.baselines.get("mean-trajectory")
        if baseline is not None and self.metrics.mse > 0 and math.isfinite(self.metrics.mse):
            ratio = baseline.mse / self.metrics.mse
            verdict = f"{ratio:.2f}x lower than" if ratio >= 1 else \
                ("higher than" if ratio == 0 else f"{1 / ratio:.2f}x higher than")
            lines.append(f"\nall-steps MSE: {verdict} the mean trajectory's "
                         f"({self.num_runs} held-out runs, {self.num_steps} steps, {self.num_test} test examples)")
        note = self.fitting_runs_note()
        if note:
            lines.append(f"\nWARNING: {note}")
        for problem in self.extrapolation:
            lines.append(f"\nWARNING: extrapolating: {problem}")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4g}"


def evaluate(simulator: Simulator, heldout: RunSet, source: str = "<held-out runs>",
             predicted: np.ndarray | None = None) -> Evaluation:
    """Score ``simulator`` on ``heldout`` runs, with the mean-trajectory and constant baselines.

    ``predicted``: the simulator's ``[R, T + 1, M]`` trajectories of these runs when the caller
    already has them (they are simulated otherwise). Held-out runs that the simulator was
    fitted on give a :class:`UserWarning` and a line in :meth:`Evaluation.table`.
    """
    simulator.check_compatible(heldout, source)
    fitting_runs = simulator.fitting_runs_among(heldout)
    initial = heldout.initial_losses.astype(np.float64)
    expected = (heldout.num_runs, heldout.num_steps + 1, heldout.num_test)
    if predicted is None:
        predicted = simulator.simulate(heldout.curricula, initial, source)
    elif np.shape(predicted) != expected:
        raise UsageError(f"predicted: shape {np.shape(predicted)} does not match the held-out runs {expected}")
    constant = np.repeat(initial[:, None], heldout.num_steps + 1, axis=1)
    baselines = {
        "mean-trajectory": score(mean_trajectory(simulator.mean_change, initial, heldout.num_steps), heldout),
        "constant": score(constant, heldout),
    }
    evaluation = Evaluation(simulator.kind, score(predicted, heldout), baselines, heldout.num_runs,
                            heldout.num_steps, heldout.num_test, fitting_runs,
                            tuple(simulator.extrapolation(heldout.curricula, initial)))
    note = evaluation.fitting_runs_note()
    if note:
        warnings.warn(f"{source}: {note}", UserWarning, stacklevel=2)
    return evaluation


def split_runs(runs: RunSet, num_heldout: int, seed: int = 0) -> tuple[RunSet, RunSet]:
    """Random split into (fitting runs, ``num_heldout`` held-out runs)."""
    if not 0 < num_heldout < runs.num_runs:
        raise UsageError(f"num_heldout: must be between 1 and {runs.num_runs - 1} for {runs.num_runs} runs, "
                         f"got {num_heldout}")
    order = np.random.default_rng(seed).permutation(runs.num_runs)
    return runs.select(np.sort(order[num_heldout:])), runs.select(np.sort(order[:num_heldout]))
