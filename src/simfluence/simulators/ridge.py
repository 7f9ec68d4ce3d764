r"""Ridge regression on teacher-forced transitions, for all test examples at once.

For one test example ``m`` and transitions ``s = (run, step)`` with batch indicator
``x_s`` (a row of :class:`BatchDesign` ``X``), previous loss ``l_s = L^m_{t-1}`` and
regression target ``y_s``, the model and objective are

.. math::

    \hat y_s = l_s \, x_s^\top a + x_s^\top b, \qquad
    \min_{a, b}\; \sum_s (\hat y_s - y_s)^2 + \lambda (\lVert a\rVert^2 + \lVert b\rVert^2)

(``a`` is dropped for the additive model). Its normal equations are

.. math::

    \begin{bmatrix} X^\top D^2 X + \lambda I & X^\top D X \\ X^\top D X & X^\top X + \lambda I \end{bmatrix}
    \begin{bmatrix} a \\ b \end{bmatrix}
    = \begin{bmatrix} X^\top D y \\ X^\top y \end{bmatrix}, \qquad D = \mathrm{diag}(l).

The design ``X`` is shared by all test examples; only ``l`` and ``y`` differ. We therefore
run preconditioned conjugate gradient on all ``M`` systems together, each matrix-vector
product being two sparse-times-dense products of cost ``O(nnz(X) * M)``; the parameters
are laid out as ``W = [a | b]`` of shape ``[N, 2M]``. The preconditioner inverts the
``2 x 2`` diagonal block of each (training example, test example) pair exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from simfluence.simulators.design import BatchDesign


@dataclass
class RidgeSolution:
    """Coefficients ``[N, M]`` (``a`` is ``None`` for the additive model) and solver facts."""

    a: torch.Tensor | None
    b: torch.Tensor
    iterations: int
    max_relative_residual: float


def solve_transition_ridge(
    design: BatchDesign,
    previous: torch.Tensor,
    target: torch.Tensor,
    ridge: float,
    fit_alpha: bool = True,
    tol: float = 1e-6,
    max_iter: int = 500,
    initial: torch.Tensor | None = None,
) -> RidgeSolution:
    """Solve the ridge normal equations above for every column of ``target``.

    Args:
        design: ``X`` of shape ``[S, N]`` on the device of the tensors below.
        previous: ``[S, M]`` losses before each transition (``l``); ignored if not ``fit_alpha``.
        target: ``[S, M]`` regression targets (``y``).
        ridge: ``lambda > 0``.
        fit_alpha: fit ``a`` and ``b`` (linear) or ``b`` only (additive).
        tol: stop when every system's residual norm is below ``tol`` times its right-hand side's.
        max_iter: iteration cap.
        initial: optional warm start, ``[N, 2M]`` (``[N, M]`` if not ``fit_alpha``).
    """
    if ridge <= 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    blocks = 2 if fit_alpha else 1
    num_cols = target.shape[1]
    like: dict[str, Any] = {"dtype": target.dtype, "device": target.device}
    scratch = torch.empty(design.num_train, blocks * num_cols, **like)
    # Every iteration works in preallocated buffers: at scale, allocating the [N, 2M] and
    # [S, 2M] temporaries costs more than the arithmetic.

    def column_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, y, out=scratch).sum(0).view(blocks, -1).sum(0)

    def transpose_features(stacked: torch.Tensor) -> torch.Tensor:
        """``Z^T r`` for ``stacked = [. | r]`` (``[S, blocks * M]``); fills the first half in place."""
        if fit_alpha:
            torch.mul(stacked[:, num_cols:], previous, out=stacked[:, :num_cols])
        return design.rmatmul(stacked)

    def normal_matvec(weights: torch.Tensor) -> torch.Tensor:
        summed = design.matmul(weights)  # [X a | X b]
        if fit_alpha:
            summed[:, num_cols:].addcmul_(summed[:, :num_cols], previous)  # prediction, in the b half
        return transpose_features(summed).add_(weights, alpha=ridge)

    # Exact inverse of each pair's 2x2 diagonal block [[d_aa, d_ab], [d_ab, d_bb]].
    d_bb = design.rmatmul(torch.ones_like(target[:, :1]), squared=True) + ridge
    if fit_alpha:
        moments = design.rmatmul(torch.cat([previous * previous, previous], dim=1), squared=True)
        d_aa, d_ab = moments[:, :num_cols] + ridge, moments[:, num_cols:]
        determinant = d_aa * d_bb - d_ab * d_ab
        inv_aa, inv_ab, inv_bb = d_bb / determinant, -d_ab / determinant, d_aa / determinant
        del moments, d_aa, d_ab, determinant

        def precondition(residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            r_a, r_b = residual[:, :num_cols], residual[:, num_cols:]
            torch.mul(r_a, inv_aa, out=out[:, :num_cols]).addcmul_(r_b, inv_ab)
            torch.mul(r_b, inv_bb, out=out[:, num_cols:]).addcmul_(r_a, inv_ab)
            return out
    else:
        inverse = 1.0 / d_bb

        def precondition(residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return torch.mul(residual, inverse, out=out)

    stacked = torch.empty(target.shape[0], blocks * num_cols, **like)
    stacked[:, blocks * num_cols - num_cols:] = target
    rhs = transpose_features(stacked)
    del stacked
    tiny = torch.finfo(rhs.dtype).tiny
    rhs_norm = column_dot(rhs, rhs).sqrt().clamp_min(tiny)
    weights = torch.zeros_like(rhs) if initial is None else initial.to(rhs).clone()
    residual = rhs.sub_(normal_matvec(weights)) if initial is not None else rhs
    preconditioned = precondition(residual, torch.empty_like(residual))
    direction = preconditioned.clone()
    rho = column_dot(residual, preconditioned)
    relative = column_dot(residual, residual).sqrt() / rhs_norm
    iterations = 0
    while iterations < max_iter and float(relative.max()) > tol:
        product = normal_matvec(direction)
        curvature = column_dot(direction, product)
        # Converged systems have a zero direction: keep them where they are.
        step = torch.where(curvature > 0, rho / curvature.clamp_min(tiny), 0.0).repeat(blocks)
        weights.addcmul_(direction, step)
        residual.addcmul_(product, step, value=-1)
        del product
        precondition(residual, preconditioned)
        rho_next = column_dot(residual, preconditioned)
        momentum = torch.where(rho > 0, rho_next / rho.clamp_min(tiny), 0.0).repeat(blocks)
        direction.mul_(momentum).add_(preconditioned)
        rho = rho_next
        relative = column_dot(residual, residual).sqrt() / rhs_norm
        iterations += 1
    a = weights[:, :num_cols] if fit_alpha else None
    b = weights[:, num_cols:] if fit_alpha else weights
    return RidgeSolution(a, b, iterations, float(relative.max()))
