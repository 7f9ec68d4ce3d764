r"""Simfluence-Linear: a per-step linear recurrence on each test example's loss.

For test example ``m`` and a step that trains on batch ``c_t``:

.. math::

    L_t = \alpha(c_t)\, L_{t-1} + \beta(c_t), \qquad
    \alpha(c_t) = \alpha_0 + \sum_{i \in c_t} A_i, \qquad \beta(c_t) = \sum_{i \in c_t} B_i

with one ``(A_i, B_i)`` per training example and test example.

* ``linear`` (the paper): ``alpha_0 = 0``; ridge pulls every ``A_i`` towards 0.
* ``linear-identity``: ``alpha_0 = 1``, so ridge pulls towards "this step changes nothing";
  usually the safer default. It regresses ``L_t - L_{t-1}`` on the same features.

Coefficients are fitted by ridge regression on teacher-forced transitions ``(L_{t-1}, c_t) -> L_t``
of the fitting runs (all test examples at once, :mod:`simfluence.simulators.ridge`), and
trajectories are predicted by rolling the recurrence out from the observed ``L_0``.
When ``ridge`` is not given it is chosen by K-fold cross-validation over the fitting runs,
scoring the rolled-out all-steps MSE on each held-out fold (:func:`cross_validate`). The grid
is ``ridge_grid`` times the mean number of times a training example was trained on; when the
best value lies on an edge of the grid, the grid is extended past that edge (at most
``max_extensions`` values per side), so the data, not the grid, bounds the choice.

**Nesting the mean trajectory** (``nest_mean``, on by default, only with a cross-validated
ridge). The prediction is the recurrence's rollout ``\hat L_t`` shrunk towards the
mean-trajectory baseline ``\mu_t = L_0 + \bar\Delta_t`` (``\bar\Delta``: the fitting runs' mean
loss change, ``mean_change``) by a weight ``w_m \in [0, 1]`` per test example:

.. math::

    \tilde L^m_t = \mu^m_t + w_m\,(\hat L^m_t - \mu^m_t)

``w_m = 1`` is the plain recurrence, ``w_m = 0`` the mean trajectory, so the model nests that
baseline. ``w`` is chosen in the ridge's cross-validation at no extra fit: on fold ``f`` (fitting
runs ``F_f``, held-out runs ``H_f``) with ``\mu_f`` the mean trajectory of ``F_f`` from the held-out
``L_0`` and ``p`` the rolled-out prediction of the table fitted on ``F_f``, per grid value and
test example

.. math::

    S_{bb} = \sum_f \frac{1}{K n_f} \sum_{r \in H_f, t \ge 1} (p - \mu_f)^2, \qquad
    S_{ab} = \sum_f \frac{1}{K n_f} \sum_{r \in H_f, t \ge 1} (p - \mu_f)(\mu_f - L)

(``n_f``: the fold's held-out (run, recorded step) pairs, so a fold weighs as in the plain
criterion), and ``w_m = \mathrm{clip}(-S_{ab} / S_{bb}, 0, 1)`` (1 where ``S_{bb} = 0``) minimises
the fold-averaged blended squared error ``S_{aa} + 2 w S_{ab} + w^2 S_{bb}``. The ridge chosen
is the grid value whose blended error (test examples scaled by :func:`example_scales`) is least;
the final table is refitted on all fitting runs and keeps that value's ``w``
(``blend_``, with ``\mu`` from all fitting runs at prediction time).

**Loss spaces** (``space``; ``linear``, ``linear-identity`` and ``additive``). The recurrence can
run on :math:`z = \log L` (``"log"``) or :math:`z = \log(e^L - 1)` (``"margin"``, minus a
cross-entropy's margin, in which training moves a classifier about linearly) instead of
:math:`L` (:mod:`simfluence.func.spaces`): the ridge is fitted on the transitions of :math:`z`,
the rollout :math:`\hat z` is mapped back, :math:`\hat L = \mathrm{softplus}(\hat z)` or
:math:`e^{\hat z}` (within ``[0, 2 x`` the largest fitting loss``]``), and only then blended with the
mean trajectory (in loss units, so ``w = 0`` is still the baseline itself). ``"auto"`` (the default)
runs the cross-validation above once per space, each scored on loss-unit errors, and keeps the
space whose chosen ridge's criterion is least (``log`` and ``margin`` only where every fitting
loss is positive; ``loss`` when the ridge is given, as nothing is cross-validated then).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn.functional import embedding_bag

from simfluence.func.spaces import (
    SPACES,
    UNBOUNDED,
    candidate_spaces,
    check_initial,
    control_variate_mean,
    from_space,
    loss_bounds,
    to_space,
)
from simfluence.runs.log import RunDataError, RunSet
from simfluence.simulators.base import (
    Capabilities,
    Simulator,
    mean_change,
    mean_prediction,
    pool_curricula,
    register,
    run_folds,
)
from simfluence.simulators.config import SimulatorConfig, boolean, integer, one_of, positive, positive_grid, setting
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.ridge import solve_transition_ridge

DEFAULT_RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_EXTENSIONS = 3
"""Values :func:`cross_validate` may add past each edge of a grid whose best value lies on it."""
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_WORKING_BYTES = 2 << 30  # solver working set per column chunk


def transition_pairs(eval_steps: np.ndarray) -> np.ndarray:
    """Eval indices ``k`` with ``eval_steps[k + 1] == eval_steps[k] + 1``: the one-step transitions recorded."""
    return np.flatnonzero(np.diff(eval_steps) == 1)


def in_space(runs: RunSet, space: str) -> RunSet:
    """``runs`` with their losses in ``space`` (``runs`` itself for ``"loss"``)."""
    if space == "loss":
        return runs
    return replace(runs, losses=to_space(runs.losses.astype(np.float64), space).astype(np.float32))


@dataclass(frozen=True)
class Transitions:
    """Teacher-forced one-step transitions of a run set.

    ``batches`` is int ``[S, B]``; :meth:`columns` gives the previous and next losses
    ``[S, M']`` for a subset of test examples, so large problems never hold all of them twice.
    """

    batches: np.ndarray
    runs: RunSet
    pairs: np.ndarray  # eval indices k with eval_steps[k + 1] == eval_steps[k] + 1

    @classmethod
    def of(cls, runs: RunSet, source: str = "<runs>") -> Transitions:
        """The transitions of ``runs``; ``source`` names them in errors."""
        steps = runs.eval_steps
        pairs = transition_pairs(steps)
        if pairs.size == 0:
            raise RunDataError(source, "eval_steps", "has no two consecutive steps, so no one-step transition "
                               "can be fitted", "record losses after every step (or at least some consecutive ones)")
        batches = runs.curricula[:, steps[pairs], :]  # the batch of step t = eval_steps[k] + 1
        return cls(batches.reshape(-1, runs.batch_size), runs, pairs)

    @property
    def num_transitions(self) -> int:
        """Number of transitions ``S``."""
        return int(self.batches.shape[0])

    def columns(self, cols: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Previous and next losses ``[S, M']`` of the test examples ``cols``."""
        losses = self.runs.losses[:, :, cols]
        width = losses.shape[-1]
        previous = losses[:, self.pairs].reshape(-1, width)
        current = losses[:, self.pairs + 1].reshape(-1, width)
        return previous, current


def rollout(
    table: torch.Tensor, curricula: np.ndarray, initial: np.ndarray, alpha_offset: float, fit_alpha: bool,
    steps_per_block: int = 8, batch_size: int | None = None,
) -> np.ndarray:
    r"""Roll ``L_t = (alpha_offset + X_t A) L_{t-1} + X_t B`` out from ``initial``.

    Args:
        table: ``[N, 2M]`` = ``[A | B]`` when ``fit_alpha``, else ``[N, M]`` = ``B`` (``alpha`` is 1).
        curricula: int ``[R, T, B]``, ``-1`` pads.
        initial: ``[R, M]`` losses before training.
        alpha_offset: ``alpha_0`` above (ignored without ``fit_alpha``).
        fit_alpha: whether ``table`` holds ``A`` (else ``alpha`` is 1).
        steps_per_block: steps whose coefficients are gathered at once; a few steps keep
            the gathered block in cache, which is faster than gathering all steps first.
        batch_size: the batch size the coefficients were fitted at: a step of ``k < n``
            examples weighs each ``n / k`` (batch-mean loss, :class:`BatchDesign`); ``None``: sums.

    Returns:
        float32 ``[R, T + 1, M]``.
    """
    num_runs, num_steps, width = curricula.shape
    num_test = initial.shape[1]
    index = torch.as_tensor(np.ascontiguousarray(curricula), dtype=torch.int64, device=table.device)
    out = torch.empty(num_runs, num_steps + 1, num_test, dtype=table.dtype, device=table.device)
    out[:, 0] = torch.as_tensor(initial, dtype=table.dtype, device=table.device)
    for start in range(0, num_steps, steps_per_block):
        span = min(steps_per_block, num_steps - start)
        block = index[:, start:start + span].reshape(-1, width)
        full = bool((block >= 0).all()) and (batch_size is None or width == batch_size)
        if full:  # the common case: full batches, one fused gather-sum
            coefficients = embedding_bag(block, table, mode="sum")
        else:
            coefficients = BatchDesign(block, table.shape[0], table.device, batch_size).matmul(table)
        coefficients = coefficients.view(num_runs, span, -1)
        for k in range(span):
            t = start + k
            if fit_alpha:
                alpha = coefficients[:, k, :num_test] + alpha_offset
                torch.addcmul(coefficients[:, k, num_test:], alpha, out[:, t], out=out[:, t + 1])
            else:
                torch.add(out[:, t], coefficients[:, k], out=out[:, t + 1])
    return out.to("cpu", torch.float32).numpy()


def all_steps_mse(predicted: np.ndarray, runs: RunSet) -> float:
    """Mean squared error over runs, test examples and recorded steps after 0."""
    return float(np.mean((predicted[:, runs.eval_steps[1:]] - runs.losses[:, 1:]) ** 2, dtype=np.float64))


def example_scales(runs: RunSet, cap: float = 3.0) -> np.ndarray:
    """float64 ``[M]``: what each test example's cross-validation errors are divided by.

    1 for every test example whose losses spread across the fitting runs (mean squared deviation
    from the per-step mean, steps ``1..``) at most ``cap`` times the median example's, so for
    ordinary run sets the criterion is the plain all-steps MSE; an example that spreads more is
    divided by its excess (``spread / (cap x median)``), so it weighs like one at the cap and a
    single example with huge losses cannot choose the setting for the rest.
    """
    losses = runs.losses[:, 1:].astype(np.float64)
    spread = ((losses - losses.mean(axis=0)) ** 2).mean(axis=(0, 1))
    reference = cap * float(np.median(spread))
    if not reference > 0:
        return np.ones(runs.num_test)
    return np.maximum(spread / reference, 1.0)


def blend_weights(cross: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """``w = clip(-S_ab / S_bb, 0, 1)`` per test example (1 where ``S_bb = 0``); module docstring."""
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.clip(-cross / np.where(spread > 0, spread, 1.0), 0.0, 1.0)
    return np.where(spread > 0, weights, 1.0)


@dataclass(frozen=True)
class CrossValidation:
    """What :func:`cross_validate` chose and measured.

    Attributes:
        best: the chosen value.
        scores: criterion (mean error, blended with the mean trajectory when nesting it) of every
            evaluated value, keyed ``f"{value:.6g}"``, in decreasing value order; its keys are the
            evaluated grid, extensions included.
        grid: the evaluated values, increasing.
        extended: values added past the lower and the upper edge of the given grid.
        blend: float64 ``[M]``: the mean-trajectory blend weights of ``best`` (module docstring);
            ``None`` without ``nest_mean``.
        plain_scores: the unblended criterion of every evaluated value (as ``scores``).
    """

    best: float
    scores: dict[str, float]
    grid: list[float]
    extended: tuple[int, int]
    blend: np.ndarray | None
    plain_scores: dict[str, float]


def _step_past(values: list[float], upper: bool) -> float:
    """The next value past an edge of increasing ``values``: the outer spacing, between x2 and x10 (x10 alone)."""
    ratio = 10.0 if len(values) < 2 else float(np.clip((values[-1] / values[-2]) if upper else (values[1] / values[0]),
                                                       2.0, 10.0))
    return values[-1] * ratio if upper else values[0] / ratio


TableFits = Callable[[RunSet, Sequence[float]], Iterable[torch.Tensor]]
"""``tables(fitting_runs, values)``: one coefficient table per value, in order (:func:`cross_validate`)."""


def cross_validate(runs: RunSet, grid: Sequence[float], tables: TableFits, cv_folds: int, seed: int,
                   alpha_offset: float = 1.0, fit_alpha: bool = True, fix: str = "pass the setting explicitly",
                   batch_size: int | None = None, nest_mean: bool = False,
                   max_extensions: int = MAX_EXTENSIONS, space: str = "loss") -> CrossValidation:
    r"""Choose a setting by rolled-out all-steps error on K folds of the fitting runs.

    ``tables(fitting_runs, values)`` yields one coefficient table (as :func:`rollout` takes it)
    per value of ``values``, in that order; values come in decreasing order (strong to weak), so
    a caller can warm-start each fit from the previous one. It is called once per fold with the
    grid, then once per fold and extension with the new value; a fold's ``fitting_runs`` is the
    same object in every call, so a caller may keep warm starts per fold. The error is the
    all-steps MSE with outlying test examples scaled down (:func:`example_scales`): one test
    example with huge losses cannot choose the setting for all the others. Each fold's error
    weighs ``1 / K``.

    When the best value is the largest or the smallest evaluated, one more value past that edge
    is evaluated (spaced as the two outermost values, between x2 and x10; x10 from a single
    value), up to ``max_extensions`` per side, until the best lies inside. Ties go to the larger
    value.

    With ``nest_mean`` each test example's prediction is blended with the fold's mean trajectory,
    ``mu + w (p - mu)``, ``w`` in [0, 1] chosen per grid value and test example from the pooled
    held-out folds (module docstring), and the value whose blended error is least is chosen.

    Args:
        runs: the fitting runs (at least 2).
        grid: the candidate values (positive; any order).
        tables: as above.
        cv_folds: ``K`` (at most the number of runs).
        seed: seed of the fold assignment.
        alpha_offset: as :func:`rollout`'s.
        fit_alpha: as :func:`rollout`'s.
        batch_size: as :func:`rollout`'s.
        fix: the hint of the error raised with fewer than 2 runs.
        nest_mean: choose mean-trajectory blend weights too.
        max_extensions: values that may be added past each edge (0: the grid as given).
        space: the loss space the tables are fitted and rolled out in (:mod:`simfluence.func.spaces`):
            ``tables`` gets each fold's runs with losses in that space, and its rollouts are mapped
            back to losses before they are scored (and blended), so the criterion is in loss units
            whatever the space.
    """
    if runs.num_runs < 2:
        raise RunDataError("<runs>", "runs", "cross-validation needs at least 2 fitting runs", fix)
    folds = run_folds(runs.num_runs, cv_folds, seed)
    scales = example_scales(runs)
    bounds = loss_bounds(runs.losses)
    parts = []
    for fold in folds:
        fitting, held_out = runs.select(np.setdiff1d(np.arange(runs.num_runs), fold)), runs.select(fold)
        steps = held_out.eval_steps[1:]
        weight = 1.0 / (len(folds) * held_out.num_runs * steps.size)   # so that sums are fold-averaged means
        mean = mean_prediction(mean_change(fitting), held_out.initial_losses, steps) if nest_mean else None
        parts.append((in_space(fitting, space), held_out, steps, weight, mean))
    # The plain mean's error S_aa [M], the same for every value.
    base = (sum(w * ((mu - h.losses[:, 1:]) ** 2).sum(axis=(0, 1)) for _, h, _, w, mu in parts)
            if nest_mean else None)
    plain: dict[float, float] = {}
    sums: dict[float, tuple[np.ndarray, np.ndarray]] = {}   # value -> (S_ab, S_bb), each [M]

    def evaluate(values: list[float]) -> None:
        for value in values:
            plain[value] = 0.0
            sums[value] = (np.zeros(runs.num_test), np.zeros(runs.num_test))
        for fitting, held_out, steps, weight, mu in parts:
            initial = to_space(held_out.initial_losses.astype(np.float64), space)
            for value, table in zip(values, tables(fitting, values)):
                rolled = rollout(table, held_out.curricula, initial, alpha_offset, fit_alpha, batch_size=batch_size)
                predicted = rolled[:, steps].astype(np.float64)
                if space != "loss":
                    predicted = from_space(predicted, space, *bounds)
                truth = held_out.losses[:, 1:]
                with np.errstate(over="ignore", invalid="ignore"):
                    squared = (predicted - truth) ** 2
                    normalised = float(np.mean(squared.mean(axis=(0, 1)) / scales))
                    plain[value] += (normalised if np.isfinite(normalised) else np.inf) / len(folds)
                    if mu is not None:
                        deviation = predicted - mu
                        cross, spread = sums[value]
                        cross += weight * (deviation * (mu - truth)).sum(axis=(0, 1))
                        spread += weight * (deviation ** 2).sum(axis=(0, 1))

    def criterion(value: float) -> float:
        if base is None or not np.isfinite(plain[value]):
            return plain[value]
        cross, spread = sums[value]
        if not (np.isfinite(cross).all() and np.isfinite(spread).all()):
            return np.inf
        w = blend_weights(cross, spread)
        return float(np.mean((base + 2 * w * cross + w * w * spread) / scales))

    evaluate(sorted({float(value) for value in grid}, reverse=True))
    extended = [0, 0]   # below, above
    while True:
        values = sorted(plain, reverse=True)    # ties: np.argmin keeps the first, the larger value
        errors = [criterion(value) for value in values]
        best = values[int(np.argmin(errors))]
        if not np.isfinite(min(errors)):
            break
        increasing = values[::-1]
        if best == increasing[-1] and extended[1] < max_extensions:
            extended[1] += 1
            evaluate([_step_past(increasing, upper=True)])
        elif best == increasing[0] and extended[0] < max_extensions:
            extended[0] += 1
            evaluate([_step_past(increasing, upper=False)])
        else:
            break
    key = "{:.6g}".format
    blend = None
    if base is not None:
        blend = blend_weights(*sums[best]) if np.isfinite(plain[best]) else np.ones(runs.num_test)
    return CrossValidation(best, {key(value): float(error) for value, error in zip(values, errors)}, values[::-1],
                           (extended[0], extended[1]), blend, {key(value): plain[value] for value in values})


@dataclass(frozen=True)
class TableConfig(SimulatorConfig):
    """Settings every coefficient-table simulator has: where and in what precision the table lives."""

    device: str = setting("cpu", "torch device for fitting and rollouts ('cpu', 'cuda', ...).")
    dtype: str = setting("float32", "'float32' (fast) or 'float64'.")
    batch_mean: bool = setting(True, "Effects are those of a batch-mean loss: in a step with k of the fitting runs' "
                               "n batch slots filled (examples removed or padding), each example's effect is "
                               "scaled by n / k. False: a step's effect is the plain sum of its examples'.")

    def validate(self) -> None:
        """Check the dtype."""
        super().validate()
        one_of("dtype", self.dtype, tuple(_DTYPES))
        self._set("batch_mean", boolean("batch_mean", self.batch_mean))


@dataclass(frozen=True)
class LinearConfig(TableConfig):
    """Settings of the Simfluence-Linear family (``linear``, ``linear-identity``, ``additive``)."""

    ridge: float | None = setting(None, "Ridge strength lambda on the summed squared one-step errors (absolute); "
                                  "None: chosen by cross-validation over the fitting runs from ridge_grid.")
    ridge_grid: tuple[float, ...] = setting(DEFAULT_RIDGE_GRID, "Candidate strengths, as multiples of the mean "
                                            "number of times a training example was trained on (diag of X^T X); "
                                            "extended past an edge (up to 3 values per side) while the best "
                                            "strength lies on it.")
    cv_folds: int = setting(5, "Folds of fitting runs for the choice of ridge and blend (5: each fold model sees 80 % "
                            "of the runs, so the blend weights it chooses are less biased low than with 3).")
    tol: float = setting(1e-5, "Conjugate-gradient stopping tolerance (relative residual of every system).")
    cg_max_iter: int = setting(1000, "Conjugate-gradient iteration cap.")
    seed: int = setting(0, "Seed of the cross-validation fold assignment.")
    nest_mean: bool = setting(True, "Blend each test example's rollout with the mean trajectory by a weight in "
                              "[0, 1] chosen in the ridge's cross-validation (mu + w (rollout - mu)); 1 keeps "
                              "the plain recurrence. Only when ridge is cross-validated (ridge None).")

    renamed: ClassVar[Mapping[str, str]] = {"max_iter": "cg_max_iter"}

    def validate(self) -> None:
        """Check ridge, grid, folds, tolerance, iteration cap and dtype."""
        super().validate()
        self._set("nest_mean", boolean("nest_mean", self.nest_mean))
        self._set("ridge", positive("ridge", self.ridge, allow_none=True))
        self._set("ridge_grid", positive_grid("ridge_grid", self.ridge_grid))
        self._set("cv_folds", integer("cv_folds", self.cv_folds, 2))
        self._set("tol", positive("tol", self.tol))
        self._set("cg_max_iter", integer("cg_max_iter", self.cg_max_iter, 1))
        self._set("seed", integer("seed", self.seed, 0))


@dataclass(frozen=True)
class LinearSpaceConfig(LinearConfig):
    """Settings of ``linear``, ``linear-identity`` and ``additive``: :class:`LinearConfig` and the loss space."""

    space: str = setting("auto", "Loss space the recurrence runs in: 'loss', 'log' (log L), 'margin' (log(e^L - 1), "
                         "minus the margin of a cross-entropy) or 'auto' (cross-validated with the ridge, on loss-unit "
                         "errors; 'log' and 'margin' only where every fitting loss is > 0; 'loss' with a given ridge).")

    def validate(self) -> None:
        """Check the space and the :class:`LinearConfig` settings."""
        super().validate()
        one_of("space", self.space, (*SPACES, "auto"))


class TableSimulator(Simulator):
    """A coefficient table rolled out by the Simfluence-Linear recurrence (not a kind of its own).

    The table is float ``[N, 2M]`` ``[A | B]`` (``[N, M]`` ``B`` when ``fit_alpha`` is false),
    on ``config.device`` in ``config.dtype``; ``L_t = (alpha_offset + sum A) L_{t-1} + sum B``
    over the batch. Subclasses fill ``table`` in ``_fit``: by ridge (:class:`LinearSimulator`)
    or from gradients (:mod:`simfluence.simulators.gradient`).
    """

    fit_alpha = True
    alpha_offset = 0.0
    config_class = TableConfig
    config: TableConfig

    def __init__(self, config: TableConfig | None = None, **settings: Any):
        super().__init__(config, **settings)
        self.table: torch.Tensor = None  # type: ignore[assignment]  # fitted state, behind _check_fitted

    # --- fitted coefficients ------------------------------------------------------
    @property
    def coefficients(self) -> tuple[np.ndarray | None, np.ndarray]:
        """``(A, B)`` as float ``[N, M]`` arrays (``A`` is ``None`` for additive models)."""
        self._check_fitted()
        table = self.table.cpu().numpy()
        num_test = self.test_ids.size
        return (table[:, :num_test], table[:, num_test:]) if self.fit_alpha else (None, table)

    # --- prediction ---------------------------------------------------------------
    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        return rollout(self.table, curricula, initial, self.alpha_offset, self.fit_alpha,
                       batch_size=self._batch_size())

    def _expected(self, weights: np.ndarray, num_steps: int, batch_size: int, initial: np.ndarray) -> np.ndarray:
        r"""The recurrence rolled out with the expected batch: exact for independent batches.

        With every slot drawn from ``weights`` ``[P, N]``, a step's coefficient sums have means
        :math:`\bar\alpha = \alpha_0 + n\, w A` and :math:`\bar\beta = n\, w B` (``n``: the slots, or
        the fitted batch size under a batch-mean loss, as :class:`BatchDesign` weighs them), and
        as ``c_t`` is independent of :math:`L_{t-1}`, :math:`E[L_t] = \bar\alpha E[L_{t-1}] + \bar\beta`.
        float64 ``[P, T + 1, M]``.
        """
        table = self.table.detach().to("cpu", torch.float64).numpy()
        means = self._expected_slots(batch_size) * (weights @ table)        # [P, K]
        num_test = initial.shape[1]
        alpha = self.alpha_offset + means[:, :num_test] if self.fit_alpha else np.ones_like(initial)
        beta = means[:, num_test:] if self.fit_alpha else means
        out = np.empty((initial.shape[0], num_steps + 1, num_test))
        out[:, 0] = initial
        for t in range(num_steps):
            out[:, t + 1] = alpha * out[:, t] + beta
        return out

    def _expected_slots(self, batch_size: int) -> float:
        """``n`` of :meth:`_expected`: the slots of a batch, or the fitted batch size under a batch-mean loss."""
        fitted = self._batch_size()
        return float(batch_size if fitted is None else fitted)

    def column_rollout(self, test_index: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """A rollout of the ``test_index`` columns of the coefficient table only.

        Each test example's recurrence is independent of the others', so rolling out a
        column subset gives the same numbers as slicing a full rollout, at ``M' / M`` of the
        cost. ``None`` for subclasses that do not declare ``capabilities.column_rollout``
        (their rollout is not this recurrence).
        """
        if not type(self).capabilities.column_rollout:
            return None
        self._check_fitted()
        num_test = self.test_ids.size
        columns = np.concatenate([test_index, num_test + test_index]) if self.fit_alpha else test_index
        table, batch_size = self.table[:, columns], self._batch_size()

        def run(curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
            return rollout(table, curricula, initial[:, test_index], self.alpha_offset, self.fit_alpha,
                           batch_size=batch_size)

        return run

    # --- persistence --------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {"table": self.table.cpu().numpy()}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        table = arrays["table"]
        expected = (self.train_ids.size, (2 if self.fit_alpha else 1) * self.test_ids.size)
        if table.shape != expected:
            raise ValueError(f"table has shape {table.shape}, expected {expected}")
        device = self.config.device if self.config.device == "cpu" or torch.cuda.is_available() else "cpu"
        self.table = torch.as_tensor(table, device=device)


@register
class LinearSimulator(TableSimulator):
    """Simfluence-Linear (``alpha_0 = 0``, as in the paper).

    Args:
        ridge: ridge strength ``lambda`` on the summed squared one-step errors; ``None``
            chooses it by cross-validation over the fitting runs from ``ridge_grid``.
        ridge_grid: candidate strengths, as multiples of the mean number of times a
            training example was trained on (the diagonal of ``X^T X``).
        cv_folds: folds of fitting runs for that choice.
        tol: conjugate-gradient stopping tolerance (relative residual of every system).
        cg_max_iter: conjugate-gradient iteration cap (``max_iter`` before).
        device: torch device for fitting and rollouts (``"cpu"``, ``"cuda"``, ...).
        dtype: ``"float32"`` (fast) or ``"float64"``.
        seed: seed of the cross-validation fold assignment.
        nest_mean: blend each test example's rollout with the mean trajectory,
            ``mu + w_m (rollout - mu)``, ``w_m`` in ``[0, 1]`` chosen in the ridge's
            cross-validation (module docstring); only when ``ridge`` is ``None``.
        space: ``"loss"``, ``"log"``, ``"margin"`` or ``"auto"`` (the default: cross-validated with
            the ridge); the space the recurrence runs in (module docstring). Kinds built on this
            one with settings of their own (``hybrid``, ``linear-bootstrap``, ``linear-pairwise``)
            have no ``space`` and run in loss space.

    The settings are a frozen :class:`LinearSpaceConfig` (``config``), given as one or as keywords.

    Fitted state: ``table`` (``[N, 2M]`` ``[A | B]``, ``[N, M]`` additive), ``blend_``
    (float64 ``[M]``, the mean-trajectory blend weights; all 1 with a given ``ridge`` or without
    ``nest_mean``), ``space_`` and ``floor_`` / ``ceiling_`` (the range losses mapped back from
    ``log`` / ``margin`` are kept in). :attr:`coefficients` are the table's, unblended, in
    ``space_`` units: :meth:`simulate` is ``mu + blend_ (L(rollout) - mu)`` with ``L`` the map back
    to losses and ``mu`` the mean trajectory of the fitting runs from the given ``L_0``, and
    :meth:`column_rollout` the same for a column subset. ``fit_info`` adds ``ridge``,
    ``cv_scores`` (criterion per evaluated strength in the chosen space, extensions included),
    ``cv_grid`` (the evaluated strengths), ``space``, ``cv_space_scores`` (each cross-validated
    space's least criterion; ``None`` with a given ridge), ``blend_median`` and ``blend_below_1``
    (test examples with ``w_m < 1``).
    """

    kind = "linear"
    capabilities = Capabilities(
        "learned", ridge=True, cross_validation=True, device=True, precision=True, column_rollout=True,
        expected_rollout=True, transitions=True)
    fit_alpha = True
    alpha_offset = 0.0

    config_class: ClassVar[type[TableConfig]] = LinearSpaceConfig
    config: LinearConfig

    def __init__(self, config: LinearConfig | None = None, **settings: Any):
        super().__init__(config, **settings)
        self.space_, (self.floor_, self.ceiling_) = "loss", UNBOUNDED   # fitted state (loss space: unclipped)
        self.chosen_ridge: float | None = None
        self.prior_b: torch.Tensor | None = None
        """float ``[N, M]``: the ``B`` the ridge shrinks towards (``None``: zero); set by subclasses' fits."""
        self.blend_: np.ndarray = None  # type: ignore[assignment]  # [M]; fitted state, behind _check_fitted

    # --- fitting ------------------------------------------------------------------
    def _spaces(self, runs: RunSet) -> list[str]:
        """The loss spaces to consider: the ``space`` setting (kinds whose settings have none: ``"loss"``)."""
        requested = getattr(self.config, "space", "loss")
        spaces = candidate_spaces(requested, runs.losses)
        return ["loss"] if requested == "auto" and self.config.ridge is not None else spaces

    def _fit(self, runs: RunSet) -> None:
        blend, scores, grid, space_scores = np.ones(runs.num_test), None, None, None
        spaces = self._spaces(runs)
        if self.config.ridge is not None:
            ridge, space = self.config.ridge, spaces[0]
        else:
            tried = {space: self._cross_validate(runs, space) for space in spaces}
            space_scores = {space: chosen.scores[f"{chosen.best:.6g}"] for space, chosen in tried.items()}
            space = min(spaces, key=space_scores.__getitem__)   # ties: the first, "loss"
            chosen = tried[space]
            ridge, scores, grid = chosen.best, chosen.scores, chosen.grid
            if chosen.blend is not None:
                blend = chosen.blend
        self.space_, (self.floor_, self.ceiling_) = space, loss_bounds(runs.losses)
        self.table, info = self._solve(Transitions.of(in_space(runs, space)), ridge)
        self.chosen_ridge = float(ridge)
        self.blend_ = blend.astype(np.float64)
        self.fit_info.update(ridge=float(ridge), cv_scores=scores, cv_grid=grid, space=space,
                             cv_space_scores=space_scores, blend_median=float(np.median(blend)),
                             blend_below_1=int((blend < 1).sum()), **info)

    def _solve(self, transitions: Transitions, ridge: float,
               initial: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Coefficient table ``[N, 2M]`` (``[N, M]`` additive), solved in chunks of test examples."""
        dtype, device = _DTYPES[self.config.dtype], torch.device(self.config.device)
        runs = transitions.runs
        num_train, num_test = runs.num_train, runs.num_test
        design = BatchDesign(transitions.batches, num_train, device, self._batch_size(runs))
        blocks = 2 if self.fit_alpha else 1
        itemsize = torch.finfo(dtype).bits // 8
        per_column = itemsize * (14 * transitions.num_transitions + 8 * blocks * num_train)  # incl. temporaries
        chunk = int(max(1, min(num_test, _WORKING_BYTES // per_column)))
        table = torch.empty(num_train, blocks * num_test, dtype=dtype, device=device)
        iterations, residual = 0, 0.0
        for start in range(0, num_test, chunk):
            cols = slice(start, min(start + chunk, num_test))
            previous, current = (torch.as_tensor(x, dtype=dtype, device=device) for x in transitions.columns(cols))
            target = current - previous if self.alpha_offset == 1.0 else current
            prior = None if self.prior_b is None else self.prior_b[:, cols].to(device, dtype)
            if prior is not None:  # ridge around the prior: fit the residual B - prior
                target = target - design.matmul(prior)
            warm = None
            if initial is not None:
                warm = torch.cat([initial[:, num_test * k:][:, cols] for k in range(blocks)], dim=1)
                if prior is not None:
                    warm[:, warm.shape[1] - prior.shape[1]:] -= prior
            solution = solve_transition_ridge(design, previous, target, ridge, self.fit_alpha, self.config.tol,
                                              self.config.cg_max_iter, warm)
            b_part = solution.b if prior is None else solution.b + prior
            for k, part in enumerate([b_part] if solution.a is None else [solution.a, b_part]):  # a: fit_alpha
                table[:, num_test * k:][:, cols] = part
            iterations = max(iterations, solution.iterations)
            residual = max(residual, solution.max_relative_residual)
        return table, {"cg_iterations": iterations, "cg_relative_residual": residual, "column_chunk": chunk}

    def _cross_validate(self, runs: RunSet, space: str = "loss") -> CrossValidation:
        """Choose ``ridge`` (and the blend weights) by rolled-out all-steps MSE on K folds of the fitting runs.

        The tables are fitted in ``space``; the errors are in loss units (:func:`cross_validate`).
        """
        scale = float(BatchDesign(Transitions.of(runs).batches, runs.num_train,
                                  batch_size=self._batch_size(runs)).occurrences.mean())
        grid = [scale * factor for factor in self.config.ridge_grid]
        weakest: dict[int, tuple[float, torch.Tensor]] = {}   # per fold: its weakest fit so far

        def tables(fitting: RunSet, values: Sequence[float]):
            transitions, table = Transitions.of(fitting), None
            known = weakest.get(id(fitting))   # a fold's runs are the same object in every call
            if known is not None and known[0] > values[0]:   # extending the grid downwards: warm start
                table = known[1]
            for ridge in values:  # strong -> weak: each warm-starts the next
                table, _ = self._solve(transitions, ridge, initial=table)
                if known is None or ridge < known[0]:
                    weakest[id(fitting)] = (ridge, table)
                yield table

        return cross_validate(runs, grid, tables, self.config.cv_folds, self.config.seed, self.alpha_offset,
                              self.fit_alpha, "pass an explicit ridge", self._batch_size(runs),
                              nest_mean=self.config.nest_mean, space=space)

    # --- prediction ---------------------------------------------------------------
    def _blended(self, trajectories: np.ndarray, initial: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """``mu + w (rollout - mu)`` for rolled-out ``trajectories`` float32 ``[R, T + 1, M']`` (in place).

        ``initial`` ``[R, M']`` are their losses before training, ``columns`` ``[M']`` the test examples
        they are (``None``: all). Columns whose weight is 1 are left as they are, bit for bit.
        """
        weights = self.blend_ if columns is None else self.blend_[columns]
        shrunk = np.flatnonzero(weights < 1)
        if shrunk.size == 0:
            return trajectories
        change = self.mean_change if columns is None else self.mean_change[:, columns]
        mu = mean_prediction(change[:, shrunk], initial[:, shrunk], np.arange(trajectories.shape[1]))
        rolled = trajectories[:, :, shrunk].astype(np.float64)
        trajectories[:, :, shrunk] = mu + weights[shrunk] * (rolled - mu)
        return trajectories

    def _in_losses(self, rollout: Callable[[np.ndarray, np.ndarray], np.ndarray], curricula: np.ndarray,
                   initial: np.ndarray) -> np.ndarray:
        """``rollout(curricula, initial)`` of the table in ``space_``, as float32 losses."""
        if self.space_ == "loss":
            return rollout(curricula, initial)
        check_initial(initial, self.space_)
        z = rollout(curricula, to_space(initial, self.space_))
        return from_space(z.astype(np.float64), self.space_, self.floor_, self.ceiling_).astype(np.float32)

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        return self._blended(self._in_losses(super()._simulate, curricula, initial), initial)

    @property
    def expected_estimator(self) -> str:
        """``"closed form"`` in loss space; ``"control variate"`` in ``log`` / ``margin`` space.

        There the mean of ``exp`` / softplus of a rollout is not that of the expected rollout
        (:meth:`_sampled_expected`).
        """
        closed = super().expected_estimator
        return closed if closed != "closed form" or self.space_ == "loss" else "control variate"

    def _expected(self, weights: np.ndarray, num_steps: int, batch_size: int, initial: np.ndarray) -> np.ndarray:
        # The blend is affine in the rollout, so the expectation passes through it.
        return self._blended(super()._expected(weights, num_steps, batch_size, initial), initial)

    def _sampled_expected(self, pools: np.ndarray, num_steps: int, batch: int, initial: np.ndarray, draws: int,
                          seed: int, source: str, rows: np.ndarray | None = None) -> np.ndarray:
        r"""float32 ``[P, T + 1, M]``: the expected losses; in ``log`` / ``margin`` space by a control variate.

        The rollout is affine in the batch in ``z``, so :math:`E[z_t]` has a closed form
        (:meth:`TableSimulator._expected`), but :math:`E[L_t] = E[f(z_t)]` (``f``: :func:`from_space`)
        has not. It is estimated from the ``draws`` curricula of :meth:`Simulator._sampled_expected`
        (the same seeds) with :math:`E[z_t]` as a control variate
        (:func:`~simfluence.func.spaces.control_variate_mean`: unbiased, only the curvature of ``f``
        left to sampling noise), then blended with the mean trajectory (affine, so the expectation
        passes through). In loss space: the plain mean (the base class's).
        """
        if self.space_ == "loss":
            return super()._sampled_expected(pools, num_steps, batch, initial, draws, seed, source, rows)
        check_initial(initial, self.space_)
        start = to_space(initial, self.space_)
        mean_z = TableSimulator._expected(self, pools / pools.sum(axis=1, keepdims=True), num_steps, batch, start)
        trajectories = np.full((pools.shape[0], num_steps + 1, self.test_ids.size), np.nan, dtype=np.float32)
        for p in range(pools.shape[0]) if rows is None else rows:
            curricula = pool_curricula(pools[p], num_steps, batch, draws, seed, p)
            z = TableSimulator._simulate(self, curricula, np.repeat(start[p][None], draws, 0)).astype(np.float64)
            estimate = control_variate_mean(z, mean_z[p], self.space_, self.floor_, self.ceiling_)
            trajectories[p] = self._blended(estimate[None], initial[p][None])[0]
        return trajectories

    def column_rollout(self, test_index: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """The table's :meth:`TableSimulator.column_rollout` for ``test_index``, blended as :meth:`simulate`."""
        plain = super().column_rollout(test_index)
        if plain is None:
            return None
        test_index = np.asarray(test_index)

        def run(curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
            return self._blended(self._in_losses(plain, curricula, initial), initial[:, test_index], test_index)

        return run

    # --- persistence --------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {**super()._arrays(), "blend": np.asarray(self.blend_, dtype=np.float64),
                "space": np.array([SPACES.index(self.space_), self.floor_, self.ceiling_])}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        super()._restore(arrays)
        space = arrays.get("space")   # absent in files saved before the loss spaces: loss space, unclipped
        if space is not None:
            if space.shape != (3,) or space.dtype.kind != "f" or not np.isfinite(space).all() or \
                    space[0] not in range(len(SPACES)) or not space[1] <= space[2]:
                raise ValueError("'space' must hold (space index, floor <= ceiling), finite")
            self.space_, self.floor_, self.ceiling_ = SPACES[int(space[0])], float(space[1]), float(space[2])
        blend = arrays.get("blend")   # absent in files saved before the blend: the plain recurrence
        if blend is None:
            self.blend_ = np.ones(self.test_ids.size)
            return
        if blend.shape != (self.test_ids.size,):
            raise ValueError(f"blend has shape {blend.shape}, expected ({self.test_ids.size},)")
        if blend.dtype.kind != "f" or not np.all((blend >= 0) & (blend <= 1)):
            raise ValueError("blend must hold weights in [0, 1]")
        self.blend_ = blend.astype(np.float64)


@register
class LinearIdentitySimulator(LinearSimulator):
    """Simfluence-Linear centred on the identity: ``alpha = 1 + sum_i a_i``."""

    kind = "linear-identity"
    capabilities = Capabilities(
        "learned", ridge=True, cross_validation=True, device=True, precision=True, column_rollout=True,
        expected_rollout=True, transitions=True)
    alpha_offset = 1.0
