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
scoring the rolled-out all-steps MSE on each held-out fold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn.functional import embedding_bag

from simfluence.runs.log import RunDataError, RunSet
from simfluence.simulators.base import Capabilities, Simulator, register
from simfluence.simulators.config import SimulatorConfig, integer, one_of, positive, positive_grid, setting
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.ridge import solve_transition_ridge

DEFAULT_RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_WORKING_BYTES = 2 << 30  # solver working set per column chunk


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
        pairs = np.flatnonzero(np.diff(steps) == 1)
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


def cross_validate(runs: RunSet, grid: Sequence[float], tables: Callable[[RunSet], Iterable[torch.Tensor]],
                   cv_folds: int, seed: int, alpha_offset: float = 1.0, fit_alpha: bool = True,
                   fix: str = "pass the setting explicitly", batch_size: int | None = None,
                   ) -> tuple[float, dict[str, float]]:
    """Choose a setting from ``grid`` by rolled-out all-steps error on K folds of the fitting runs.

    ``tables(fitting_runs)`` yields one coefficient table (as :func:`rollout` takes it) per
    grid value, in grid order, so a caller can warm-start each fit from the previous one.
    The error is the all-steps MSE with outlying test examples scaled down (:func:`example_scales`):
    one test example with huge losses cannot choose the setting for all the others.
    ``batch_size``: as :func:`rollout`'s. Returns the best value and the mean error of each (keyed
    by the value).
    """
    if runs.num_runs < 2:
        raise RunDataError("<runs>", "runs", "cross-validation needs at least 2 fitting runs", fix)
    folds = np.array_split(np.random.default_rng(seed).permutation(runs.num_runs), min(cv_folds, runs.num_runs))
    scales = example_scales(runs)
    errors = np.zeros(len(grid))
    for fold in folds:
        fitting, held_out = runs.select(np.setdiff1d(np.arange(runs.num_runs), fold)), runs.select(fold)
        for g, table in enumerate(tables(fitting)):
            predicted = rollout(table, held_out.curricula, held_out.initial_losses.astype(np.float64),
                                alpha_offset, fit_alpha, batch_size=batch_size)
            squared = (predicted[:, held_out.eval_steps[1:]].astype(np.float64) - held_out.losses[:, 1:]) ** 2
            with np.errstate(over="ignore", invalid="ignore"):
                normalised = float(np.mean(squared.mean(axis=(0, 1)) / scales))
            errors[g] += (normalised if np.isfinite(normalised) else np.inf) / len(folds)
    return float(grid[int(np.argmin(errors))]), {f"{value:.6g}": float(error) for value, error in zip(grid, errors)}


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
        self._set("batch_mean", bool(self.batch_mean))


@dataclass(frozen=True)
class LinearConfig(TableConfig):
    """Settings of the Simfluence-Linear family (``linear``, ``linear-identity``, ``additive``)."""

    ridge: float | None = setting(None, "Ridge strength lambda on the summed squared one-step errors (absolute); "
                                  "None: chosen by cross-validation over the fitting runs from ridge_grid.")
    ridge_grid: tuple[float, ...] = setting(DEFAULT_RIDGE_GRID, "Candidate strengths, as multiples of the mean "
                                            "number of times a training example was trained on (diag of X^T X).")
    cv_folds: int = setting(3, "Folds of fitting runs for the choice of ridge.")
    tol: float = setting(1e-5, "Conjugate-gradient stopping tolerance (relative residual of every system).")
    cg_max_iter: int = setting(1000, "Conjugate-gradient iteration cap.")
    seed: int = setting(0, "Seed of the cross-validation fold assignment.")

    renamed: ClassVar[Mapping[str, str]] = {"max_iter": "cg_max_iter"}

    def validate(self) -> None:
        """Check ridge, grid, folds, tolerance, iteration cap and dtype."""
        super().validate()
        self._set("ridge", positive("ridge", self.ridge, allow_none=True))
        self._set("ridge_grid", positive_grid("ridge_grid", self.ridge_grid))
        self._set("cv_folds", integer("cv_folds", self.cv_folds, 2))
        self._set("tol", positive("tol", self.tol))
        self._set("cg_max_iter", integer("cg_max_iter", self.cg_max_iter, 1))
        self._set("seed", integer("seed", self.seed, 0))


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

    The settings are a frozen :class:`LinearConfig` (``config``), given as one or as keywords.
    """

    kind = "linear"
    capabilities = Capabilities(
        "learned", ridge=True, cross_validation=True, device=True, precision=True, column_rollout=True)
    fit_alpha = True
    alpha_offset = 0.0

    config_class = LinearConfig
    config: LinearConfig

    def __init__(self, config: LinearConfig | None = None, **settings: Any):
        super().__init__(config, **settings)
        self.chosen_ridge: float | None = None
        self.prior_b: torch.Tensor | None = None
        """float ``[N, M]``: the ``B`` the ridge shrinks towards (``None``: zero); set by subclasses' fits."""

    # --- fitting ------------------------------------------------------------------
    def _fit(self, runs: RunSet) -> None:
        transitions = Transitions.of(runs)
        ridge, scores = (self.config.ridge, None) if self.config.ridge is not None else self._cross_validate(runs)
        self.table, info = self._solve(transitions, ridge)
        self.chosen_ridge = float(ridge)
        self.fit_info.update(ridge=float(ridge), cv_scores=scores, **info)

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

    def _cross_validate(self, runs: RunSet) -> tuple[float, dict[str, float]]:
        """Choose ``ridge`` by rolled-out all-steps MSE on K folds of the fitting runs."""
        scale = float(BatchDesign(Transitions.of(runs).batches, runs.num_train,
                                  batch_size=self._batch_size(runs)).occurrences.mean())
        # warm starts go strong -> weak
        grid = sorted((scale * factor for factor in self.config.ridge_grid), reverse=True)

        def tables(fitting: RunSet):
            transitions, table = Transitions.of(fitting), None
            for ridge in grid:
                table, _ = self._solve(transitions, ridge, initial=table)
                yield table

        return cross_validate(runs, grid, tables, self.config.cv_folds, self.config.seed, self.alpha_offset,
                              self.fit_alpha, "pass an explicit ridge", self._batch_size(runs))


@register
class LinearIdentitySimulator(LinearSimulator):
    """Simfluence-Linear centred on the identity: ``alpha = 1 + sum_i a_i``."""

    kind = "linear-identity"
    capabilities = Capabilities(
        "learned", ridge=True, cross_validation=True, device=True, precision=True, column_rollout=True)
    alpha_offset = 1.0
