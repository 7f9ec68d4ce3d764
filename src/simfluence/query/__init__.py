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

One module per job, each importing only those listed before it:

* :mod:`simfluence.query.edits`: the edit language (:class:`Edit`, :func:`parse_edit`,
  :func:`apply_edits`); no simulator involved.
* :mod:`simfluence.query.rollout`: rolling out many curricula in chunks of bounded memory
  (:func:`simulate_curricula`), skipping empty steps, and checking a query's inputs.
* :mod:`simfluence.query.attribution`: leave-one-out, leave-group-out, what-if, influence over time.
* :mod:`simfluence.query.search`: curriculum search (:func:`optimize`).
* :mod:`simfluence.query.files`: reading and writing query curriculum files.
"""

from simfluence.query.attribution import (
    Attribution,
    GroupAttribution,
    InfluenceOverTime,
    WhatIf,
    influence_over_time,
    leave_group_out,
    leave_one_out,
    whatif,
)
from simfluence.query.edits import EDIT_KINDS, EDIT_SYNTAX, Edit, apply_edits, parse_edit, resolve_id
from simfluence.query.files import load_query_curriculum, save_query_curriculum
from simfluence.query.rollout import check_test_index, rollout_skipping_empty_steps, simulate_curricula
from simfluence.query.search import OptimizedCurriculum, epoch_curricula, optimize

__all__ = [
    "EDIT_KINDS",
    "EDIT_SYNTAX",
    "Attribution",
    "Edit",
    "GroupAttribution",
    "InfluenceOverTime",
    "OptimizedCurriculum",
    "WhatIf",
    "apply_edits",
    "check_test_index",
    "epoch_curricula",
    "influence_over_time",
    "leave_group_out",
    "leave_one_out",
    "load_query_curriculum",
    "optimize",
    "parse_edit",
    "resolve_id",
    "rollout_skipping_empty_steps",
    "save_query_curriculum",
    "simulate_curricula",
    "whatif",
]
