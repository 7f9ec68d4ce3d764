r"""Counterfactual queries answered by a fitted simulator instead of by retraining.

Every query edits a curriculum ``c`` (int ``[T, B]``, ``-1`` pads) into many variants
``c'``, stacks them into one ``[R, T, B]`` array and rolls them all out from the same
losses before training ``L_0`` (``[M]``) with one vectorised ``simulate`` per chunk of
bounded memory, so it works for every simulator kind (for the Simfluence-Linear family only
the requested test examples' columns are rolled out, same numbers). Losses are in the task's units
(nats for cross-entropy); steps are counted from 1, ``L_t`` being the loss after step ``t``.

Effects are reported as

.. math::

    \Delta = L(c') - L(c)

on the final loss ``L_T`` and on the mean over steps ``\bar L = \frac1T \sum_{t=1}^T L_t``.
For a removal, ``\Delta > 0`` means the removed examples *helped* (the loss is higher
without them) and ``\Delta < 0`` that they *hurt*.

* :func:`leave_one_out`: every training example present in ``c`` removed (all its
  occurrences), one at a time.
* :func:`leave_group_out`: each group removed at once, beside the sum of its members'
  single removals; the difference is the *interaction*. It is zero for additive
  simulators (``L_T - L_0`` is a sum over occurrences) and generally not for
  Simfluence-Linear, where ``\alpha(c_t) \ne 1`` rescales the effect of earlier steps.
* :func:`whatif`: arbitrary :class:`Edit`\ s (drop, insert, duplicate, shuffle, swap, move).
* :func:`influence_over_time`: every single occurrence (step ``t``, slot ``j``) removed.
* :func:`optimize`: search for a curriculum of a given budget that minimises the
  simulated mean final loss on a target set, against random curricula of the same budget.

A step whose batch a removal empties is skipped: no update, the loss is carried over
(``L_t = L_{t-1}``), just as training would skip a step with nothing to train on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from simfluence.progress import progress_bar
from simfluence.runs.atomic import atomic_path
from simfluence.runs.interchange import read_npz_arrays
from simfluence.runs.log import PAD, RunDataError, check_indices, validate_curriculum, validate_losses
from simfluence.runs.store import load_runs
from simfluence.simulators.base import Simulator
from simfluence.simulators.linear import LinearSimulator, rollout

CHUNK_BYTES = 256 << 20
"""Memory budget of one vectorised rollout (trajectories, indices and temporaries)."""


# --- rolling out many edited curricula ------------------------------------------------
def _column_rollout(simulator: Simulator, test_index: np.ndarray) -> Callable | None:
    """A rollout of only the ``test_index`` columns for the Simfluence-Linear family, else None.

    Each test example's recurrence is independent of the others', so rolling out a column
    subset of the coefficient table gives the same numbers as slicing a full rollout, at
    ``M' / M`` of the cost: a query about a few targets does not pay for every test example.
    """
    if not isinstance(simulator, LinearSimulator) or type(simulator)._simulate is not LinearSimulator._simulate:
        return None
    num_test = simulator.test_ids.size
    columns = np.concatenate([test_index, num_test + test_index]) if simulator.fit_alpha else test_index
    table = simulator.table[:, columns]

    def run(curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        return rollout(table, curricula, initial[:, test_index], simulator.alpha_offset, simulator.fit_alpha)

    return run


def rollout_skipping_empty_steps(run: Callable, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """``run(curricula, initial)`` where all-padding steps are skipped and hold the loss.

    ``run`` maps int ``[r, T', B]`` curricula without empty steps and ``[r, M]`` initial
    losses to ``[r, T' + 1, M']`` trajectories (a simulator's rollout, or real training).
    Rows are grouped by their number of real steps, each group run once after deleting its
    empty steps, and the trajectory is spread back over ``[R, T + 1, M']``.
    """
    nonempty = (curricula != PAD).any(axis=-1)                      # [R, T]
    if nonempty.all():
        return run(curricula, initial)
    lengths = nonempty.sum(axis=1)
    # Position of L_t in the compacted trajectory: the number of real steps up to t.
    position = np.concatenate([np.zeros((len(curricula), 1), dtype=np.int64), np.cumsum(nonempty, axis=1)], axis=1)
    out = None
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        if length:
            part = run(np.stack([curricula[r][nonempty[r]] for r in rows]), initial[rows])
        else:  # nothing left to train on: only L_0, read off a one-step run on example 0
            part = run(np.zeros((rows.size, 1, curricula.shape[2]), dtype=curricula.dtype), initial[rows])[:, :1]
        if out is None:
            out = np.empty((len(curricula), curricula.shape[1] + 1, part.shape[-1]), dtype=np.float32)
        out[rows] = np.take_along_axis(part, position[rows][:, :, None], axis=1)
    assert out is not None   # some row has an empty step, so the loop ran
    return out


def _rollouts(simulator: Simulator, curricula_of: Callable[[np.ndarray], np.ndarray], num_rows: int,
              num_steps: int, width: int, initial: np.ndarray, test_index: np.ndarray,
              reduce: Callable[[np.ndarray], tuple[np.ndarray, ...]], progress: bool = False,
              ) -> tuple[np.ndarray, ...]:
    """Roll out ``curricula_of(rows)`` for all rows in chunks; concatenate ``reduce(trajectories)``.

    ``curricula_of`` builds the int ``[r, T, B]`` edited curricula of the given rows, so
    neither the edits nor the trajectories of all rows need to be in memory at once.
    ``initial`` is the float64 ``[M]`` loss before training, the same for every row.
    """
    run = _column_rollout(simulator, test_index)
    columns = test_index.size if run is not None else simulator.test_ids.size
    if run is None:
        def run(curricula, start):
            return simulator.simulate(curricula, start)[:, :, test_index]
    per_row = 12 * (num_steps + 1) * columns + 16 * num_steps * width
    chunk = int(max(1, min(num_rows, CHUNK_BYTES // per_row)))
    parts: list[tuple[np.ndarray, ...]] = []
    with progress_bar(total=num_rows, unit="curriculum", desc="simulate", enabled=progress, leave=False) as bar:
        for start in range(0, num_rows, chunk):
            rows = np.arange(start, min(start + chunk, num_rows))
            starting = np.broadcast_to(initial, (rows.size, initial.size))
            parts.append(reduce(rollout_skipping_empty_steps(run, curricula_of(rows), starting)))
            bar.update(rows.size)
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def _final_and_mean(trajectories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``L_T`` and ``mean_{t>=1} L_t`` of ``[R, T + 1, M']`` trajectories, float64 ``[R, M']`` each."""
    return trajectories[:, -1].astype(np.float64), trajectories[:, 1:].mean(axis=1, dtype=np.float64)


def _check_query(simulator: Simulator, curriculum, initial_losses, test_index,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(curriculum int32 [T, B], initial float64 [M], test_index int64 [M'])``."""
    simulator._check_fitted()
    curriculum = validate_curriculum(curriculum, simulator.train_ids.size, "curriculum")
    if curriculum.ndim != 2:
        raise ValueError(f"curriculum: expected one curriculum of shape [steps, batch], got {curriculum.shape}")
    return curriculum, _check_initial(simulator, initial_losses), check_test_index(simulator, test_index)


def _check_initial(simulator: Simulator, initial_losses) -> np.ndarray:
    initial = validate_losses(initial_losses, "initial_losses").astype(np.float64)
    if initial.shape != (simulator.test_ids.size,):
        raise ValueError(f"initial_losses: expected shape [{simulator.test_ids.size}] (one loss per test example "
                         f"before training), got {initial.shape}")
    return initial


def check_test_index(simulator: Simulator, test_index) -> np.ndarray:
    """int64 ``[M']`` test-example indices (``None``: all), checked against the simulator."""
    return check_indices(test_index, simulator.test_ids.size, "test_index")


def simulate_curricula(simulator: Simulator, curricula, initial_losses, test_index=None,
                       progress: bool = False) -> np.ndarray:
    """Simulate many curricula from one starting point, in chunks of bounded memory.

    Args:
        simulator: any fitted simulator.
        curricula: int ``[R, T, B]``, ``-1`` pads; all-padding steps are skipped (loss held).
        initial_losses: float ``[M]``, the losses before training shared by every run.
        test_index: int ``[M']`` test examples to return (default all).
        progress: a progress bar over the curricula (only on a terminal).

    Returns:
        float32 ``[R, T + 1, M']``.
    """
    simulator._check_fitted()
    curricula = np.asarray(curricula)
    if curricula.ndim != 3:
        raise ValueError(f"curricula: expected shape [runs, steps, batch], got {curricula.shape}")
    # Empty steps are allowed here (they are skipped), so only dtype and range are checked.
    if curricula.dtype.kind not in "iu" or (curricula.size and (
            curricula.min() < PAD or curricula.max() >= simulator.train_ids.size)):
        validate_curriculum(curricula, simulator.train_ids.size, "curricula")  # raises the standard message
    initial = _check_initial(simulator, initial_losses)
    test_index = check_test_index(simulator, test_index)
    num_runs, num_steps, width = curricula.shape
    (trajectories,) = _rollouts(simulator, lambda rows: curricula[rows], num_runs, num_steps, width, initial,
                                test_index, lambda x: (x,), progress)
    return trajectories


# --- attribution ----------------------------------------------------------------------
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
            raise ValueError(f"by: expected 'final' or 'mean', got {by!r}")
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
        raise ValueError("groups: no groups given; pass at least one name -> list of training indices")
    names, members = [], []
    for name, indices in groups.items():
        index = np.unique(np.asarray(list(indices), dtype=np.int64))
        if index.size == 0 or index.min() < 0 or index.max() >= simulator.train_ids.size:
            raise ValueError(f"groups[{name!r}]: needs training-example indices in [0, "
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
EDIT_KINDS = ("drop", "insert", "duplicate", "shuffle", "swap", "move")
EDIT_SYNTAX = ("drop:ID (remove every occurrence), insert:ID@STEP (add to that step's batch), "
               "duplicate:ID (a second copy beside each occurrence), shuffle:SEED (permute the steps), "
               "swap:STEP,STEP (exchange two steps' batches), move:FROM,TO (take a step's batch out and "
               "put it back at position TO); steps count from 1")


@dataclass(frozen=True)
class Edit:
    """One curriculum edit; see :data:`EDIT_SYNTAX`. Steps count from 1 (step ``t`` gives ``L_t``).

    Attributes:
        kind: one of :data:`EDIT_KINDS`.
        example: training-example index (drop, insert, duplicate).
        steps: the step(s) involved: ``(t,)`` for insert, ``(a, b)`` for swap and move.
        seed: permutation seed for shuffle.
    """

    kind: str
    example: int | None = None
    steps: tuple[int, ...] = ()
    seed: int | None = None

    def __str__(self) -> str:
        if self.kind == "shuffle":
            return f"shuffle:{self.seed}"
        if self.kind in ("swap", "move"):
            return f"{self.kind}:{self.steps[0]},{self.steps[1]}"
        return f"{self.kind}:{self.example}" + (f"@{self.steps[0]}" if self.steps else "")

    def describe(self, train_ids: np.ndarray | None = None) -> str:
        """The edit as a user writes it, naming the example by its id when ``train_ids`` are given."""
        if self.example is None or train_ids is None:
            return str(self)
        return f"{self.kind}:{train_ids[self.example]}" + (f"@{self.steps[0]}" if self.steps else "")


def resolve_id(text: str, ids: np.ndarray, where: str, what: str = "training") -> int:
    """Index of an example given by id (as in ``ids``, the model's train or test ids) or by integer index."""
    match = np.flatnonzero(ids == text)
    if match.size:
        return int(match[0])
    if text.isdigit() and int(text) < ids.size:
        return int(text)
    raise ValueError(f"{where}: unknown {what} id {text!r} (give an id from the model's {what} "
                     f"ids, e.g. {str(ids[0])!r}, or an index 0..{ids.size - 1})")


def _integer(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{where}: {what} must be an integer, got {text!r} ({EDIT_SYNTAX})") from None


def parse_edit(text: str, train_ids: np.ndarray) -> Edit:
    """Parse ``KIND:ARGUMENT`` (see :data:`EDIT_SYNTAX`); ids are looked up in ``train_ids``."""
    where = f"--edit {text!r}"
    kind, _, argument = text.partition(":")
    if kind not in EDIT_KINDS or not argument:
        raise ValueError(f"{where}: expected KIND:ARGUMENT with KIND one of {list(EDIT_KINDS)} ({EDIT_SYNTAX})")
    if kind == "shuffle":
        return Edit(kind, seed=_integer(argument, where, "the seed"))
    if kind in ("swap", "move"):
        parts = argument.split(",")
        if len(parts) != 2:
            raise ValueError(f"{where}: expected {kind}:STEP,STEP ({EDIT_SYNTAX})")
        return Edit(kind, steps=tuple(_integer(part, where, "a step") for part in parts))
    if kind == "insert":
        name, at, step = argument.rpartition("@")
        if not at:
            raise ValueError(f"{where}: expected insert:ID@STEP ({EDIT_SYNTAX})")
        return Edit(kind, resolve_id(name, train_ids, where), (_integer(step, where, "the step"),))
    return Edit(kind, resolve_id(argument, train_ids, where))


def _add_to_step(curriculum: np.ndarray, step: int, example: int) -> np.ndarray:
    """``curriculum`` with ``example`` in a free slot of row ``step`` (one padding column added if none is free)."""
    free = np.flatnonzero(curriculum[step] == PAD)
    if free.size == 0:
        curriculum = np.concatenate([curriculum, np.full((len(curriculum), 1), PAD, curriculum.dtype)], axis=1)
        free = np.array([curriculum.shape[1] - 1])
    curriculum = curriculum.copy()
    curriculum[step, free[0]] = example
    return curriculum


def apply_edits(curriculum, edits: Sequence[Edit], num_train: int | None = None) -> np.ndarray:
    """The curriculum ``[T, B']`` after applying ``edits`` in order (``B' >= B`` when insertions need room)."""
    out = np.array(curriculum, dtype=np.int32)
    num_steps = out.shape[0]
    for edit in edits:
        if edit.kind not in EDIT_KINDS:
            raise ValueError(f"edit {edit}: unknown kind {edit.kind!r}, expected one of {list(EDIT_KINDS)}")
        for step in edit.steps:
            if not 1 <= step <= num_steps:
                raise ValueError(f"edit {edit}: step {step} is outside the curriculum's steps 1..{num_steps}")
        if edit.example is not None and num_train is not None and not 0 <= edit.example < num_train:
            raise ValueError(f"edit {edit}: training index {edit.example} is outside 0..{num_train - 1}")
        if edit.kind in ("drop", "duplicate") and not (out == edit.example).any():
            raise ValueError(f"edit {edit}: training example {edit.example} is not in the curriculum "
                             f"(at this point of the edits), so there is nothing to {edit.kind}")
        if edit.kind == "drop":
            out = np.where(out == edit.example, PAD, out).astype(np.int32)
        elif edit.kind == "insert":
            assert edit.example is not None   # insert and duplicate name an example
            out = _add_to_step(out, edit.steps[0] - 1, edit.example)
        elif edit.kind == "duplicate":
            assert edit.example is not None
            for step, _slot in np.argwhere(out == edit.example):
                out = _add_to_step(out, step, edit.example)
        elif edit.kind == "shuffle":
            out = out[np.random.default_rng(edit.seed).permutation(num_steps)]
        elif edit.kind == "swap":
            order = np.arange(num_steps)
            a, b = edit.steps[0] - 1, edit.steps[1] - 1
            order[[a, b]] = order[[b, a]]
            out = out[order]
        else:  # move
            order = np.delete(np.arange(num_steps), edit.steps[0] - 1)
            out = out[np.insert(order, edit.steps[1] - 1, edit.steps[0] - 1)]
    return out


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


# --- curriculum search ----------------------------------------------------------------
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
        raise ValueError(f"pool: needs training-example indices in [0, {simulator.train_ids.size - 1}]")
    for name, value in (("num_steps", num_steps), ("batch_size", batch_size), ("budget", budget),
                        ("beam_width", beam_width), ("num_random", num_random)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if budget > min(pool.size, num_steps * batch_size):
        raise ValueError(f"budget: {budget} distinct examples do not fit: at most {pool.size} (the pool) and "
                         f"{num_steps * batch_size} (steps x batch size); lower --budget or raise --steps")

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


# --- query files ----------------------------------------------------------------------
def load_query_curriculum(path, simulator: Simulator, run: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(curriculum int32 [T, B], initial_losses float32 [M])`` for a query, from ``path``.

    ``path`` is one of:

    * an ``.npz`` holding ``curriculum`` ``[T, B]`` and ``initial_losses`` ``[M]`` (as written
      by :func:`save_query_curriculum` and ``simfluence optimize --out``), optionally with
      ``train_ids`` / ``test_ids`` that must match the simulator's; or
    * runs (a run store directory or an interchange ``.npz``): run ``run`` (default 0), its
      curriculum and its observed losses before training.
    """
    source = str(path)
    arrays = read_npz_arrays(path, ()) if str(path).endswith(".npz") else {}
    if "curriculum" in arrays:
        if run is not None:
            raise ValueError(f"--run: {source} holds a single curriculum, not runs; drop --run")
        for name in ("train_ids", "test_ids"):
            if name in arrays and not np.array_equal(arrays[name].astype(str), getattr(simulator, name)):
                raise RunDataError(source, name, "differ from the ids the simulator was fitted on",
                                   "query with a curriculum of the same task")
        if "initial_losses" not in arrays:
            raise RunDataError(source, "initial_losses", "is missing",
                               "add the test losses before training, float [test examples]")
        curriculum = validate_curriculum(arrays["curriculum"], simulator.train_ids.size, source)
        if curriculum.ndim != 2:
            raise RunDataError(source, "curriculum", f"expected shape [steps, batch], got {curriculum.shape}")
        initial = validate_losses(arrays["initial_losses"], source, "initial_losses")
        if initial.shape != (simulator.test_ids.size,):
            raise RunDataError(source, "initial_losses", f"expected shape [{simulator.test_ids.size}] (one per "
                               f"test example of the model), got {initial.shape}")
        return curriculum, initial
    runs = load_runs(path)
    simulator.check_compatible(runs, source)
    run = 0 if run is None else run
    if not 0 <= run < runs.num_runs:
        raise ValueError(f"--run: {run} is out of range for {source}, which holds runs 0..{runs.num_runs - 1}")
    return runs.curricula[run], runs.initial_losses[run]


def save_query_curriculum(path, curriculum: np.ndarray, initial_losses: np.ndarray, simulator: Simulator,
                          **extra: np.ndarray | np.generic) -> None:
    """Write a curriculum file that :func:`load_query_curriculum` reads (atomically, no pickle)."""
    with atomic_path(path, suffix=".npz") as temporary:
        # numpy's stubs let ``**extra`` fill ``allow_pickle`` (a bool): a false alarm
        np.savez(temporary, curriculum=np.asarray(curriculum, dtype=np.int32),
                 initial_losses=np.asarray(initial_losses, dtype=np.float32),
                 train_ids=simulator.train_ids.astype(str), test_ids=simulator.test_ids.astype(str),
                 **extra)  # type: ignore[arg-type]
