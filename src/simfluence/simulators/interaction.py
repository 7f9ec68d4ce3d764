r"""Simfluence-Linear with low-rank pairwise interactions between training examples.

Simfluence-Linear (:mod:`simfluence.simulators.linear`) lets one example's effect depend on
the current loss (``alpha`` multiplies it), so it can express diminishing returns but not
*complementary* examples: two examples that lower a test loss only when both were
trained on (say, one teaches a feature and the other how to read it). ``linear-pairwise``
adds a pair term to each step:

.. math::

    L_t = \Big(1 + \sum_{i \in c_t} a_i\Big) L_{t-1} + \sum_{i \in c_t} b_i + \gamma_t, \qquad
    \gamma^m_t = \sum_{\{i, j\} \in P_t} u_i^\top V_m u_j

with one ``(a_i, b_i)`` per (training example, test example) as in Linear, an embedding
``u_i \in \mathbb{R}^k`` per training example shared by all test examples, and a
symmetric ``V_m \in \mathbb{R}^{k \times k}`` per test example. ``P_t`` holds the pairs
that step ``t`` completes: each example of ``c_t`` with every example trained on in the
``window`` steps before (all earlier steps of the run when ``window`` is ``None``: SGD
keeps what it learned), and every two slots of ``c_t`` itself. With
``e_t = \sum_{i \in c_t} u_i``, ``h_t = \sum_{s \in [t - w, t)} e_s`` and
``Q_t = \sum_{i \in c_t} u_i u_i^\top`` this is

.. math::

    \gamma^m_t = \langle V_m,\; F_t \rangle, \qquad
    F_t = \operatorname{sym}\!\big(e_t (h_t + \tfrac12 e_t)^\top\big) - \tfrac12 Q_t,

so a step costs ``O(B k^2 + k^2 M)`` and the pair term never forms an ``N x N`` matrix.
Summed over a run, ``\gamma`` adds ``u_i^\top V_m u_j`` once per ordered co-occurrence of
``i`` and ``j`` within the window: a supermodular pair has ``u_i^\top V_m u_j < 0``.

**Fitting.** The objective is Linear's teacher-forced one-step squared error with the pair
term, over transitions ``s`` (a run and a step; ``y_s = L_t - L_{t-1}``, ``l_s = L_{t-1}``,
``x_s`` the batch counts, ``f_s`` the flattened ``F_t``):

.. math::

    J(U) = \min_{a, b, V} \sum_{s, m} \big(y^m_s - l^m_s x_s^\top a^m - x_s^\top b^m - f_s^\top v^m\big)^2
        + \lambda \big(\lVert a\rVert^2 + \lVert b\rVert^2\big) + \mu \big(\lVert U\rVert^2 + \lVert V\rVert^2\big)

(``lambda``: the ``linear-identity`` ridge, chosen by its cross-validation; ``mu``:
``pair_ridge``). For fixed ``U`` the inner problem is one ridge regression per test example
``m`` with ``2N + k(k+1)/2`` unknowns (``V_m`` symmetric, :func:`symmetric_basis`), all sharing
the design. It is solved by preconditioned conjugate gradient over all test examples of a
column chunk at once (:func:`solve_pair_ridge`, warm-started from the previous ``(a, b)``), so
the fit holds one chunk's ``[S, chunk]`` working set at a time (``_WORKING_BYTES``, as the
ridge solver), and any chunking gives the same fit: given ``U`` the columns are independent.
L-BFGS moves only the ``N x k`` embeddings (variable projection): by the envelope theorem
``\partial J / \partial f_s = -2 \sum_m r^m_s v^m`` with the inner residuals ``r``, which
back-propagates to ``U`` through the pair features. (Earlier versions moved ``(a, b, U)``
jointly with torch's L-BFGS: hundreds of evaluations, each through autograd, 16-90x the fit
time of ``linear-identity``; the badly conditioned ``(a, b)`` only moved slowly.)

**Rounds, and the across-run ranking.** The fit is a path: round 0 is ``linear-identity``
(``U = 0``, ``V = 0``), round ``r`` the exact ``(a, b, V)`` for the embeddings after
``r x steps`` L-BFGS iterations from small random ones. On real runs (digits-mlp,
text-minilm) the pair terms lower the one-step error, and often the all-steps MSE (mostly
through the few test examples with large losses), but they lower the across-run Spearman of
held-out runs (does the simulator know which curriculum helps a test example?) by 0.03-0.06
from the first round on. With ``window=None`` the features grow with the steps taken,
``h_t \approx t B \bar u``: the pair term gives every example an effect that grows with
training time, ``t\, u_i^\top V_m \bar u``, nearly collinear with the per-example terms
``l_s x_s`` and ``x_s`` (a least-squares fit on them explains 75-89 % of the fitted ``gamma``
on digits-mlp). The weakly regularised teacher-forced fit then uses large pair and
per-example terms that cancel each other on the fitting transitions but not on new
curricula: the rolled-out pair term varies across runs up to 4x (digits-mlp) and 60x
(text-minilm, small-loss examples) as much as the true final losses do, which scrambles the
ranking of curricula. Earlier versions chose the number of rounds by all-steps MSE on one
validation fold and so kept such rounds. With ``validate`` the rounds are now chosen by
K-fold validation on the rolled-out error *and* the ranking
(:meth:`PairwiseSimulator._choose_rounds`): a round is eligible only if its mean validation
across-run Spearman is within ``spearman_tolerance`` of linear-identity's, and it must lower
the validation MSE by at least 1 % and by two standard errors of the per-run differences.
Where the pair terms capture a real interaction (the two-key task of
``benchmarks/interactions.py``) both improve and the rounds are kept; on digits-mlp and
text-minilm linear-identity is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.optimize
import torch

from simfluence.errors import UsageError
from simfluence.progress import progress_bar
from simfluence.runs.log import RunSet
from simfluence.simulators.base import Capabilities, register, run_folds
from simfluence.simulators.config import boolean, integer, positive, setting
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.linear import (
    _DTYPES,
    LinearConfig,
    LinearIdentitySimulator,
    Transitions,
    rollout,
)

_WORKING_BYTES = 2 << 30  # fitting working set per column chunk (as the ridge solver's)
_MIN_GAIN = 0.01  # the least relative validation-MSE gain over linear-identity that chooses pair terms


class PairFeatureMap:
    """``U -> F``: the pair features of fixed curricula for any embeddings (differentiable).

    Builds the batch design of the curricula once, so that the features of many ``U`` (one
    per L-BFGS evaluation) cost only the sparse products.

    Args:
        curricula: int ``[R, T, B]``, ``-1`` pads.
        num_train: ``N``.
        window: earlier steps paired with each step; ``None`` for all of them.
        device: torch device of the products.
        steps: optional int ``[T']`` curriculum rows to keep (e.g. the steps of the transitions);
            ``None`` keeps all ``T``.
    """

    def __init__(self, curricula: np.ndarray, num_train: int, window: int | None,
                 device: str | torch.device = "cpu", steps: np.ndarray | None = None):
        self.num_runs, self.num_steps, width = curricula.shape
        self.design = BatchDesign(curricula.reshape(-1, width), num_train, device)
        self.window = window
        self.steps = None if steps is None else torch.as_tensor(np.asarray(steps), dtype=torch.int64,
                                                                 device=self.design.device)

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[R, T', k * k]`` features (``F_t`` of the module docstring, flattened) of ``U`` ``[N, k]``."""
        num_runs, num_steps = self.num_runs, self.num_steps
        rank = embeddings.shape[1]
        outer = (embeddings[:, :, None] * embeddings[:, None, :]).reshape(-1, rank * rank)
        step_sum = self.design.matmul(embeddings).view(num_runs, num_steps, rank)            # e_t
        self_pairs = self.design.matmul(outer).view(num_runs, num_steps, rank * rank)        # Q_t
        before = torch.cumsum(step_sum, dim=1) - step_sum                                    # sum over s < t
        if self.window is not None and self.window < num_steps:
            lagged = torch.zeros_like(before)
            lagged[:, self.window:] = before[:, :num_steps - self.window]
            before = before - lagged                                                         # s in [t - window, t)
        if self.steps is not None:
            step_sum, before, self_pairs = step_sum[:, self.steps], before[:, self.steps], self_pairs[:, self.steps]
        cross = step_sum[..., :, None] * (before + 0.5 * step_sum)[..., None, :]
        cross = 0.5 * (cross + cross.transpose(-1, -2))
        return cross.reshape(*cross.shape[:2], rank * rank) - 0.5 * self_pairs


def pair_features(embeddings: torch.Tensor, curricula: np.ndarray, window: int | None) -> torch.Tensor:
    """``F_t`` of the module docstring, flattened: ``[R, T, k * k]`` for curricula ``[R, T, B]``.

    Args:
        embeddings: ``U``, ``[N, k]`` (differentiable).
        curricula: int ``[R, T, B]``, ``-1`` pads.
        window: earlier steps paired with each step; ``None`` for all of them.
    """
    return PairFeatureMap(curricula, embeddings.shape[0], window, embeddings.device)(embeddings)


def symmetric_basis(rank: int, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    r"""``E`` ``[k^2, k (k + 1) / 2]``: coordinates of symmetric ``k x k`` matrices without duplicates.

    ``F_t`` and ``V_m`` are symmetric, so the ``k^2`` flattened features have ``k (k - 1) / 2``
    duplicated columns, and their Gram matrix is singular but for the ridge. With ``g = F E`` and
    ``V = E w`` (column ``(i, i)`` of ``E`` is ``e_{ii}``, column ``(i, j)``, ``i < j``, is
    ``(e_{ij} + e_{ji}) / \sqrt 2``) the pair term and its penalty are unchanged,
    ``\langle V, F\rangle = g^\top w`` and ``\lVert V\rVert^2 = \lVert w\rVert^2``, and ``g`` has full rank.
    """
    rows, cols = torch.triu_indices(rank, rank)
    basis = torch.zeros(rank * rank, rows.numel(), dtype=dtype, device=device)
    position = torch.arange(rows.numel())
    diagonal = rows == cols
    weight = torch.where(diagonal, 1.0, 0.5 ** 0.5).to(dtype)
    basis[rows * rank + cols, position] = weight.to(device)
    basis[cols * rank + rows, position] = weight.to(device)
    return basis


@dataclass
class PairRidgeSolution:
    """The inner solution of one column chunk and solver facts.

    ``table`` is ``[N, 2c]`` = ``[a | b]``, ``interactions`` ``[q, c]`` the pair coefficients of each
    test example in the coordinates of the features (``w`` for :func:`symmetric_basis` features,
    ``V = E w``), ``residual`` ``[S, c]`` = ``y - prediction``.
    """

    table: torch.Tensor
    interactions: torch.Tensor
    residual: torch.Tensor
    iterations: int
    max_relative_residual: float


def linear_block_inverse(design: BatchDesign, previous: torch.Tensor, ridge: float) -> torch.Tensor:
    """``[3, N, c]``: the inverse ``(inv_aa, inv_ab, inv_bb)`` of every ``(a, b)`` diagonal ``2 x 2`` block.

    The blocks ``[[sum x^2 l^2 + lambda, sum x^2 l], [sum x^2 l, sum x^2 + lambda]]`` depend only
    on the design and the previous losses, so one chunk's can serve many solves.
    """
    num_cols = previous.shape[1]
    d_bb = design.rmatmul(torch.ones_like(previous[:, :1]), squared=True) + ridge
    moments = design.rmatmul(torch.cat([previous * previous, previous], dim=1), squared=True)
    d_aa, d_ab = moments[:, :num_cols] + ridge, moments[:, num_cols:]
    determinant = d_aa * d_bb - d_ab * d_ab
    return torch.stack([d_bb.expand_as(d_aa) / determinant, -d_ab / determinant, d_aa / determinant])


def solve_pair_ridge(design: BatchDesign, features: torch.Tensor, previous: torch.Tensor, target: torch.Tensor,
                     ridge: float, pair_ridge: float, tol: float = 1e-6, max_iter: int = 500,
                     initial: torch.Tensor | None = None,
                     block_inverse: torch.Tensor | None = None) -> PairRidgeSolution:
    r"""Exact ``(a, b, V)`` for fixed pair features, for every column of ``target``.

    For test example ``m`` with ``z_s = [l_s x_s;\, x_s;\, f_s]`` the normal equations of

    .. math::

        \min_{a, b, v}\; \sum_s \big(y_s - l_s x_s^\top a - x_s^\top b - f_s^\top v\big)^2
            + \lambda (\lVert a\rVert^2 + \lVert b\rVert^2) + \mu \lVert v\rVert^2

    are solved by conjugate gradient on all columns together (as
    :func:`~simfluence.simulators.ridge.solve_transition_ridge`, plus the ``q`` pair unknowns).
    A matrix-vector product costs two sparse products with ``X`` (``O(nnz(X) c)``) and two dense
    ones with ``F`` (``O(S q c)``). The preconditioner inverts each (training example, test
    example) ``2 x 2`` block of ``(a, b)`` and the ``V`` block ``F^T F + mu I`` (shared by all
    columns) exactly.

    Args:
        design: ``X`` ``[S, N]``.
        features: ``F`` ``[S, q]``, the pair features of each transition (``q = k (k + 1) / 2``
            for :func:`symmetric_basis` coordinates; any full-column-rank features work).
        previous: ``l`` ``[S, c]``.
        target: ``y`` ``[S, c]``.
        ridge: ``lambda > 0`` on ``(a, b)``.
        pair_ridge: ``mu > 0`` on ``V``.
        tol: stop when every column's normal-equation residual is below ``tol`` times its
            right-hand side's.
        max_iter: iteration cap.
        initial: warm start ``[N, 2c]`` for ``(a, b)``; ``V`` starts at its exact value for it.
        block_inverse: :func:`linear_block_inverse` of ``(design, previous, ridge)``, if already known.
    """
    num_cols = target.shape[1]
    dtype, device = target.dtype, target.device
    inverse = linear_block_inverse(design, previous, ridge) if block_inverse is None else block_inverse
    exact = features.to(torch.float64)  # the small Gram matrix in float64: F's columns can be near-collinear
    gram = exact.T @ exact + pair_ridge * torch.eye(features.shape[1], dtype=torch.float64, device=device)
    cholesky = torch.linalg.cholesky(gram)
    scratch = torch.empty(design.num_train, 2 * num_cols, dtype=dtype, device=device)

    def normal(table: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Z^T Z + R) w`` for ``w = (table, pairs)``: two sparse products with ``X``, two dense with ``F``."""
        summed = design.matmul(table)
        prediction = summed[:, num_cols:].addcmul_(summed[:, :num_cols], previous).addmm_(features, pairs)
        torch.mul(prediction, previous, out=summed[:, :num_cols])
        return (design.rmatmul(summed).add_(table, alpha=ridge),
                torch.addmm(pairs, features.T, prediction, beta=pair_ridge))

    def column_dot(x: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.mul(x[0], y[0], out=scratch).sum(0).view(2, num_cols).sum(0) + (x[1] * y[1]).sum(0)

    def precondition(residual: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        r_a, r_b = residual[0][:, :num_cols], residual[0][:, num_cols:]
        torch.mul(r_a, inverse[0], out=out[:, :num_cols]).addcmul_(r_b, inverse[1])
        torch.mul(r_b, inverse[2], out=out[:, num_cols:]).addcmul_(r_a, inverse[1])
        return out, torch.cholesky_solve(residual[1].to(torch.float64), cholesky).to(residual[1].dtype)

    table = (torch.zeros(design.num_train, 2 * num_cols, dtype=dtype, device=device) if initial is None
             else initial.to(dtype=dtype, device=device).clone())
    # Start V at its exact value for the starting (a, b) (one block step): from a warm start whose
    # V is 0 and whose (a, b) already meet ``tol``, conjugate gradient would otherwise never move V.
    summed = design.matmul(table)
    prediction = summed[:, num_cols:].addcmul_(summed[:, :num_cols], previous)           # l X a + X b
    pairs = torch.cholesky_solve((features.T @ (target - prediction)).to(torch.float64), cholesky).to(dtype)
    weights = (table, pairs)
    # The normal-equation residual Z^T y - (Z^T Z + R) w, and its right-hand side's norm per column.
    prediction.addmm_(features, pairs).sub_(target)
    torch.mul(prediction, previous, out=summed[:, :num_cols])
    residual = (design.rmatmul(summed).add_(table, alpha=ridge).neg_(),
                torch.addmm(pairs, features.T, prediction, beta=pair_ridge).neg_())
    rhs_norm = (design.rmatmul(torch.cat([target * previous, target], dim=1)).square().sum(0).view(2, num_cols).sum(0)
                + (features.T @ target).square().sum(0)).sqrt()
    tiny = torch.finfo(dtype).tiny
    rhs_norm.clamp_min_(tiny)
    preconditioned = precondition(residual, torch.empty_like(weights[0]))
    direction = (preconditioned[0].clone(), preconditioned[1].clone())
    rho = column_dot(residual, preconditioned)
    relative = column_dot(residual, residual).sqrt() / rhs_norm
    iterations = 0
    while iterations < max_iter and float(relative.max()) > tol:
        product = normal(*direction)
        curvature = column_dot(direction, product)
        # Converged columns have a zero direction: keep them where they are.
        step = torch.where(curvature > 0, rho / curvature.clamp_min(tiny), 0.0)
        weights[0].view(-1, 2, num_cols).addcmul_(direction[0].view(-1, 2, num_cols), step)
        weights[1].addcmul_(direction[1], step)
        residual[0].view(-1, 2, num_cols).addcmul_(product[0].view(-1, 2, num_cols), step, value=-1)
        residual[1].addcmul_(product[1], step, value=-1)
        del product
        preconditioned = precondition(residual, preconditioned[0])
        rho_next = column_dot(residual, preconditioned)
        momentum = torch.where(rho > 0, rho_next / rho.clamp_min(tiny), 0.0)
        direction[0].view(-1, 2, num_cols).mul_(momentum).add_(preconditioned[0].view(-1, 2, num_cols))
        direction[1].mul_(momentum).add_(preconditioned[1])
        rho = rho_next
        relative = column_dot(residual, residual).sqrt() / rhs_norm
        iterations += 1
    summed = design.matmul(weights[0])
    error = target - summed[:, num_cols:].addcmul_(summed[:, :num_cols], previous).addmm_(features, weights[1])
    return PairRidgeSolution(weights[0], weights[1], error, iterations, float(relative.max()))


@dataclass(frozen=True)
class PairwiseConfig(LinearConfig):
    """Settings of ``linear-pairwise``: linear-identity's and those of the pair terms."""

    rank: int = setting(4, "k, the size of the training-example embeddings u_i.")
    window: int | None = setting(None, "Earlier steps whose examples pair with a step's examples; None: every "
                                 "earlier step of the run, 0: only within a batch.")
    pair_ridge: float | None = setting(None, "mu, the penalty on |U|^2 + |V|^2 (absolute); None: a tenth of the "
                                       "linear ridge strength.")
    rounds: int = setting(10, "Rounds of the fitting path; with validate_rounds, the most that are used.")
    lbfgs_iterations: int = setting(3, "L-BFGS iterations on U per round.")
    init_scale: float = setting(0.1, "Standard deviation of the random initial U.")
    validate_rounds: bool = setting(True, "Choose the number of rounds (0 to rounds; 0 is linear-identity) by "
                                    "cv_folds-fold validation over the fitting runs; else use all rounds.")
    spearman_tolerance: float = setting(0.005, "How far below linear-identity's the mean validation across-run "
                                        "Spearman of a round may be for the round to be chosen.")
    patience: int = setting(2, "A validation fold's path stops after this many rounds without a better round.")
    inner_tol: float = setting(1e-3, "Relative residual at which the inner (a, b, V) solves stop.")
    batch_mean: bool = setting(False, "Not for linear-pairwise: its pair terms are sums over the batch, so its "
                               "linear part is too.")
    nest_mean: bool = setting(False, "Not for linear-pairwise: the mean-trajectory blend of linear's "
                              "cross-validation is chosen for the plain recurrence, not for its rollout with pair "
                              "terms, so its rollout is never blended.")

    renamed: ClassVar[Mapping[str, str]] = {**LinearConfig.renamed, "steps": "lbfgs_iterations",
                                            "validate": "validate_rounds"}
    retired: ClassVar[Mapping[str, Any]] = {"learning_rate": None}  # earlier fits' L-BFGS step; line search now

    def validate(self) -> None:
        """Linear's checks, and those of the pair terms."""
        super().validate()
        for name in ("rank", "rounds", "lbfgs_iterations", "patience"):
            self._set(name, integer(name, getattr(self, name), 1))
        if self.window is not None:
            self._set("window", integer("window", self.window, 0, " or None (all earlier steps)"))
        self._set("pair_ridge", positive("pair_ridge", self.pair_ridge, allow_none=True))
        self._set("init_scale", positive("init_scale", self.init_scale))
        self._set("spearman_tolerance", positive("spearman_tolerance", self.spearman_tolerance, allow_zero=True))
        self._set("inner_tol", positive("inner_tol", self.inner_tol))
        self._set("validate_rounds", boolean("validate_rounds", self.validate_rounds))
        if self.batch_mean:
            raise UsageError("batch_mean: linear-pairwise sums its effects over the batch; only False is accepted")
        if self.nest_mean:
            raise UsageError("nest_mean: linear-pairwise's rollout (pair terms) is not blended with the mean "
                             "trajectory; only False is accepted")


@register
class PairwiseSimulator(LinearIdentitySimulator):
    """``linear-pairwise``: Linear-identity plus low-rank pair terms (module docstring).

    Args:
        rank: ``k``, the size of the training-example embeddings ``u_i``.
        window: earlier steps whose examples pair with a step's examples; ``None`` pairs
            with every earlier step of the run, ``0`` only within a batch.
        pair_ridge: ``mu``, the penalty on ``|U|^2 + |V|^2``; ``None``: a tenth of the Linear
            ridge strength.
        rounds: rounds of the fitting path (module docstring); with ``validate``, the most
            that are used.
        lbfgs_iterations: L-BFGS iterations on ``U`` per round (``steps`` before).
        init_scale: standard deviation of the random initial ``U``.
        validate_rounds: choose the number of rounds (0 to ``rounds``; 0 is plain linear-identity)
            by ``cv_folds``-fold validation over the fitting runs (:meth:`_validate_rounds`),
            then refit on all runs. Without it all ``rounds`` are used.
        spearman_tolerance: how far below linear-identity's the mean validation across-run
            Spearman of a round may be for the round to be chosen.
        patience: a validation fold's path stops after this many rounds without a better
            eligible round.
        inner_tol: relative residual at which the inner ``(a, b, V)`` solves stop. The
            L-BFGS gradient is exact only at the inner optimum; ``1e-3`` changes the fits
            of the benchmarks by less than their noise and needs about half the iterations
            of ``1e-5``.
        dtype: ``"float32"`` (as ``linear-identity``, so that round 0 is its fit) or
            ``"float64"``. The L-BFGS state, the ``k(k+1)/2`` Gram matrix of the pair
            features and the objective's sums are float64 either way.
        **linear: the arguments of :class:`~simfluence.simulators.linear.LinearSimulator`
            (``cg_max_iter`` also caps the inner solves); ``seed`` also seeds ``U``'s
            initialisation, and the validation folds are those of the ridge cross-validation.
    """

    kind = "linear-pairwise"
    capabilities = Capabilities("extension", ridge=True, cross_validation=True, device=True, precision=True,
                                transitions=True)

    config_class = PairwiseConfig
    config: PairwiseConfig

    def __init__(self, config: PairwiseConfig | None = None, **settings: Any):
        super().__init__(config, **settings)
        self.embeddings: torch.Tensor = None  # type: ignore[assignment]  # U [N, k]; fitted state
        self.interactions: torch.Tensor = None  # type: ignore[assignment]  # V [k * k, M], each k x k symmetric

    # --- fitting ------------------------------------------------------------------
    def _fit(self, runs: RunSet) -> None:
        super()._fit(runs)  # linear-identity: ridge by cross-validation, the round-0 (a, b)
        ridge = float(self.fit_info["ridge"])
        pair_ridge = 0.1 * ridge if self.config.pair_ridge is None else self.config.pair_ridge
        linear_table, rounds = self.table, self.config.rounds
        if self.config.validate_rounds and runs.num_runs >= 2:
            rounds, mse, rho = self._validate_rounds(runs, linear_table, ridge, pair_ridge)
            self.fit_info.update(validation_mse_per_round=mse, validation_spearman_per_round=rho)
        history = self._path(runs, linear_table, rounds, ridge, pair_ridge) if rounds else []
        if not rounds:
            self._install(linear_table, None, None, runs.num_test)
        self.fit_info.update(pair_ridge=float(pair_ridge), rounds_used=rounds, transition_mse_per_round=history)

    def _validate_rounds(self, runs: RunSet, linear_table: torch.Tensor, ridge: float,
                         pair_ridge: float) -> tuple[int, list[float], list[float]]:
        """Choose the number of rounds by K-fold validation over the fitting runs.

        The folds are those of the ridge cross-validation (``cv_folds``, ``seed``). On each, the
        path is fitted on the other runs and every round is rolled out on the fold: the
        all-steps MSE of each validation run and the fold's across-run Spearman of the final
        loss (:func:`_validation_scores`). A fold's path stops once ``patience`` rounds in a row
        did not lower its best eligible MSE. Round by round, up to the last round that every
        fold reached, the runs' errors are pooled and the Spearman averaged over the folds;
        :meth:`_choose_rounds` then picks the round.

        Args:
            runs: the fitting runs.
            linear_table: linear-identity's ``[N, 2M]`` table on all of them (a warm start).
            ridge: ``lambda``.
            pair_ridge: ``mu``.

        Returns:
            The chosen round and the validation MSE and mean Spearman of each round.
        """
        folds = run_folds(runs.num_runs, self.config.cv_folds, self.config.seed)
        per_fold: list[list[tuple[np.ndarray, float]]] = []
        for fold in folds:  # rounds past one that an earlier fold stopped at cannot be chosen: not fitted
            limit = min([self.config.rounds] + [len(scores) - 1 for scores in per_fold])
            per_fold.append(self._fold_scores(runs, fold, linear_table, ridge, pair_ridge, limit))
        pooled: list[tuple[np.ndarray, float]] = []
        for r in range(min(len(scores) for scores in per_fold)):
            rhos = np.array([scores[r][1] for scores in per_fold])
            rho = float(rhos[np.isfinite(rhos)].mean()) if np.isfinite(rhos).any() else float("nan")
            pooled.append((np.concatenate([scores[r][0] for scores in per_fold]), rho))
        return (self._choose_rounds(pooled, significant=True), [float(errors.mean()) for errors, _ in pooled],
                [rho for _, rho in pooled])

    def _fold_scores(self, runs: RunSet, fold: np.ndarray, linear_table: torch.Tensor, ridge: float,
                     pair_ridge: float, rounds: int) -> list[tuple[np.ndarray, float]]:
        """Validation scores on runs ``fold`` of rounds ``0..rounds`` fitted on the others (fewer: patience)."""
        validation = runs.select(np.sort(fold))
        rest = runs.select(np.setdiff1d(np.arange(runs.num_runs), fold))
        start, _ = self._solve(Transitions.of(rest), ridge, initial=linear_table)
        scores: list[tuple[np.ndarray, float]] = []

        def score_round() -> bool:
            predicted = self._simulate(validation.curricula, validation.initial_losses.astype(np.float64))
            scores.append(_validation_scores(predicted, validation))
            return len(scores) - 1 - self._choose_rounds(scores) >= self.config.patience  # no better round for a while

        self._install(start, None, None, runs.num_test)
        score_round()                                                                 # round 0
        if rounds:
            self._path(rest, start, rounds, ridge, pair_ridge, score_round)
        return scores

    def _choose_rounds(self, scores: list[tuple[np.ndarray, float]], significant: bool = False) -> int:
        r"""The round to keep from validation scores ``(errors [R_val], across-run Spearman)`` per round.

        Round 0 is linear-identity. A round is eligible when its Spearman is at least round 0's
        minus ``spearman_tolerance``, so that the pair terms may not trade the ranking of
        curricula for a lower error (without a Spearman for round 0, fewer than 3 validation
        runs, every round is eligible). With ``significant`` it must also lower the validation
        MSE by at least 1 % (``_MIN_GAIN``) and by two standard errors of the per-run
        differences ``d_j = e^0_j - e^r_j``, ``ar d \ge 2\, s_d / \sqrt{n}``: gains that a few
        runs make are noise. The eligible round with the least MSE is chosen, else round 0.
        """
        baseline, reference = scores[0]
        best, least = 0, float(baseline.mean())
        for r, (errors, rho) in enumerate(scores[1:], start=1):
            mse = float(errors.mean())
            tolerance = self.config.spearman_tolerance
            eligible = not np.isfinite(reference) or (np.isfinite(rho) and rho >= reference - tolerance)
            if significant and eligible:
                gain = baseline - errors
                spread = float(gain.std(ddof=1)) / np.sqrt(gain.size) if gain.size > 1 else float("inf")
                eligible = float(gain.mean()) >= max(_MIN_GAIN * float(baseline.mean()), 2 * spread)
            if eligible and mse < least:
                best, least = r, mse
        return best

    def _install(self, table: torch.Tensor, embeddings: torch.Tensor | None, interactions: torch.Tensor | None,
                 num_test: int) -> None:
        """Make ``(table, U, V)`` the fitted state (``U = 0``, ``V = 0`` for linear-identity)."""
        dtype, device = table.dtype, table.device
        self.table = table.clone()
        rank = self.config.rank
        self.embeddings = (torch.zeros(table.shape[0], rank, dtype=dtype, device=device) if embeddings is None
                           else embeddings.detach().clone())
        self.interactions = (torch.zeros(rank * rank, num_test, dtype=dtype, device=device)
                             if interactions is None else interactions.clone())

    def _column_chunk(self, num_transitions: int, num_train: int, num_test: int) -> int:
        """Test examples per chunk: the inner solver's working set stays within ``_WORKING_BYTES``."""
        itemsize = torch.finfo(_DTYPES[self.config.dtype]).bits // 8
        per_column = itemsize * (16 * num_transitions + 16 * num_train + 6 * self.config.rank ** 2)  # incl. temporaries
        return int(max(1, min(num_test, _WORKING_BYTES // per_column)))

    def _path(self, runs: RunSet, table: torch.Tensor, rounds: int, ridge: float, pair_ridge: float,
              after_round: Callable[[], bool] | None = None) -> list[float]:
        """Fit ``rounds x steps`` L-BFGS iterations of ``U`` from ``table`` (module docstring).

        Sets the fitted state after every round, then calls ``after_round``, which stops the
        path by returning ``True``. Returns the teacher-forced one-step MSE after each round.
        """
        dtype, device = _DTYPES[self.config.dtype], torch.device(self.config.device)
        transitions = Transitions.of(runs)
        design = BatchDesign(transitions.batches, runs.num_train, device)
        feature_map = PairFeatureMap(runs.curricula, runs.num_train, self.config.window, device,
                                     steps=runs.eval_steps[transitions.pairs])
        num_train, num_test, width = runs.num_train, runs.num_test, self.config.rank * self.config.rank
        basis = symmetric_basis(self.config.rank, dtype, device)  # [k^2, q]: the solver works on w, V = E w
        chunk = self._column_chunk(transitions.num_transitions, num_train, num_test)
        chunks = [slice(start, min(start + chunk, num_test)) for start in range(0, num_test, chunk)]
        cached: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def columns(index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """``(previous, target, block inverse)`` of a chunk; kept when there is only one chunk."""
            if index in cached:
                return cached[index]
            previous, current = (torch.as_tensor(x, dtype=dtype, device=device)
                                 for x in transitions.columns(chunks[index]))
            data = (previous, current - previous, linear_block_inverse(design, previous, ridge))
            if len(chunks) == 1:
                cached[index] = data
            return data

        generator = torch.Generator().manual_seed(self.config.seed)
        rank = self.config.rank
        initial = torch.randn(num_train, rank, generator=generator, dtype=torch.float64) * self.config.init_scale
        # The inner solution of the last evaluation: the warm start of the next one.
        state: dict[str, Any] = {"table": table.to(device, dtype).clone(), "x": None, "error": 0.0,
                                 "interactions": torch.zeros(basis.shape[1], num_test, dtype=dtype, device=device)}
        history: list[float] = []
        evaluations = iterations = inner_iterations = 0
        stopped = False

        def evaluate(x: np.ndarray) -> tuple[float, np.ndarray]:
            """``J(U)`` and its gradient; solves ``(a, b, V)`` for ``U`` chunk by chunk (warm-started)."""
            nonlocal evaluations, inner_iterations
            evaluations += 1
            embeddings = torch.as_tensor(x, dtype=dtype, device=device).view(num_train, rank).requires_grad_()
            features = feature_map(embeddings).reshape(-1, width) @ basis   # g = F E, [S, q]
            fixed = features.detach()
            objective = pair_ridge * float(np.square(x).sum())
            grad_features = torch.zeros_like(fixed)
            squared_error = 0.0
            for index, cols in enumerate(chunks):
                previous, target, block_inverse = columns(index)
                table_cols = state["table"].view(num_train, 2, num_test)[:, :, cols].reshape(num_train, -1)
                solution = solve_pair_ridge(design, fixed, previous, target, ridge, pair_ridge, self.config.inner_tol,
                                            self.config.cg_max_iter, table_cols, block_inverse)
                inner_iterations += solution.iterations
                state["table"].view(num_train, 2, num_test)[:, :, cols] = solution.table.view(num_train, 2, -1)
                state["interactions"][:, cols] = solution.interactions
                error = float(solution.residual.square().sum(dtype=torch.float64))
                squared_error += error
                objective += (error + ridge * float(solution.table.square().sum(dtype=torch.float64))
                              + pair_ridge * float(solution.interactions.square().sum(dtype=torch.float64)))
                grad_features.addmm_(solution.residual, solution.interactions.T, alpha=-2.0)
            # Through a scalar: passing grad_outputs would import torch.fx's symbolic shapes (0.5 s) on first use.
            (gradient,) = torch.autograd.grad((features * grad_features).sum(), embeddings)
            gradient = gradient + 2 * pair_ridge * embeddings.detach()
            state.update(x=x.copy(), error=squared_error)
            return objective, gradient.cpu().numpy().astype(np.float64).ravel()

        def checkpoint(x: np.ndarray) -> None:
            """Install the state at ``x`` as the next round's fit; ``after_round`` may stop the path."""
            nonlocal stopped
            if state["x"] is None or not np.array_equal(state["x"], x):
                evaluate(x)  # the state belongs to the last evaluation; L-BFGS-B ends iterations on it
            embeddings = torch.as_tensor(x, dtype=dtype, device=device).view(num_train, self.config.rank)
            self._install(state["table"], embeddings, basis @ state["interactions"], num_test)
            history.append(state["error"] / (transitions.num_transitions * num_test))
            if after_round is not None and after_round():
                stopped = True

        def callback(intermediate_result: scipy.optimize.OptimizeResult) -> None:
            nonlocal iterations
            iterations += 1
            bar.update()
            if iterations % self.config.lbfgs_iterations == 0:
                checkpoint(intermediate_result.x)
            if stopped or len(history) >= rounds:
                raise StopIteration  # ends L-BFGS-B (scipy >= 1.11)

        total = rounds * self.config.lbfgs_iterations
        with progress_bar(total=total, desc="fit linear-pairwise", unit="iteration", leave=False) as bar:
            result = scipy.optimize.minimize(evaluate, initial.numpy().ravel(), jac=True, method="L-BFGS-B",
                                             callback=callback, options={"maxiter": total,
                                                                         "maxcor": 20, "ftol": 1e-12, "gtol": 1e-10})
        while not stopped and len(history) < rounds:  # converged early: later rounds are the converged fit
            checkpoint(result.x)
        self.fit_info.update(lbfgs_iterations=iterations, lbfgs_evaluations=evaluations,
                             inner_iterations=inner_iterations, column_chunk=chunk)
        return history

    # --- prediction ---------------------------------------------------------------
    def pair_terms(self, curricula: np.ndarray) -> np.ndarray:
        """float64 ``[R, T, M]``: ``gamma_t`` of every step for validated curricula ``[R, T, B]``."""
        self._check_fitted()
        with torch.no_grad():
            features = pair_features(self.embeddings, curricula, self.config.window)
            return (features @ self.interactions).cpu().numpy().astype(np.float64)

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        num_runs, num_steps, _ = curricula.shape
        num_train, num_test = self.table.shape[0], self.test_ids.size
        if not bool(self.interactions.any()):  # linear-identity (round 0): no pair term to add
            return rollout(self.table, curricula, initial, self.alpha_offset, self.fit_alpha)
        with torch.no_grad():
            gamma = (pair_features(self.embeddings, curricula, self.config.window) @ self.interactions)
        # gamma does not depend on the loss, so each step's gamma is the b-row of one extra
        # "example" (a = 0) trained on at that step only: the Linear rollout then adds it.
        extra = torch.cat([torch.zeros_like(gamma), gamma], dim=2).reshape(-1, 2 * num_test)
        table = torch.cat([self.table, extra.to(self.table.dtype)])
        extra_ids = num_train + np.arange(num_runs * num_steps).reshape(num_runs, num_steps, 1)
        return rollout(table, np.concatenate([curricula, extra_ids], axis=2), initial, self.alpha_offset,
                       self.fit_alpha)

    # --- persistence --------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {**super()._arrays(), "embeddings": self.embeddings.cpu().numpy(),
                "interactions": self.interactions.cpu().numpy()}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        super()._restore(arrays)
        embeddings, interactions = arrays["embeddings"], arrays["interactions"]
        if embeddings.shape != (self.train_ids.size, self.config.rank):
            raise ValueError(f"embeddings has shape {embeddings.shape}, "
                             f"expected {(self.train_ids.size, self.config.rank)}")
        if interactions.shape != (self.config.rank * self.config.rank, self.test_ids.size):
            raise ValueError(f"interactions has shape {interactions.shape}, "
                             f"expected {(self.config.rank * self.config.rank, self.test_ids.size)}")
        self.embeddings = torch.as_tensor(embeddings, device=self.table.device)
        self.interactions = torch.as_tensor(interactions, device=self.table.device)


def _validation_scores(predicted: np.ndarray, runs: RunSet) -> tuple[np.ndarray, float]:
    """Per-run all-steps MSE ``[R]`` and across-run Spearman of rolled-out ``[R, T + 1, M]`` predictions.

    Each run's error is the mean over test examples and recorded steps after 0 (their mean is
    :func:`~simfluence.simulators.linear.all_steps_mse`; ``inf`` where not finite). The Spearman
    is the mean over test examples of the rank correlation across runs of the loss at the last
    recorded step, as :func:`simfluence.evaluate.score` reports it (NaN with fewer than 3 runs
    or where no prediction varies).
    """
    from simfluence.evaluate import spearman  # here: simfluence.evaluate imports the simulators

    with np.errstate(over="ignore", invalid="ignore"):
        squared = (predicted[:, runs.eval_steps[1:]].astype(np.float64) - runs.losses[:, 1:]) ** 2
        errors = squared.mean(axis=(1, 2))
    errors[~np.isfinite(errors)] = np.inf
    if runs.num_runs < 3:
        return errors, float("nan")
    final = predicted[:, runs.eval_steps[-1]].astype(np.float64)  # the last recorded step, as score() takes it
    rho = spearman(final, runs.losses[:, -1].astype(np.float64), axis=0)
    finite = rho[np.isfinite(rho)]
    return errors, float(finite.mean()) if finite.size else float("nan")
