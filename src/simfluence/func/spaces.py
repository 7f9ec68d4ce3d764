r"""Loss spaces a simulator's dynamics can run in, and the way back to losses.

* ``"loss"``: :math:`z = L`;
* ``"log"``: :math:`z = \log L` (effects proportional to the loss; predictions never negative);
* ``"margin"``: :math:`z = \log(e^L - 1)`, the inverse of softplus. For a cross-entropy
  :math:`L = \log(1 + e^{-\text{margin}})` this is minus the margin, in which training moves a
  classifier about linearly; like ``log`` for small losses and like ``loss`` for large ones.

``log`` and ``margin`` need every loss to be positive. Predictions come back through
:func:`from_space`, kept within :func:`loss_bounds` of the fitting losses.
"""

from __future__ import annotations

import numpy as np

from simfluence.runs.log import RunDataError

SPACES = ("loss", "log", "margin")
CLIP = 2.0
"""Simulated losses are kept within ``[0, CLIP x the largest fitting loss]`` (non-negative
losses): beyond that a linear model extrapolates far outside anything it has seen."""
UNBOUNDED = (-float(np.finfo(np.float64).max), float(np.finfo(np.float64).max))
"""``(floor, ceiling)`` that clips nothing; finite, so saved models hold no inf."""


def candidate_spaces(requested: str, losses: np.ndarray) -> list[str]:
    """The spaces a fit on ``losses`` considers for the ``space`` setting ``requested``.

    ``"auto"``: all of :data:`SPACES` where every loss is > 0, else ``"loss"``. Raises
    :class:`RunDataError` (field ``losses``) for ``log`` / ``margin`` asked of losses not all > 0.
    """
    positive = bool((losses > 0).all())
    if requested in ("log", "margin") and not positive:
        raise RunDataError("<runs>", "losses", f"space='{requested}' needs every loss > 0", "use space='loss'")
    if requested != "auto":
        return [requested]
    return list(SPACES) if positive else ["loss"]


def check_initial(initial: np.ndarray, space: str) -> None:
    """Raise :class:`RunDataError` (``initial_losses``) for losses <= 0 given to a ``log`` / ``margin`` model.

    Such losses have no ``z``: the rollout would be NaN.
    """
    if space != "loss" and not bool((initial > 0).all()):
        raise RunDataError("<input>", "initial_losses", f"holds losses <= 0, and this model was fitted in "
                           f"'{space}' space, which needs every loss > 0", "fit it with space='loss'")


def to_space(losses: np.ndarray, space: str) -> np.ndarray:
    """``z`` of ``losses`` (positive for ``log`` / ``margin``) in ``space``; same shape."""
    if space == "log":
        return np.log(losses)
    if space == "margin":   # log(e^L - 1), written to stay accurate for small and large L
        return np.where(losses > 20, losses, np.log(np.expm1(np.minimum(losses, 20))))
    return losses


def inverse(z: np.ndarray, space: str) -> np.ndarray:
    """Losses of ``z`` in ``space`` (:func:`to_space` undone), unclipped."""
    if space == "log":
        return np.exp(z)
    if space == "margin":
        return np.logaddexp(0.0, z)
    return z


def loss_bounds(losses: np.ndarray) -> tuple[float, float]:
    """``(floor, ceiling)`` of simulated losses: ``[0, CLIP x max]`` for non-negative losses, else the float range."""
    if bool((losses >= 0).all()):
        return 0.0, CLIP * float(losses.max())
    return UNBOUNDED


def from_space(z: np.ndarray, space: str, floor: float, ceiling: float) -> np.ndarray:
    """Losses from ``z`` in ``space``, kept within ``[floor, ceiling]`` (``exp`` kept finite)."""
    if space != "loss" and ceiling < UNBOUNDED[1]:
        z = np.minimum(z, to_space(np.array(ceiling), space))
    return np.clip(inverse(z, space), floor, ceiling)


def from_space_slope(z: np.ndarray, space: str, floor: float, ceiling: float) -> np.ndarray:
    r""":math:`dL/dz` of :func:`from_space` at ``z``; 0 where the clip to ``[floor, ceiling]`` binds.

    :math:`e^z` (``log``), the logistic :math:`\sigma(z)` (``margin``), 1 (``loss``).
    """
    if space == "log":
        slope = np.exp(np.minimum(z, 700.0))
    elif space == "margin":
        slope = 0.5 * (1.0 + np.tanh(0.5 * z))   # the logistic function, without overflow
    else:
        slope = np.ones_like(z, dtype=np.float64)
    losses = inverse(z, space)
    return np.where((losses > floor) & (losses < ceiling), slope, 0.0)


def control_variate_mean(z: np.ndarray, mean_z: np.ndarray, space: str, floor: float, ceiling: float) -> np.ndarray:
    r"""Losses :math:`E[f(z)]` (``f``: :func:`from_space`) from draws ``z`` ``[D, ...]`` of known mean ``mean_z``.

    ``mean_z`` ``[...]`` is the exact :math:`\bar z = E[z]`:

    .. math::

        \hat E[f(z)] = f(\bar z) + \frac{1}{D} \sum_d \bigl(f(z^d) - f(\bar z) - f'(\bar z)\,(z^d - \bar z)\bigr)

    kept within ``[floor, ceiling]``: unbiased, since :math:`E[z^d - \bar z] = 0`, and only the
    curvature of ``f`` is left to sampling noise, not the whole spread of the losses. float64 ``[...]``.
    """
    at_mean = from_space(mean_z, space, floor, ceiling)
    slope = from_space_slope(mean_z, space, floor, ceiling)
    curvature = from_space(z, space, floor, ceiling) - at_mean - slope * (z - mean_z)
    return np.clip(at_mean + curvature.mean(axis=0), floor, ceiling)
