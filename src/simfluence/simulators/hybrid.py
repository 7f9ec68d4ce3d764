r"""``hybrid``: linear-identity whose ridge shrinks ``B`` towards a gradient prior, not towards 0.

.. math::

    L_t = \Bigl(1 + \sum_{i \in c_t} a_i\Bigr) L_{t-1} + \sum_{i \in c_t} B_i,
    \qquad
    \min_{a, B}\ \sum_{\text{transitions}} (\text{one-step error})^2
        + \lambda \bigl(\lVert a \rVert^2 + \lVert B - s\,G \rVert^2\bigr)

``G`` ``[N, M]`` are the additive scores of a gradient method along a replay of the first
fitting run (``tracin-cp``: learning-rate weighted gradient inner products at checkpoints;
``grad-dot``: at the start) and ``s`` their least-squares scale on the fitting transitions
(the ``-scaled`` kinds). The gradient method knows which training example moves which test
example from one run; the logged runs correct it where they disagree. With few runs or a strong
``lambda`` the fit is the scaled gradient method (plus the identity-centred ``a``); with many
runs and a weak one it is ``linear-identity``. ``lambda`` is chosen by cross-validation over the
fitting runs, as for ``linear-identity``, so the data decides between the two.

As for ``linear-identity``, the rollout is blended with the mean trajectory by per-test-example
weights chosen in that cross-validation (``nest_mean``, :mod:`simfluence.simulators.linear`).

Solved as ``linear-identity`` on the residual targets ``L_t - L_{t-1} - X_t s G``, then
``B = s G + B_residual``; the saved table holds ``B`` itself, so loading needs no task.

**The prior's own ranking beside the fit** (``prior_weight``). The ridge above moves ``B`` only
where the runs leave it undetermined, and cross-validated on trajectory error it stays close to
``linear-identity``. But the two rank curricula with errors that are largely independent: the
table's per-pair coefficients are estimated from a few dozen runs (noisy), the gradient scores
come from one replayed run (noise-free, biased). So the prediction mixes in the prior's own
curriculum-dependent deviations, rescaled to the fit's spread:

.. math::

    \hat L_t(c) = (1 - w)\, P_t(c) + w\, \bigl(\bar P_t + r_m\, D_t(c)\bigr), \qquad
    D_t(c) = \sum_{\tau \le t} \sum_{i \in c_\tau} \bigl(s G_{im} - \textstyle\sum_j \pi_j s G_{jm}\bigr),

* :math:`P(c)`: the ridge fit above rolled out along curriculum ``c`` (blended with the mean
  trajectory as ``linear-identity``'s); :math:`\bar P` its expected trajectory when every batch
  slot is drawn uniformly from the training examples the fitting runs trained on (:math:`\pi`
  ``[N]``: 1 / their number for each of them, else 0; the closed form of
  :meth:`~simfluence.simulators.base.Simulator.simulate_expected`);
* :math:`D(c)`: the scaled prior's additive rollout, centred so that its expectation under
  :math:`\pi` is 0: how much better or worse than average the prior finds curriculum ``c``;
* :math:`r_m = \sqrt{\sum (P - \bar P)^2 / \sum D^2}` over the fitting runs and steps: the
  prior's deviations in the spread of the fit's, per test example;
* :math:`w \in [0, 1]` (``prior_weight``): ``0`` is the ridge fit alone. ``None`` (the default)
  chooses it by K-fold cross-validation over the fitting runs (the fit refitted on each fold, the
  prior kept): among the weights in :data:`WEIGHTS` whose held-out-fold all-steps MSE and
  final-step MSE (outlying test examples scaled down as in the ridge's cross-validation) are both
  no worse than ``w = 0``'s beyond one standard error over the folds, the one whose held-out-fold
  final losses are ranked best across runs (mean Spearman per test example); ties go to the smaller
  weight. So the mixture does not trade cross-validated error for ranking.

The mixture is affine in the rollouts, so :meth:`simulate_expected` stays exact. Measured on the
LDS runs of digits-mlp, text-minilm (48 fitting runs) and tiny-lm (24; ``docs/benchmarks.md``): the
cross-validation chose 0.15, 0.05 and 0.25; subset LDS 0.77 -> 0.79, 0.74 -> 0.78 (both above
TracIn-CP's, paired) and 0.52 -> 0.52; across-run Spearman on held-out runs (6 splits) 0.70 ->
0.75, 0.53 -> 0.55, 0.73 -> 0.75 at equal or lower error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from simfluence.errors import UsageError
from simfluence.runs.log import PAD, RunSet
from simfluence.simulators.base import Capabilities, excess_over, one_standard_error_choice, register, run_folds
from simfluence.simulators.config import TaskConfig, integer, one_of, setting
from simfluence.simulators.linear import _DTYPES, LinearConfig, LinearIdentitySimulator, example_scales, rollout

PRIORS = ("tracin-cp", "grad-dot")
WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
"""Candidate ``prior_weight`` values of the cross-validation (module docstring)."""
MIN_FOLD_RUNS = 3
"""Held-out runs a fold needs for an across-run Spearman; with fewer than two such folds ``w = 0``."""


def choose_prior_weight(weights, fold_errors, spearman) -> int:
    """Index of the chosen weight (module docstring): the best ``spearman`` among weights no worse than ``w = 0``.

    ``weights`` increasing with ``weights[0] == 0``; ``fold_errors`` ``[F, len(weights), K]``: each
    fold's held-out errors (here all-steps and final-step MSE). A weight is allowed where, for each
    error, its mean excess over ``w = 0``'s across the folds is at most one standard error of that
    excess (:func:`~simfluence.simulators.base.one_standard_error_choice`: not worse than the ridge
    fit beyond the folds' noise). ``spearman`` ``[len(weights)]``: the cross-validated ranking. Ties
    and NaN Spearman values go to the smaller weight.
    """
    if np.shape(fold_errors)[1:2] != (len(weights),) or np.shape(spearman) != (len(weights),) or weights[0] != 0:
        raise ValueError("fold_errors [folds, weights, errors] and spearman must align, starting at weight 0")
    return one_standard_error_choice(fold_errors, spearman, reference=0)


@dataclass(frozen=True)
class HybridConfig(TaskConfig, LinearConfig):
    """Settings of ``hybrid``: linear-identity's, the task, and which gradient method gives the prior."""

    prior: str = setting("tracin-cp", "The gradient method whose least-squares scaled scores B is shrunk towards: "
                         "'tracin-cp' or 'grad-dot'.")
    chunk_size: int = setting(256, "Examples per vectorised gradient pass of the prior.")
    prior_weight: float | None = setting(None, "Weight w in [0, 1] of the prior's own curriculum-dependent "
                                         "deviations (rescaled to the fit's spread) mixed into the prediction; "
                                         "0: the ridge fit alone. None: chosen by cross-validation over the fitting "
                                         "runs (the best held-out across-run ranking among the weights whose "
                                         "held-out all-steps and final-step MSE are within one standard error "
                                         "of the ridge fit's).")

    def validate(self) -> None:
        """Linear's and the task's checks, the prior, the chunk size and the prior's weight."""
        super().validate()
        one_of("prior", self.prior, PRIORS)
        self._set("chunk_size", integer("chunk_size", self.chunk_size, 1))
        if self.prior_weight is not None:
            weight = self.prior_weight
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
                raise UsageError(f"setting 'prior_weight': must be a number in [0, 1] or None, got {weight!r}")
            self._set("prior_weight", float(weight))


@register
class HybridSimulator(LinearIdentitySimulator):
    r"""Linear-identity with ridge towards a scaled gradient prior, and the prior's own ranking (module docstring).

    Args:
        prior: ``"tracin-cp"`` (default) or ``"grad-dot"``.
        task / task_options: the task the gradients come from (default: the runs' meta).
        chunk_size: examples per gradient pass.
        prior_weight: ``w`` of the module docstring; ``None`` (default) cross-validates it.
        **linear: the settings of :class:`~simfluence.simulators.linear.LinearSimulator`.

    Fitted state adds ``prior_weight_`` (``w``), ``prior_deviation_`` float64 ``[N, M]`` (the
    centred scaled prior times ``r_m``: :math:`D` is its additive rollout) and ``pool_`` float64
    ``[N]`` (:math:`\pi`). :attr:`coefficients` are the ridge fit's table. ``fit_info`` adds
    ``prior``, ``prior_scale`` (``s``), ``prior_seconds``, ``prior_weight`` and, when it was
    cross-validated, ``prior_weight_cv`` (per weight: held-out all-steps MSE and final-step MSE, the
    standard errors over the folds of their excess over ``w = 0``'s, and across-run Spearman).
    """

    kind = "hybrid"
    capabilities = Capabilities(
        "extension", task="required", ridge=True, cross_validation=True, device=True, precision=True,
        column_rollout=True, expected_rollout=True, transitions=True)
    config_class = HybridConfig
    config: HybridConfig

    def __init__(self, config: HybridConfig | None = None, **settings: Any):
        super().__init__(config, **settings)
        self._given_table: torch.Tensor | None = None
        self.prior_weight_: float = None  # type: ignore[assignment]  # fitted state, behind _check_fitted
        self.prior_deviation_: np.ndarray = None  # type: ignore[assignment]
        self.pool_: np.ndarray = None  # type: ignore[assignment]

    def _fit(self, runs: RunSet) -> None:
        from simfluence.simulators.base import simulator_class
        from simfluence.simulators.gradient import GradientSimulator

        config = self.config
        start = time.perf_counter()
        if self._given_table is not None:   # a cross-validation fold: the full fit's prior, no gradients
            prior_table, info = self._given_table, {}
        else:
            prior = simulator_class(f"{config.prior}-scaled")(
                task=self.task_spec, task_options=config.task_options, chunk_size=config.chunk_size,
                device=config.device, dtype=config.dtype)
            assert isinstance(prior, GradientSimulator)
            prior.fit(runs)
            prior_table = prior.table.to(torch.device(config.device), _DTYPES[config.dtype])
            info = dict(prior=config.prior, prior_scale=float(prior.scale), task=prior.fit_info.get("task"))
        seconds = time.perf_counter() - start
        self.prior_b = prior_table
        try:
            super()._fit(runs)
        finally:
            self.prior_b = None  # fitted into the table; not state of its own
        self._fit_deviation(runs, prior_table.detach().to("cpu", torch.float64).numpy())
        weight, table = config.prior_weight, None
        if weight is None:
            weight, table = self._cross_validate_weight(runs, prior_table)
        self.prior_weight_ = float(weight)
        self.fit_info.update(prior_seconds=seconds, prior_weight=self.prior_weight_, **info)
        if table is not None:
            self.fit_info["prior_weight_cv"] = table

    def _fit_deviation(self, runs: RunSet, prior_table: np.ndarray) -> None:
        """``pool_`` and ``prior_deviation_`` (the centred prior scaled to the fit's spread) from the fitting runs."""
        curricula = runs.curricula
        seen = np.bincount(curricula[curricula != PAD], minlength=runs.num_train) > 0
        self.pool_ = seen / seen.sum()
        centred = prior_table - self.pool_ @ prior_table
        initial = runs.initial_losses.astype(np.float64)
        steps = runs.eval_steps[1:]
        fit = super()._simulate(curricula, initial)[:, steps].astype(np.float64)
        fit -= self._pool_expected(runs.num_steps, runs.batch_size, initial)[:, steps]
        prior = self._deviation(centred, curricula)[:, steps]
        spread, prior_spread = (fit ** 2).sum(axis=(0, 1)), (prior ** 2).sum(axis=(0, 1))
        ratio = np.sqrt(spread / np.where(prior_spread > 0, prior_spread, 1.0)) * (prior_spread > 0)
        self.prior_deviation_ = centred * ratio

    def _pool_expected(self, num_steps: int, batch_size: int, initial: np.ndarray) -> np.ndarray:
        r""":math:`\bar P`: the ridge fit's expected trajectories ``[R, T + 1, M]`` under ``pool_`` from ``initial``."""
        weights = np.broadcast_to(self.pool_, (initial.shape[0], self.pool_.size))
        return super()._expected(weights, num_steps, batch_size, initial)

    def _deviation(self, table: np.ndarray, curricula: np.ndarray) -> np.ndarray:
        """float64 ``[R, T + 1, M']``: the additive rollout of ``table`` ``[N, M']`` from 0."""
        zeros = np.zeros((curricula.shape[0], table.shape[1]))
        return rollout(torch.as_tensor(table), curricula, zeros, 1.0, False,
                       batch_size=self._batch_size()).astype(np.float64)

    def _cross_validate_weight(self, runs: RunSet, prior_table: torch.Tensor) -> tuple[float, dict | None]:
        """``w`` by the rule of the module docstring, and its table (``None`` when too few runs to tell)."""
        from simfluence.evaluate import spearman

        num_folds = min(self.config.cv_folds, runs.num_runs // MIN_FOLD_RUNS)
        if num_folds < 2:
            return 0.0, None
        folds = run_folds(runs.num_runs, num_folds, self.config.seed)
        errors = np.zeros((len(folds), len(WEIGHTS), 2))     # held-out all-steps and final-step MSE per fold
        ranking = np.zeros(len(WEIGHTS))
        scales = example_scales(runs)                # one outlying test example does not decide (as the ridge's)
        for f, fold in enumerate(folds):
            fitting, held_out = runs.select(np.setdiff1d(np.arange(runs.num_runs), fold)), runs.select(fold)
            model = type(self)(replace(self.config, prior_weight=0.0))
            model._given_table = prior_table
            model.fit(fitting)
            parts = model._parts(held_out.curricula, held_out.initial_losses.astype(np.float64))
            truth = held_out.losses.astype(np.float64)
            steps = held_out.eval_steps
            for k, weight in enumerate(WEIGHTS):
                predicted = model._non_negative(model._mixed(*parts, weight)[:, steps])
                squared = (predicted - truth) ** 2
                errors[f, k] = [np.mean(squared[:, 1:].mean(axis=(0, 1)) / scales),
                                np.mean(squared[:, -1].mean(axis=0) / scales)]
                correlation = spearman(predicted[:, -1], truth[:, -1], axis=0)
                ranking[k] += float(np.nanmean(correlation)) / len(folds) if np.isfinite(correlation).any() \
                    else np.nan
        chosen = choose_prior_weight(WEIGHTS, errors, ranking)
        mean, (_, standard_error) = errors.mean(axis=0), excess_over(errors)
        table = {f"{weight:g}": {"mse": float(mean[k, 0]), "final_mse": float(mean[k, 1]),
                                 "mse_excess_se": float(standard_error[k, 0]),
                                 "final_mse_excess_se": float(standard_error[k, 1]),
                                 "across_run_spearman": float(ranking[k])} for k, weight in enumerate(WEIGHTS)}
        return WEIGHTS[chosen], table

    # --- prediction ---------------------------------------------------------------
    def _parts(self, curricula: np.ndarray, initial: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``P``, ``P_bar`` and ``r D`` ``[R, T + 1, M]`` (float64) of the module docstring."""
        fit = super()._simulate(curricula, initial).astype(np.float64)
        return (fit, self._pool_expected(curricula.shape[1], curricula.shape[2], initial),
                self._deviation(self.prior_deviation_, curricula))

    @staticmethod
    def _mixed(fit: np.ndarray, expected: np.ndarray, deviation: np.ndarray, weight: float) -> np.ndarray:
        return (1.0 - weight) * fit + weight * (expected + deviation)

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        if self.prior_weight_ == 0:
            return super()._simulate(curricula, initial)
        return self._mixed(*self._parts(curricula, initial), self.prior_weight_).astype(np.float32)

    def _expected(self, weights: np.ndarray, num_steps: int, batch_size: int, initial: np.ndarray) -> np.ndarray:
        fit = super()._expected(weights, num_steps, batch_size, initial)
        if self.prior_weight_ == 0:
            return fit
        # Each term is affine in the batch counts: E[D_t] = t n (weights @ prior_deviation_).
        step = self._expected_slots(batch_size) * (weights @ self.prior_deviation_)          # [P, M]
        deviation = np.arange(num_steps + 1)[None, :, None] * step[:, None, :]
        return self._mixed(fit, self._pool_expected(num_steps, batch_size, initial), deviation, self.prior_weight_)

    def column_rollout(self, test_index: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """The ridge fit's column rollout for ``test_index``, mixed with the prior's deviations as :meth:`simulate`."""
        plain = super().column_rollout(test_index)
        if plain is None or self.prior_weight_ == 0:
            return plain
        test_index = np.asarray(test_index)

        def run(curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
            fit = plain(curricula, initial).astype(np.float64)
            expected = self._pool_expected(curricula.shape[1], curricula.shape[2], initial)[:, :, test_index]
            deviation = self._deviation(self.prior_deviation_[:, test_index], curricula)
            return self._mixed(fit, expected, deviation, self.prior_weight_).astype(np.float32)

        return run

    # --- persistence --------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {**super()._arrays(), "prior_weight": np.asarray(self.prior_weight_, dtype=np.float64),
                "prior_deviation": self.prior_deviation_, "pool": self.pool_}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        super()._restore(arrays)
        num_train, num_test = self.train_ids.size, self.test_ids.size
        if "prior_weight" not in arrays:   # files saved before the prior's weight: the ridge fit alone
            self.prior_weight_, self.pool_ = 0.0, np.full(num_train, 1.0 / num_train)
            self.prior_deviation_ = np.zeros((num_train, num_test))
            return
        weight = float(arrays["prior_weight"])
        deviation = np.asarray(arrays["prior_deviation"], dtype=np.float64)
        pool = np.asarray(arrays["pool"], dtype=np.float64)
        if not 0 <= weight <= 1:
            raise ValueError(f"prior_weight {weight} is not in [0, 1]")
        if deviation.shape != (num_train, num_test) or pool.shape != (num_train,):
            raise ValueError("prior_deviation or pool shapes do not match the ids")
        self.prior_weight_, self.prior_deviation_, self.pool_ = weight, deviation, pool
