r"""Simfluence-Additive: each step adds a fixed amount per training example.

.. math::

    L_t = L_{t-1} + \beta(c_t), \qquad \beta(c_t) = \sum_{i \in c_t} B_i

This is Simfluence-Linear with ``alpha == 1``; TracIn, Grad-Dot and influence functions
are additive models of this form with ``B_i`` read off gradients instead of fitted.
"""

from __future__ import annotations

from simfluence.simulators.base import Capabilities, register
from simfluence.simulators.linear import LinearSimulator


@register
class AdditiveSimulator(LinearSimulator):
    """Ridge-fitted additive simulator; arguments as :class:`LinearSimulator`."""

    kind = "additive"
    capabilities = Capabilities(
        "learned", ridge=True, cross_validation=True, device=True, precision=True, column_rollout=True,
        expected_rollout=True, transitions=True)
    fit_alpha = False
    alpha_offset = 1.0
