r"""Attribution: the simulated effect of removing or editing training examples of one curriculum.

Each query edits a curriculum ``c`` (int ``[T, B]``, ``-1`` pads) into many variants ``c'``
and rolls them all out together (:mod:`simfluence.query.rollout`). Effects are reported as

.. math::

    \Delta = L(c') - L(c)

on the final loss ``L_T`` and on the mean over steps ``\bar L = \frac1T \sum_{t=1}^T L_t``.
For a removal, ``\Delta > 0`` means the removed examples *helped* (the loss is higher
without them) and ``\Delta < 0`` that they *hurt*.

* :func:`leave_one_out`: every training example present in ``c`` removed (all its
  occurrences), one at a time; deltas ``[K, M']``.
* :func:`leave_group_out`: each group removed at once, beside the sum of its members'
  single removals; the difference is the *interaction*. It is zero for additive
  simulators (``L_T - L_0`` is a sum over occurrences) and generally not for
  Simfluence-Linear, where ``\alpha(c_t) \ne 1`` rescales the effect of earlier steps;
  deltas ``[G, M']``.
* :func:`whatif`: the trajectories ``[T + 1, M']`` before and after arbitrary edits
  (:mod:`simfluence.query.edits`).
* :func:`influence_over_time`: every single occurrence (step ``t``, slot ``j``) removed;
  deltas ``[T, B, M']``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from simfluence.errors import UsageError
from simfluence.query.edits import Edit, apply_edits, parse_edit
from simfluence.query.rollout import _check_query, _rollouts, simulate_curricula
from simfluence.runs.log import PAD
from simfluence.simulators.base import Simulator


def _final_and_mean(trajectories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``L_T`` and ``mean_{t>=1} L_t`` of ``[R, T + 1, M']`` trajectories, float64 ``[R, M']`` each."""
    return trajectories[:, -1].astype(np.float64), trajectories[:, 1:].mean(axis=1, dtype=np.float64)


def _ranking_score(delta: np.ndarray, column: int | None) -> np.ndarray:
    return delta.mean(axis=1) if column is None else delta[:, column]


@dataclass(frozen=True)
class Attribution:
    """Leave-one-out effects of the training examples of one curriculum.

    ``delta = loss(without the example) - loss(with it)``: positive means the example
    helped (removing it raises the loss), negative that it hurt.

    Attributes:
        train_index: int ``[K]`` training examples present in the curriculum, ascending.
        occurrences: int ``[K]`` how often each occurs in the curriculum.
        final_delta: float64 ``[K, M']`` change of the final loss ``L_T``.
        mean_delta: float64 ``[K, M']`` change of the mean loss over steps ``1..T``.
        test_index: int ``[M']`` the test examples (columns).
        baseline: float32 ``[T + 1, M']`` simulated trajectory of the unedited curriculum.
    """

    train_index: np.ndarray
    occurrences: np.ndarray
    final_delta: np.ndarray
    mean_delta: np.ndarray
    test_index: np.ndarray
    baseline: np.ndarray

    def _delta(self, by: str) -> np.ndarray:
        if by not in ("final", "mean"):
            raise UsageError(f"by: expected 'final' or 'mean', got {by!r}")
        return self.final_delta if by == "final" else self.mean_delta

    def top_helpful(self, k: int = 10, by: str = "final", column: int | None = None) -> list[tuple[int, float]]:
        """``(train index, delta)`` of the ``k`` most helpful examples (largest delta first).

        ``column`` picks one test example (a position in ``test_index``); default: the
        delta averaged over all of them.
        """
        score = _ranking_score(self._delta(by), column)
        order = np.argsort(-score, kind="stable")[:k]
        return [(int(self.train_index[i]), float(score[i])) for i in order]

    def top_harmful(self, k: int = 10, by: str = "final", column: int | None = None) -> list[tuple[int, float]]:
        """``(train index, delta)`` of the ``k`` most harmful examples (most negative delta first)."""
        score = _ranking_score(self._delta(by), column)
        order = np.argsort(score, kind="stable")[:k]
        return [(int(self.train_index[i]), float(score[i])) for i in order]


def _removal_rows(curriculum: np.ndarray, removed: Sequence[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Builder of curricula: row 0 is ``curriculum``, row ``1 + g`` has every entry in ``removed[g]`` padded."""
    def build(rows: np.ndarray) -> np.ndarray:
        out = np.repeat(curriculum[None], rows.size, axis=0)
        for k, row in enumerate(rows):
            if row > 0:
                out[k][np.isin(curriculum, removed[row - 1])] = PAD
        return out
    return build


def _removal_effects(simulator: Simulator, curriculum: np.ndarray, initial: np.ndarray, test_index: np.ndarray,
                     removed: Sequence[np.ndarray], progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Baseline trajectory ``[T + 1, M']`` and final / mean deltas ``[G, M']`` of each removal ``removed[g]``.

    The unedited curriculum is row 0 of the same vectorised rollout as the edits.
    """
    num_steps, width = curriculum.shape
    final, mean = _rollouts(simulator, _removal_rows(curriculum, removed), len(removed) + 1, num_steps, width,
                            initial, test_index, _final_and_mean, progress)
    baseline = simulate_curricula(simulator, curriculum[None], initial, test_index)[0]
    return baseline, final[1:] - final[:1], mean[1:] - mean[:1]


def leave_one_out(simulator: Simulator, curriculum, initial_losses, test_index=None,
                  progress: bool = False) -> Attribution:
    """Effect of removing each training example of ``curriculum`` (all its occurrences).

    Args:
        simulator: any fitted simulator.
        curriculum: int ``[T, B]`` training-example indices, ``-1`` pads.
        initial_losses: float ``[M]`` losses of the test examples before training.
        test_index: int ``[M']`` test examples to report (default all).
        progress: a progress bar over the simulated curricula (only on a terminal).

    Returns:
        An :class:`Attribution` over the ``K`` distinct examples of the curriculum.
    """
    curriculum, initial, test_index = _check_query(simulator, curriculum, initial_losses, test_index)
    present, counts = np.unique(curriculum[curriculum != PAD], return_counts=True)
    baseline, final_delta, mean_delta = _removal_effects(simulator, curriculum, initial, test_index,
                                                         [np.array([i]) for i in present], progress)
    return Attribution(present.astype(np.int64), counts.astype(np.int64), final_delta, mean_delta, test_index,
                       baseline)


@dataclass(frozen=True)
class GroupAttribution:
    """Effects of removing whole groups of training examples, beside the sum of single removals.

    Attributes:
        names: ``G`` group names.
        members: ``G`` int arrays, the distinct training examples of each group.
        final_delta / mean_delta: float64 ``[G, M']`` effect of removing the group at once
            (``loss(without) - loss(with)``; positive: the group helped).
        final_sum / mean_sum: float64 ``[G, M']`` sum of the members' single-removal effects.
        test_index: int ``[M']``.
        baseline: float32 ``[T + 1, M']`` trajectory of the unedited curriculum.
    """

    names: tuple[str, ...]
    members: tuple[np.ndarray, ...]
    final_delta: np.ndarray
    mean_delta: np.ndarray
    final_sum: np.ndarray
    mean_sum: np.ndarray
    test_index: np.ndarray
    baseline: np.ndarray

    @property
    def final_interaction(self) -> np.ndarray:
        """``[G, M']`` group effect minus the sum of single effects on ``L_T`` (0 when effects add up)."""
        return self.final_delta - self.final_sum

    @property
    def mean_interaction(self) -> np.ndarray:
        """``[G, M']`` the same as :attr:`final_interaction`, on the mean loss over steps."""
        return self.mean_delta - self.mean_sum


def leave_group_out(simulator: Simulator, curriculum, initial_losses, groups: Mapping[str, Sequence[int]],
                    test_index=None, progress: bool = False) -> GroupAttribution:
    """Effect of removing each group of training examples, and its interaction.

    Args:
        simulator: any fitted simulator.
        curriculum: int ``[T, B]`` training-example indices, ``-1`` pads.
        initial_losses: float ``[M]`` losses of the test examples before training.
        groups: name -> training-example indices; members absent from the curriculum have no effect.
        test_index: int ``[M']`` test examples to report (default all).
        progress: a progress bar over the simulated curricula (only on a terminal).

    All group removals and all single removals of their members are rolled out together.
    """
    curriculum, initial, test_index = _check_query(simulator, curriculum, initial_losses, test_index)
    if not groups:
        raise UsageError("groups: no groups given; pass at least one name -> list of training indices")
    names, members = [], []
    for name, indices in groups.items():
        index = np.unique(np.asarray(list(indices), dtype=np.int64))
        if index.size == 0 or index.min() < 0 or index.max() >= simulator.train_ids.size:
            raise UsageError(f"groups[{name!r}]: needs training-example indices in [0, "
                             f"{simulator.train_ids.size - 1}], got {list(indices)}")
        names.append(str(name))
        members.append(index)
    singles = np.intersect1d(np.concatenate(members), curriculum[curriculum != PAD])
    removed = members + [np.array([i]) for i in singles]
    baseline, final, mean = _removal_effects(simulator, curriculum, initial, test_index, removed, progress)
    num_groups = len(members)
    position = {int(i): num_groups + k for k, i in enumerate(singles)}

    def summed(delta: np.ndarray) -> np.ndarray:
        out = np.zeros((num_groups, test_index.size))
        for g, index in enumerate(members):
            rows = [position[int(i)] for i in index if int(i) in position]
            out[g] = delta[rows].sum(axis=0)
        return out

    return GroupAttribution(tuple(names), tuple(members), final[:num_groups], mean[:num_groups], summed(final),
                            summed(mean), test_index, baseline)


# --- what-if edits --------------------------------------------------------------------
@dataclass(frozen=True)
class WhatIf:
    """Simulated trajectories before and after editing a curriculum.

    Attributes:
        edits: the edits, in the order applied.
        curriculum: int ``[T, B']`` the edited curriculum.
        before / after: float32 ``[T + 1, M']`` simulated losses of the original and edited curriculum.
        test_index: int ``[M']``.
    """

    edits: tuple[Edit, ...]
    curriculum: np.ndarray
    before: np.ndarray
    after: np.ndarray
    test_index: np.ndarray

    @property
    def final_change(self) -> np.ndarray:
        """Float ``[M']``: ``L_T(after) - L_T(before)``; negative means the edit lowers the final loss."""
        return self.after[-1].astype(np.float64) - self.before[-1]


def whatif(simulator: Simulator, curriculum, initial_losses, edits: Sequence[Edit | str],
           test_index=None) -> WhatIf:
    """Simulate ``curriculum`` before and after ``edits`` (:class:`Edit` or strings, see :func:`parse_edit`)."""
    curriculum, initial, test_index = _check_query(simulator, curriculum, initial_losses, test_index)
    parsed = tuple(parse_edit(edit, simulator.train_ids) if isinstance(edit, str) else edit for edit in edits)
    edited = apply_edits(curriculum, parsed, simulator.train_ids.size)
    original = np.full_like(edited, PAD)
    original[:, :curriculum.shape[1]] = curriculum
    before, after = simulate_curricula(simulator, np.stack([original, edited]), initial, test_index)
    return WhatIf(parsed, edited, before, after, test_index)


# --- influence over time --------------------------------------------------------------
@dataclass(frozen=True)
class InfluenceOverTime:
    """Effect on the final loss of removing each single occurrence of a training example.

    Attributes:
        curriculum: int ``[T, B]``.
        final_delta: float64 ``[T, B, M']``: ``L_T(without occurrence (t, j)) - L_T(with it)``
            for the example in slot ``j`` of step ``t + 1`` (positive: that appearance helped);
            NaN at padding slots.
        test_index: int ``[M']``.
        baseline: float32 ``[T + 1, M']`` trajectory of the unedited curriculum.
    """

    curriculum: np.ndarray
    final_delta: np.ndarray
    test_index: np.ndarray
    baseline: np.ndarray

    def _score(self, column: int | None) -> np.ndarray:
        return self.final_delta.mean(axis=2) if column is None else self.final_delta[:, :, column]

    def matrix(self, column: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(train_index [K], effect [K, T])``: per example and step, its summed effect.

        The effect of an example's occurrences in that step's batch (NaN where it is not in the
        batch); mean over test examples unless ``column`` picks one.
        """
        score = self._score(column)
        present = np.unique(self.curriculum[self.curriculum != PAD])
        out = np.full((present.size, self.curriculum.shape[0]), np.nan)
        rows = np.searchsorted(present, self.curriculum)
        for step, slot in np.argwhere(self.curriculum != PAD):
            k = rows[step, slot]
            out[k, step] = np.nan_to_num(out[k, step]) + score[step, slot]
        return present, out

    def top_moments(self, k: int = 10, column: int | None = None) -> list[tuple[int, int, float]]:
        """``(step counted from 1, train index, delta)`` of the ``k`` occurrences with the largest ``|delta|``."""
        score = self._score(column)
        slots = np.argwhere(self.curriculum != PAD)
        values = score[slots[:, 0], slots[:, 1]]
        order = np.argsort(-np.abs(values), kind="stable")[:k]
        return [(int(slots[i, 0]) + 1, int(self.curriculum[slots[i, 0], slots[i, 1]]), float(values[i]))
                for i in order]


def influence_over_time(simulator: Simulator, curriculum, initial_losses, test_index=None,
                        progress: bool = False) -> InfluenceOverTime:
    """Remove each occurrence (step, slot) of ``curriculum`` on its own; all in one vectorised rollout."""
    curriculum, initial, test_index = _check_query(simulator, curriculum, initial_losses, test_index)
    slots = np.argwhere(curriculum != PAD)
    num_steps, width = curriculum.shape

    def build(rows: np.ndarray) -> np.ndarray:
        out = np.repeat(curriculum[None], rows.size, axis=0)
        edited = rows > 0
        out[np.flatnonzero(edited), slots[rows[edited] - 1, 0], slots[rows[edited] - 1, 1]] = PAD
        return out

    (final,) = _rollouts(simulator, build, len(slots) + 1, num_steps, width, initial, test_index,
                         lambda x: (x[:, -1].astype(np.float64),), progress)
    delta = np.full((num_steps, width, test_index.size), np.nan)
    delta[slots[:, 0], slots[:, 1]] = final[1:] - final[:1]
    baseline = simulate_curricula(simulator, curriculum[None], initial, test_index)[0]
    return InfluenceOverTime(curriculum, delta, test_index, baseline)
