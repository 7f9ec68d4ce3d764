r"""What the report shows, computed without any HTML: metrics, trajectories, influence.

**Influence** of training example ``i`` on test example ``m`` is the simulated
leave-one-out effect on the final loss, averaged over the held-out curricula that
contain ``i``:

.. math::

    I_{im} = \frac{1}{|R_i|} \sum_{r \in R_i} \big( L^{(r)}_{T,m}(c_r \setminus i) - L^{(r)}_{T,m}(c_r) \big)

where ``R_i`` is the set of held-out runs whose curriculum ``c_r`` holds ``i`` and
``c_r \setminus i`` drops all its occurrences (:func:`simfluence.query.leave_one_out`).
``I > 0``: the example helped (the loss is higher without it); ``I < 0``: it hurt. Units
are those of the loss (nats for cross-entropy). Examples in no held-out curriculum get NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simfluence.errors import UsageError
from simfluence.evaluate import Evaluation, evaluate
from simfluence.progress import progress_bar
from simfluence.query import leave_one_out, resolve_id
from simfluence.runs.log import RunSet
from simfluence.simulators.base import Simulator

DEFAULT_EXAMPLES = 4
DEFAULT_RUNS = 3
DEFAULT_TOP = 5
INTERVAL_LEVEL = 0.9


@dataclass(frozen=True)
class Ranked:
    """Training examples ranked for one test example: ``(train index, influence)`` pairs."""

    helpful: list[tuple[int, float]]
    harmful: list[tuple[int, float]]


@dataclass(frozen=True)
class ReportData:
    """Everything the report page shows.

    Attributes:
        evaluation: the simulator's and the baselines' metrics on the held-out runs.
        runs: the held-out runs.
        predicted: float32 ``[R, T + 1, M]`` simulated trajectories of every held-out run.
        examples: int ``[E]`` test examples shown in detail.
        shown_runs: int ``[P]`` held-out runs whose trajectories are plotted.
        influence: float64 ``[N, M]`` leave-one-out influence (module doc), NaN where undefined.
        influence_runs: int ``[N]`` held-out runs holding each training example.
        ranked: one :class:`Ranked` per entry of ``examples``.
        fit_info: the simulator's fit summary.
        interval: ``(lower, upper)`` float32 ``[R, T + 1, M]`` 90% prediction band, for
            simulators that give one (``simulate_interval``), else ``None``.
    """

    evaluation: Evaluation
    runs: RunSet
    predicted: np.ndarray
    examples: np.ndarray
    shown_runs: np.ndarray
    influence: np.ndarray
    influence_runs: np.ndarray
    ranked: list[Ranked]
    fit_info: dict
    interval: tuple[np.ndarray, np.ndarray] | None = None


def influence_matrix(simulator: Simulator, runs: RunSet, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out influence over ``runs``' curricula (module doc).

    Returns:
        ``(influence float64 [N, M], runs holding each example int [N])``; NaN rows for
        examples in none of the curricula.
    """
    total = np.zeros((simulator.train_ids.size, simulator.test_ids.size))
    count = np.zeros(simulator.train_ids.size, dtype=np.int64)
    for r in progress_bar(range(runs.num_runs), desc="influence", unit="run", enabled=progress):
        attribution = leave_one_out(simulator, runs.curricula[r], runs.initial_losses[r])
        total[attribution.train_index] += attribution.final_delta
        count[attribution.train_index] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], np.nan), count


def spread_over_difficulty(runs: RunSet, count: int) -> np.ndarray:
    """Int ``[count]`` test examples at evenly spaced quantiles of their mean final true loss, easiest first.

    The quantiles ``(2k + 1) / (2 count)`` skip the very easiest and hardest examples,
    which are often flat lines.
    """
    difficulty = runs.losses[:, -1].mean(axis=0)
    order = np.argsort(difficulty, kind="stable")
    count = min(count, order.size)
    positions = np.floor((2 * np.arange(count) + 1) / (2 * count) * order.size).astype(int)
    return order[positions]


def rank_training_examples(influence: np.ndarray, test_index: int, top: int) -> Ranked:
    """The ``top`` most helpful (largest positive influence) and harmful (most negative) examples."""
    column = influence[:, test_index]
    known = np.flatnonzero(np.isfinite(column))
    order = known[np.argsort(-column[known], kind="stable")]
    helpful = [(int(i), float(column[i])) for i in order[:top] if column[i] > 0]
    harmful = [(int(i), float(column[i])) for i in order[::-1][:top] if column[i] < 0]
    return Ranked(helpful, harmful)


def build_report_data(simulator: Simulator, heldout: RunSet, test_ids=None, num_examples: int = DEFAULT_EXAMPLES,
                      num_runs: int = DEFAULT_RUNS, top: int = DEFAULT_TOP, source: str = "<held-out runs>",
                      progress: bool = True) -> ReportData:
    """Compute the report's contents.

    Args:
        simulator: a fitted simulator.
        heldout: runs it was not fitted on, with the simulator's training and test ids (runs it
            was fitted on give a warning, and ``evaluation.fitting_runs`` counts them).
        test_ids: test examples to show in detail, by id (or index); default ``num_examples``
            of them spread over difficulty (:func:`spread_over_difficulty`).
        num_examples: how many test examples to show when ``test_ids`` is not given.
        num_runs: held-out runs whose trajectories are plotted (the first ones).
        top: helpful and harmful training examples listed per shown test example.
        source: names the held-out runs in messages.
        progress: progress bars (only on a terminal).
    """
    for name, value in (("num_examples", num_examples), ("num_runs", num_runs), ("top", top)):
        if int(value) != value or value < 1:
            raise UsageError(f"{name}: must be a positive integer, got {value!r}")
    if not isinstance(heldout, RunSet):
        raise TypeError(f"heldout: expected a RunSet, got {type(heldout).__name__}")
    if test_ids:
        examples = np.array([resolve_id(str(name), heldout.test_ids, "test_ids", "test") for name in test_ids])
    else:
        examples = spread_over_difficulty(heldout, num_examples)
    simulator.check_compatible(heldout, source)  # before simulating: the clearer error for other runs
    interval = None
    if simulator.capabilities.intervals:  # its prediction is simulate's; no second rollout
        lower, predicted, upper = simulator.simulate_interval(heldout.curricula, heldout.initial_losses,
                                                              INTERVAL_LEVEL)
        interval = (lower, upper)
    else:
        predicted = simulator.simulate(heldout.curricula, heldout.initial_losses)
    evaluation = evaluate(simulator, heldout, source, predicted)
    influence, influence_runs = influence_matrix(simulator, heldout, progress)
    return ReportData(evaluation, heldout, predicted, examples, np.arange(min(num_runs, heldout.num_runs)),
                      influence, influence_runs, [rank_training_examples(influence, m, top) for m in examples],
                      dict(simulator.fit_info), interval)
