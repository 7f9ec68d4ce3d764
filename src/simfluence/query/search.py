r"""Curriculum search: the curriculum of a given budget that minimises the simulated loss on a target set.

The objective is the mean final loss :math:`\frac1{M'} \sum_{m \in \text{targets}} L_T^m`. A
candidate is an ordered list of ``K`` distinct training examples, cycled epoch after epoch into
an int32 ``[T, B]`` curriculum (:func:`epoch_curricula`); every set of candidates is scored in
one vectorised rollout (:mod:`simfluence.query.rollout`). :func:`optimize` grows lists by beam
search, improves the best by local search, and scores random curricula of the same budget and
layout as the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simfluence.errors import UsageError
from simfluence.progress import progress_bar
from simfluence.query.rollout import _check_initial, _rollouts, check_test_index
from simfluence.simulators.base import Simulator


def epoch_curricula(orders: np.ndarray, num_steps: int, batch_size: int) -> np.ndarray:
    """int32 ``[R, T, B]``: each row of ``orders`` ``[R, K]`` repeated in that order, epoch after epoch.

    Cut into ``T`` batches of ``B`` (the last epoch is cut short when ``K`` does not divide
    ``T * B``).
    """
    orders = np.asarray(orders)
    slots = np.arange(num_steps * batch_size) % orders.shape[1]
    return orders[:, slots].reshape(len(orders), num_steps, batch_size).astype(np.int32)


@dataclass(frozen=True)
class OptimizedCurriculum:
    """Result of :func:`optimize`.

    Attributes:
        curriculum: int32 ``[T, B]`` the best curriculum found (``order`` cycled in epochs).
        order: int ``[K]`` its distinct training examples, in training order.
        objective: simulated mean final loss over the targets of ``curriculum``.
        target_index: int ``[M']`` the target test examples.
        random_objectives: float64 ``[R]`` the same objective for random curricula of the same
            budget (``R`` random ``K``-subsets of the pool in random order, same layout).
        random_curricula: int32 ``[R, T, B]`` those random curricula.
        history: best objective after each growth stage, then after each local-search round.
    """

    curriculum: np.ndarray
    order: np.ndarray
    objective: float
    target_index: np.ndarray
    random_objectives: np.ndarray
    random_curricula: np.ndarray
    history: tuple[float, ...] = field(default=())

    @property
    def random_median(self) -> float:
        """Median objective of the random curricula."""
        return float(np.median(self.random_objectives))

    @property
    def random_best(self) -> float:
        """Best (lowest) objective of the random curricula."""
        return float(self.random_objectives.min())


def optimize(simulator: Simulator, initial_losses, target_test_index, budget: int, num_steps: int,
             batch_size: int | None = None, *, pool=None, beam_width: int = 4, rounds: int = 20,
             num_random: int = 200, seed: int = 0, progress: bool = False) -> OptimizedCurriculum:
    r"""Search for the curriculum of ``budget`` distinct examples that minimises the simulated loss.

    The objective is the mean final loss :math:`\frac1{M'} \sum_{m \in \text{targets}} L_T^m`.

    A candidate is an ordered list of ``K = budget`` distinct training examples, trained in
    that order epoch after epoch, ``batch_size`` per step for ``num_steps`` steps
    (:func:`epoch_curricula`). The search, every candidate set scored in one vectorised rollout:

    1. *Beam growth*: start from the empty list; at each of ``K`` stages extend each of the
       ``beam_width`` best lists by every pool example not yet in it (appended last, the list
       cycled to fill all ``T * B`` slots) and keep the ``beam_width`` best distinct sets.
       ``beam_width=1`` is greedy forward selection.
    2. *Local search*: from the best list, try every one-example replacement (a member for a
       non-member, same position) and every swap of two positions; take the best neighbour
       while it lowers the objective, for at most ``rounds`` rounds.

    Random curricula of the same budget and layout are scored as the baseline.

    The search seeks out whatever the simulator predicts to be best, including its
    extrapolation: a small budget repeats each example far more often than the random
    fitting runs did, and a linear simulator may then predict losses training cannot reach
    (even below 0 for cross-entropy). Rank, not the simulated value, is what to trust;
    :func:`simfluence.retrain.compare_with_retraining` checks the curriculum for real.

    Args:
        simulator: any fitted simulator.
        initial_losses: float ``[M]`` losses before training.
        target_test_index: int ``[M']`` the test examples to minimise the mean final loss of.
        budget: ``K`` distinct training examples, at most ``num_steps * batch_size`` and the pool size.
        num_steps: ``T``.
        batch_size: ``B`` (default: the fitting runs' batch size).
        pool: int candidate training indices (default all).
        beam_width: lists kept per growth stage.
        rounds: at most this many local-search rounds.
        num_random: random curricula for the baseline.
        seed: seed of the random curricula.
        progress: a progress bar over the search (only on a terminal).
    """
    simulator._check_fitted()
    initial = _check_initial(simulator, initial_losses)
    targets = check_test_index(simulator, target_test_index)
    batch_size = int(batch_size or simulator.fit_info.get("batch_size", 0))
    pool = np.arange(simulator.train_ids.size) if pool is None else np.unique(np.asarray(pool, dtype=np.int64))
    if pool.size == 0 or pool.min() < 0 or pool.max() >= simulator.train_ids.size:
        raise UsageError(f"pool: needs training-example indices in [0, {simulator.train_ids.size - 1}]")
    for name, value in (("num_steps", num_steps), ("batch_size", batch_size), ("budget", budget),
                        ("beam_width", beam_width), ("num_random", num_random)):
        if int(value) != value or value < 1:
            raise UsageError(f"{name}: must be a positive integer, got {value!r}")
    if budget > min(pool.size, num_steps * batch_size):
        raise UsageError(f"budget: {budget} distinct examples do not fit: at most {pool.size} (the pool) and "
                         f"{num_steps * batch_size} (steps x batch size); lower the budget or use more steps")

    def objectives(orders: np.ndarray) -> np.ndarray:
        (score,) = _rollouts(simulator, lambda rows: epoch_curricula(orders[rows], num_steps, batch_size),
                             len(orders), num_steps, batch_size, initial, targets,
                             lambda x: (x[:, -1].mean(axis=1, dtype=np.float64),))
        return score

    history = []
    beams = np.zeros((1, 0), dtype=np.int64)
    for _ in progress_bar(range(budget), desc="grow", unit="example", enabled=progress):
        grown = np.array([np.append(beam, i) for beam in beams for i in pool if i not in beam])
        score = objectives(grown)
        kept, seen = [], set()
        for row in np.argsort(score, kind="stable"):
            key = frozenset(grown[row].tolist())
            if key not in seen:
                seen.add(key)
                kept.append(row)
            if len(kept) == beam_width:
                break
        beams = grown[kept]
        history.append(float(score[kept[0]]))

    best, best_score = beams[0], history[-1]
    positions = np.arange(budget)
    swaps = [(p, q) for p in positions for q in positions if p < q]
    for _ in progress_bar(range(rounds), desc="local search", unit="round", enabled=progress):
        outside = np.setdiff1d(pool, best)
        neighbours = [np.where(positions == p, i, best) for p in positions for i in outside]
        for p, q in swaps:
            swapped = best.copy()
            swapped[[p, q]] = swapped[[q, p]]
            neighbours.append(swapped)
        if not neighbours:
            break
        candidates = np.array(neighbours)
        score = objectives(candidates)
        winner = int(np.argmin(score))
        if not score[winner] < best_score:
            break
        best, best_score = candidates[winner], float(score[winner])
        history.append(best_score)

    rng = np.random.default_rng(seed)
    random_orders = np.array([rng.choice(pool, budget, replace=False) for _ in range(num_random)])
    random_curricula = epoch_curricula(random_orders, num_steps, batch_size)
    return OptimizedCurriculum(epoch_curricula(best[None], num_steps, batch_size)[0], best, best_score, targets,
                               objectives(random_orders), random_curricula, tuple(history))
