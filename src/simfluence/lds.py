r"""The linear datamodeling score (LDS): does a method rank counterfactual training sets right?

Two protocols, both scored against real retraining of the task's model.

*Subset training* (TRAK, Park et al. 2023; dattri; kronfluence). Draw ``m`` subsets
:math:`S_1..S_m`, each a uniformly random fraction :math:`\alpha` of the training pool; train
each for real along a fresh random curriculum drawn from :math:`S_j` (same number of steps,
same sampler kind as the fitting runs) and record every test example's final loss
:math:`y_j(z)`. A method predicts :math:`\hat y_j(z)`:

* a simulator: its expected final loss when trained along random curricula from
  :math:`S_j`, rolled out from the real :math:`L_0` (the retrained curriculum is not shown to
  it): in closed form for the kinds that declare ``expected_rollout`` under the uniform
  sampler, else the mean over ``k`` further curricula drawn from :math:`S_j`;
* an additive score method with per-example loss effects :math:`s_i(z)` (negative helps):
  :math:`\sum_{i \in S_j} s_i(z)`, the libraries' own convention (metagradients: their
  per-example sums).

*Removal from a reference run* (MAGIC, Ilyas & Engstrom 2025). Fix one reference
curriculum ``[T, B]``; the ``j``-th counterfactual drops every occurrence of a random set
:math:`R_j` of training examples (a fraction of the pool, or one example), leaving the other
steps in place (a step left empty is skipped: no update, its place in the schedule kept).
A simulator simulates the edited curriculum; a score method predicts
:math:`-\sum_{i \in R_j} n_i\, s_i(z)` with :math:`n_i` the occurrences of :math:`i` in the
reference (an example that never occurs cannot matter); metagradients :math:`g_{t,b}(z)` predict
:math:`L_T(z) + \sum_{t,b} \Delta w_{t,b}\, g_{t,b}(z)` with the exact weight change of the
removal (a removed occurrence goes to 0 and, as retraining takes the mean of what is left of
its batch, the kept ones of that batch to :math:`n_t / (n_t - k_t)`).

For each test example :math:`z`, :math:`\mathrm{LDS}(z) = \mathrm{Spearman}_j(\hat y_j(z), y_j(z))`;
the score is the mean over test examples (NaN where either side is constant across ``j``,
left out of the mean), with a percentile bootstrap interval over test examples. The
retraining *noise ceiling* of the subset protocol: the same Spearman between two real
retrainings of every subset along two independent curricula (training is deterministic
given the curriculum, so the curriculum is the noise). The removal protocol keeps the
curriculum, so its ceiling is 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from simfluence.collect.curricula import derive_seed, pool_sampler
from simfluence.errors import UsageError
from simfluence.evaluate import spearman
from simfluence.runs.log import PAD
from simfluence.tasks.base import Task

SUBSETS = "subsets"


# --- metric -----------------------------------------------------------------------------
def lds_per_example(predicted, actual) -> np.ndarray:
    """float64 ``[M]``: per test example, Spearman across counterfactuals of ``[m, M]`` predictions vs truth.

    NaN where either column is constant (a method with no opinion on that example).
    """
    predicted, actual = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise UsageError(f"predicted {predicted.shape} and actual {actual.shape}: expected equal [m, M] shapes")
    if predicted.shape[0] < 3:
        raise UsageError(f"need at least 3 counterfactuals for a rank correlation, got {predicted.shape[0]}")
    return spearman(predicted, actual, axis=0).astype(np.float64)


@dataclass(frozen=True)
class Score:
    """Mean of per-example values with a percentile bootstrap interval over examples.

    Attributes:
        mean: mean over the finite values (NaN if none).
        low / high: the ``level`` bootstrap interval of the mean.
        count: finite values averaged; ``undefined``: NaN values left out.
    """

    mean: float
    low: float
    high: float
    count: int
    undefined: int

    def as_dict(self) -> dict:
        """The fields by name, non-finite floats as ``None`` (JSON-safe)."""
        return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                for key, value in self.__dict__.items()}


def bootstrap_mean(values, num_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Score:
    """:class:`Score` of ``values`` ``[M]`` (NaN entries left out), resampling examples with replacement."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Score(math.nan, math.nan, math.nan, 0, int(values.size))
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, finite.size, size=(int(num_resamples), finite.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Score(float(finite.mean()), float(low), float(high), int(finite.size), int(values.size - finite.size))


def paired_difference(first, second, num_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Score:
    """:class:`Score` of ``first - second`` (per-example values ``[M]`` of two methods on the same examples).

    The interval resamples test examples *together* for both methods, so it is much narrower
    than two separate intervals whenever the methods' per-example values move together (they
    do: some test examples are harder to rank for every method). An example where either value
    is NaN is left out.
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise UsageError(f"paired values must be two [M] arrays of one shape, got {first.shape} and {second.shape}")
    return bootstrap_mean(first - second, num_resamples, level, seed)


# --- counterfactual training sets ----------------------------------------------------
def draw_subsets(pool, num_train: int, num_subsets: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Bool ``[m, N]``: ``m`` uniformly random subsets of ``pool``, each ``round(fraction * |pool|)`` examples."""
    pool = np.unique(np.asarray(pool, dtype=np.int64))
    if not 0 < fraction < 1:
        raise UsageError(f"fraction: must lie strictly between 0 and 1, got {fraction!r}")
    if int(num_subsets) != num_subsets or num_subsets < 3:
        raise UsageError(f"num_subsets: must be an integer >= 3 (a rank correlation needs 3), got {num_subsets!r}")
    return draw_removals(pool, num_train, num_subsets, max(1, round(fraction * pool.size)), seed)


def subset_curricula(masks: np.ndarray, num_steps: int, batch_size: int, draws: int, seed: int,
                     kind: str = "uniform") -> np.ndarray:
    """int32 ``[m, draws, T, B]``: ``draws`` independent curricula from each subset ``masks[j]``.

    Curriculum ``d`` of subset ``j`` depends on ``(seed, j, d)`` alone, so asking for more
    draws keeps the first ones (and the retrained ground truth) unchanged.
    """
    out = np.empty((len(masks), draws, num_steps, batch_size), dtype=np.int32)
    for j, mask in enumerate(masks):
        sampler = pool_sampler(kind, np.flatnonzero(mask), batch_size)
        out[j] = sampler.sample_many(num_steps, [derive_seed(derive_seed(seed, j), d) for d in range(draws)])
    return out


def draw_removals(pool, num_train: int, num_sets: int, size: int, seed: int = 0) -> np.ndarray:
    """Bool ``[m, N]``: ``m`` random sets of ``size`` distinct examples from ``pool`` (to remove, or keep)."""
    pool = np.unique(np.asarray(pool, dtype=np.int64))
    if not 1 <= size <= pool.size:
        raise UsageError(f"removal size: must lie in 1..{pool.size} (the pool), got {size}")
    rng = np.random.default_rng(seed)
    masks = np.zeros((int(num_sets), num_train), dtype=bool)
    for j in range(int(num_sets)):
        masks[j, rng.choice(pool, size=size, replace=False)] = True
    return masks


def remove_occurrences(reference: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """int32 ``[m, T, B]``: ``reference`` ``[T, B]`` with every occurrence of ``removed[j]`` padded.

    ``removed`` is bool ``[m, N]``.
    """
    reference = np.asarray(reference)
    padded = np.clip(reference, 0, None)
    hit = removed[:, padded] & (reference != PAD)[None]               # [m, T, B]
    return np.where(hit, PAD, reference[None]).astype(np.int32)


# --- ground truth -------------------------------------------------------------------
@dataclass(frozen=True)
class Counterfactuals:
    """Counterfactual training sets of one protocol and their real final losses.

    Attributes:
        protocol: ``"subsets"`` or ``"removal-<size>"`` (examples removed per set).
        masks: bool ``[m, N]``: the subset (subsets) or the removed examples (removal).
        trained: int32 ``[m, T, B]``: the curricula trained for real.
        simulated: int32 ``[m, k, T, B]``: curricula a simulator averages over (subsets: fresh
            draws from the subset; removal: the trained curricula themselves, ``k = 1``).
        reference: int32 ``[T, B]`` reference curriculum (removal), else None.
        initial_losses: float64 ``[M]`` real losses before training.
        actual: float64 ``[m, M]`` real final losses.
        repeat: float64 ``[m, M]`` real final losses along a second independent curriculum per
            subset (the noise ceiling), or None.
        train_seconds: wall time of the retraining.
        trajectories: float32 ``[m, T + 1, M]`` real losses along ``trained`` at every step
            (for trajectory errors of simulators), or None.
        sampler: the sampler kind the subsets' curricula are drawn with (``"uniform"``: every
            slot independently from the subset), or None (removal: one fixed curriculum).
    """

    protocol: str
    masks: np.ndarray
    trained: np.ndarray
    simulated: np.ndarray
    reference: np.ndarray | None
    initial_losses: np.ndarray
    actual: np.ndarray
    repeat: np.ndarray | None
    train_seconds: float
    trajectories: np.ndarray | None = None
    sampler: str | None = None

    @property
    def num_sets(self) -> int:
        """Number of counterfactual sets ``m``."""
        return int(self.masks.shape[0])

    def ceiling(self) -> np.ndarray | None:
        """float64 ``[M]`` per-example noise ceiling (None when there is no repeat)."""
        return None if self.repeat is None else lds_per_example(self.repeat, self.actual)


RETRAIN_CACHE_FORMAT = 1
"""Part of the key of cached retrainings; raise it when retraining a curriculum would give other losses."""


def _retrain(task: Task, curricula: np.ndarray, progress: bool, workers: int = 1,
             cache: bool = False) -> tuple[np.ndarray, float]:
    """Real losses float64 ``[n, T + 1, M]`` along ``curricula`` ``[n, T, B]`` and the seconds the training took.

    With ``cache``, kept in the on-disk cache (:mod:`simfluence.cache`) under the task, its
    settings, the curricula themselves and the simfluence and torch versions: a retraining is a
    deterministic function of them, so a second ``simfluence lds`` with other methods reads the
    same counterfactuals back (and their original training seconds) instead of training again.
    """
    import hashlib

    import torch

    from simfluence.cache import cached_tensors, package_version
    from simfluence.retrain import retrain

    curricula = np.ascontiguousarray(curricula, dtype=np.int32)

    def compute() -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        losses = retrain(task, curricula, progress=progress, workers=workers).astype(np.float64)
        return {"losses": torch.from_numpy(losses),
                "seconds": torch.tensor(time.perf_counter() - start, dtype=torch.float64)}

    if cache:
        config = {"format": RETRAIN_CACHE_FORMAT, "task": task.name, "task_config": task.config(),
                  "curricula": hashlib.sha256(curricula.tobytes()).hexdigest(), "shape": list(curricula.shape),
                  "simfluence": package_version(), "torch": torch.__version__}
        entry = cached_tensors("retrained", config, compute)
    else:
        entry = compute()
    losses = entry["losses"].numpy().astype(np.float64)
    expected = (len(curricula), curricula.shape[1] + 1, task.num_test)
    if losses.shape != expected or not np.isfinite(losses).all():
        raise RuntimeError(f"retrained losses of shape {losses.shape} (expected {expected}) or not finite; with a "
                           "cached entry, delete the retrained-* files in the simfluence cache and retry")
    return losses, float(entry["seconds"])


def subset_counterfactuals(task: Task, num_steps: int, *, num_subsets: int = 50, fraction: float = 0.5,
                           draws: int = 16, repeat: bool = True, kind: str = "uniform", batch_size: int | None = None,
                           pool=None, seed: int = 0, progress: bool = False, workers: int = 1,
                           cache: bool = False) -> Counterfactuals:
    """The subset-training protocol: draw, retrain (twice with ``repeat``), and keep ``draws`` curricula to simulate.

    ``cache``: keep the retrained losses in the on-disk cache and reuse them (see :func:`_retrain`).
    """
    batch_size = task.batch_size if batch_size is None else int(batch_size)
    pool = task.default_pool() if pool is None else pool
    masks = draw_subsets(pool, task.num_train, num_subsets, fraction, seed)
    # One stream per subset: draw 0 (and 1 with repeat) are retrained, the rest simulated.
    extra = 2 if repeat else 1
    curricula = subset_curricula(masks, num_steps, batch_size, draws + extra, derive_seed(seed, 1), kind)
    losses, seconds = _retrain(task, curricula[:, :extra].reshape(-1, num_steps, batch_size), progress, workers,
                               cache)
    final = losses[:, -1].reshape(len(masks), extra, -1)
    trajectories = losses.reshape(len(masks), extra, *losses.shape[1:])[:, 0].astype(np.float32)
    return Counterfactuals(SUBSETS, masks, curricula[:, 0], curricula[:, extra:], None, losses[0, 0],
                           final[:, 0], final[:, 1] if repeat else None, seconds, trajectories, kind)


def removal_counterfactuals(task: Task, reference, size: int, *, num_sets: int = 50, pool=None, seed: int = 0,
                            progress: bool = False, workers: int = 1, cache: bool = False) -> Counterfactuals:
    """The removal protocol: ``num_sets`` random sets of ``size`` examples dropped from ``reference``, retrained.

    ``cache``: keep the retrained losses in the on-disk cache and reuse them (see :func:`_retrain`).
    """
    reference = np.asarray(reference, dtype=np.int32)
    if pool is None:  # examples the reference trains on: removing any other changes nothing
        pool = np.unique(reference[reference != PAD])
    masks = draw_removals(pool, task.num_train, num_sets, size, seed)
    trained = remove_occurrences(reference, masks)
    losses, seconds = _retrain(task, trained, progress, workers, cache)
    return Counterfactuals(f"removal-{size}", masks, trained, trained[:, None], reference, losses[0, 0],
                           losses[:, -1], None, seconds)


# --- methods ------------------------------------------------------------------------
@dataclass
class Method:
    """A method under test and what it cost.

    Attributes:
        name: how tables name it.
        family: ``"simulator"``, ``"scores"`` or ``"occurrences"``.
        training_runs: real training runs it consumed (fitting runs, models trained, the
            reference run replayed): the budget in training-run equivalents.
        seconds: its own compute (fitting, scoring), beyond those training runs.
    """

    name: str
    family: str
    training_runs: float = 0.0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def predict(self, counterfactuals: Counterfactuals) -> np.ndarray:
        """float64 ``[m, M]`` predicted final losses (or any monotone proxy) per counterfactual."""
        raise NotImplementedError


class SimulatorMethod(Method):
    """A fitted simulator: its expected final loss under each counterfactual's curricula.

    Subsets drawn by the uniform sampler, with a simulator whose expectation has a closed form or a
    control variate (``Simulator.expected_estimator``): ``Simulator.simulate_expected`` (the closed
    form is the limit of infinitely many drawn curricula; the control variate averages as many
    curricula as the counterfactual's ``simulated`` around its closed form in ``z``); otherwise the
    mean over the counterfactual's ``simulated`` curricula.
    """

    def __init__(self, name: str, simulator, training_runs: float, seconds: float):
        super().__init__(name, "simulator", training_runs, seconds)
        self.simulator = simulator

    def predict(self, counterfactuals: Counterfactuals) -> np.ndarray:
        """Expected simulated final losses ``[m, M]`` of each set."""
        from simfluence.query import simulate_curricula

        curricula = counterfactuals.simulated                        # [m, k, T, B]
        m, k = curricula.shape[:2]
        if counterfactuals.sampler == "uniform" and self.simulator.expected_estimator != "sampled":
            num_steps, batch_size = counterfactuals.trained.shape[1:]
            expected = self.simulator.simulate_expected(counterfactuals.masks, num_steps,
                                                        counterfactuals.initial_losses, batch_size=batch_size, draws=k)
            return expected[:, -1].astype(np.float64)
        final = simulate_curricula(self.simulator, curricula.reshape(m * k, *curricula.shape[2:]),
                                   counterfactuals.initial_losses)[:, -1]
        return final.reshape(m, k, -1).astype(np.float64).mean(axis=1)


class ScoreMethod(Method):
    """Per-example loss effects ``scores`` ``[N, M]`` (negative: training on ``i`` lowers loss ``m``)."""

    def __init__(self, name: str, scores, training_runs: float, seconds: float, info: dict | None = None):
        super().__init__(name, "scores", training_runs, seconds, dict(info or {}))
        self.scores = np.asarray(scores, dtype=np.float64)

    def predict(self, counterfactuals: Counterfactuals) -> np.ndarray:
        """Summed scores of each set's examples (removals: minus their occurrences' scores)."""
        masks = counterfactuals.masks.astype(np.float64)
        if counterfactuals.reference is None:
            return masks @ self.scores
        reference = counterfactuals.reference
        counts = np.bincount(reference[reference != PAD], minlength=masks.shape[1]).astype(np.float64)
        return -(masks * counts) @ self.scores


class OccurrenceMethod(Method):
    """Metagradients of the reference run (:class:`~simfluence.func.metagradients.MetagradientResult`).

    Removal: the first-order change of the final losses under the exact weight change a
    removal means (removed occurrences to 0, the rest of each batch re-weighted to its mean,
    :meth:`~simfluence.func.metagradients.MetagradientResult.removal_weights`). Subsets:
    per-example sums (occurrences pooled), added up over the subset like a score method.
    """

    def __init__(self, name: str, result, training_runs: float, seconds: float):
        super().__init__(name, "occurrences", training_runs, seconds)
        self.result = result

    def predict(self, counterfactuals: Counterfactuals) -> np.ndarray:
        """First-order final losses ``[m, M]`` from the metagradients (see the class docstring)."""
        masks = counterfactuals.masks
        if counterfactuals.reference is None:
            return masks.astype(np.float64) @ self.result.per_example(masks.shape[1])
        if not np.array_equal(counterfactuals.reference, self.result.curriculum):
            raise UsageError(f"{self.name}: its metagradients are of another reference curriculum than the "
                             "removal protocol's")
        return self.result.predict_removals([np.flatnonzero(mask) for mask in masks])


def score_method(method: Method, counterfactuals: Counterfactuals, num_resamples: int = 1000,
                 seed: int = 0) -> dict:
    """LDS record of ``method`` on one protocol: score with interval, per-example values, prediction time."""
    start = time.perf_counter()
    predicted = method.predict(counterfactuals)
    seconds = time.perf_counter() - start
    if not np.isfinite(predicted).all():
        raise UsageError(f"{method.name}: predicted non-finite values on {counterfactuals.protocol}")
    per_example = lds_per_example(predicted, counterfactuals.actual)
    record = {"method": method.name, "protocol": counterfactuals.protocol,
              **bootstrap_mean(per_example, num_resamples, seed=seed).as_dict(),
              "predict_seconds": seconds, "per_example": [None if not math.isfinite(v) else v for v in per_example]}
    if method.family == "simulator":
        record["final_mse"] = float(np.mean((predicted - counterfactuals.actual) ** 2))
    return record
