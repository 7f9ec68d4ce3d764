"""The edit language of what-if queries: parsing, printing and applying curriculum edits.

An :class:`Edit` is written ``KIND:ARGUMENT`` (:data:`EDIT_SYNTAX`), ``KIND`` one of
:data:`EDIT_KINDS`: drop, insert, duplicate, shuffle, swap, move. Training examples are named
by id or index (:func:`resolve_id`), steps count from 1 (step ``t`` gives ``L_t``).
:func:`apply_edits` maps an int ``[T, B]`` curriculum (``-1`` pads) to ``[T, B']``, with
``B' >= B`` when an insertion needs a free slot. Plain NumPy on curricula: no simulator here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simfluence.errors import UsageError
from simfluence.runs.log import PAD

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
    raise UsageError(f"{where}: unknown {what} id {text!r} (give an id from the model's {what} "
                     f"ids, e.g. {str(ids[0])!r}, or an index 0..{ids.size - 1})")


def _integer(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{where}: {what} must be an integer, got {text!r} ({EDIT_SYNTAX})") from None


def parse_edit(text: str, train_ids: np.ndarray) -> Edit:
    """Parse ``KIND:ARGUMENT`` (see :data:`EDIT_SYNTAX`); ids are looked up in ``train_ids``."""
    where = f"edit {text!r}"
    kind, _, argument = text.partition(":")
    if kind not in EDIT_KINDS or not argument:
        raise UsageError(f"{where}: expected KIND:ARGUMENT with KIND one of {list(EDIT_KINDS)} ({EDIT_SYNTAX})")
    if kind == "shuffle":
        return Edit(kind, seed=_integer(argument, where, "the seed"))
    if kind in ("swap", "move"):
        parts = argument.split(",")
        if len(parts) != 2:
            raise UsageError(f"{where}: expected {kind}:STEP,STEP ({EDIT_SYNTAX})")
        return Edit(kind, steps=tuple(_integer(part, where, "a step") for part in parts))
    if kind == "insert":
        name, at, step = argument.rpartition("@")
        if not at:
            raise UsageError(f"{where}: expected insert:ID@STEP ({EDIT_SYNTAX})")
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
            raise UsageError(f"edit {edit}: unknown kind {edit.kind!r}, expected one of {list(EDIT_KINDS)}")
        for step in edit.steps:
            if not 1 <= step <= num_steps:
                raise UsageError(f"edit {edit}: step {step} is outside the curriculum's steps 1..{num_steps}")
        if edit.example is not None and num_train is not None and not 0 <= edit.example < num_train:
            raise UsageError(f"edit {edit}: training index {edit.example} is outside 0..{num_train - 1}")
        if edit.kind in ("drop", "duplicate") and not (out == edit.example).any():
            raise UsageError(f"edit {edit}: training example {edit.example} is not in the curriculum "
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
