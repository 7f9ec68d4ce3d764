r"""Prediction intervals for simulated trajectories: bootstrap replicas plus a calibrated noise term.

``linear-bootstrap`` is :class:`~simfluence.simulators.linear.LinearIdentitySimulator` (its
point prediction is the same full-data fit) plus ``K`` *replicas*, each the same ridge
solve on a bootstrap resample of the fitting runs (runs are the independent unit; the
ridge strength chosen on the full data is reused, so fitting costs ``K`` extra solves).
The replicas' rollouts are blended with the mean trajectory by the point fit's weights
(``blend_``, ``nest_mean``) as its prediction is, so ``\hat L^{(k)}`` below are blended too.

For curricula ``c`` and initial losses, with ``\hat L`` the full-data rollout and
``\hat L^{(k)}`` the rollout of replica ``k``, the interval at step ``t`` for test example
``m`` is

.. math::

    \hat L_{t,m} \pm q_\ell \sqrt{s^2_{t,m} + \sigma^2_{t,m}}, \qquad
    s^2_{t,m} = \operatorname{Var}_k \hat L^{(k)}_{t,m},

* ``s^2`` (epistemic): how much the prediction moves between refits on resampled runs;
* ``\sigma^2_{t,m}`` (noise): what the replicas cannot explain. Each fitting run ``r`` is
  *out of bag* for about 37 % of the replicas; their mean ``\mu_r`` and variance ``s^2_r``
  on run ``r`` give out-of-sample residuals ``e_r = L_r - \mu_r``, and
  ``\sigma^2_{t,m} = \max(0, \operatorname{mean}_r (e^2_{r,t,m} - s^2_{r,t,m}))``
  (the expected squared error is epistemic plus noise variance);
* ``q_\ell`` (calibration): the ``\ell``-quantile of the normalised out-of-bag scores
  ``|e| / \sqrt{s^2 + \sigma^2}`` over fitting runs, steps and test examples, a
  split-conformal widening factor. So that no run scores itself, each run's score uses
  the ``\sigma^2`` estimated on the other half of the fitting runs. Held-out runs are
  never used.

Beyond the fitting runs' last step the last ``\sigma^2`` is held. Scores come from
out-of-bag ensembles fitted on ~63 % of the distinct runs, which err a little more than
the full fit: the intervals lean conservative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from simfluence.errors import UsageError
from simfluence.progress import progress_bar
from simfluence.runs.log import RunDataError, RunSet
from simfluence.simulators.base import Capabilities, register
from simfluence.simulators.config import integer, setting
from simfluence.simulators.linear import LinearConfig, LinearIdentitySimulator, Transitions, rollout

_SCORE_GRID = np.linspace(0.0, 1.0, 2001)
"""Quantile levels at which the calibration scores are kept (any interval level interpolates)."""


def interval_coverage(lower: np.ndarray, upper: np.ndarray, runs: RunSet) -> dict[str, float]:
    """How often ``runs``' recorded losses fall in ``[lower, upper]`` (each ``[R, T + 1, M]``).

    Returns the covered fraction over runs, test examples and recorded steps ``>= 1``
    (``coverage``) and at the final step (``final_coverage``), and the mean interval width
    (loss units) over the same cells (``width``, ``final_width``).
    """
    if lower.shape != upper.shape or lower.shape != (runs.num_runs, runs.num_steps + 1, runs.num_test):
        raise UsageError(f"intervals of shape {lower.shape} / {upper.shape} do not match {runs!r}")
    steps = runs.eval_steps[1:]
    true = runs.losses[:, 1:]
    low, high = lower[:, steps], upper[:, steps]
    inside = (low <= true) & (true <= high)
    width = (high - low).astype(np.float64)
    return {"coverage": float(inside.mean()), "final_coverage": float(inside[:, -1].mean()),
            "width": float(width.mean()), "final_width": float(width[:, -1].mean())}


@dataclass(frozen=True)
class BootstrapConfig(LinearConfig):
    """Settings of ``linear-bootstrap``: linear-identity's, and the number of replicas."""

    replicas: int = setting(16, "K, bootstrap refits (each a full ridge solve over all test examples); >= 4 for "
                            "out-of-bag calibration.")

    def validate(self) -> None:
        """Linear's checks, and ``replicas >= 4``."""
        super().validate()
        self._set("replicas", integer("replicas", self.replicas, 4, " (out-of-bag calibration needs several)"))


@register
class BootstrapLinearSimulator(LinearIdentitySimulator):
    """Linear-identity with bootstrap replicas and calibrated prediction intervals (module docstring).

    Args:
        replicas: ``K``, bootstrap refits (each a full ridge solve over all test examples).
        **linear: the arguments of :class:`~simfluence.simulators.linear.LinearSimulator`;
            ``seed`` also seeds the resampling.
    """

    kind = "linear-bootstrap"
    capabilities = Capabilities(
        "extension", ridge=True, cross_validation=True, device=True, precision=True, intervals=True,
        column_rollout=True, expected_rollout=True, transitions=True)

    config_class = BootstrapConfig
    config: BootstrapConfig

    def __init__(self, config: BootstrapConfig | None = None, **settings: Any):
        super().__init__(config, **settings)
        # Fitted state, None until fit or load; every use is behind _check_fitted, so typed as fitted.
        self.replica_tables: torch.Tensor = None  # type: ignore[assignment]  # [K, N, 2M]
        self.noise_variance: np.ndarray = None  # type: ignore[assignment]    # [T_fit + 1, M]
        self.score_quantiles: np.ndarray = None  # type: ignore[assignment]   # [len(_SCORE_GRID)]

    # --- fitting ------------------------------------------------------------------
    def _fit(self, runs: RunSet) -> None:
        if runs.num_runs < 4:
            raise RunDataError("<runs>", "runs", f"bootstrap intervals need at least 4 fitting runs, got "
                               f"{runs.num_runs}", "collect more runs")
        super()._fit(runs)
        ridge = self.chosen_ridge
        assert ridge is not None  # chosen by super()._fit
        rng = np.random.default_rng(self.config.seed)
        draws = rng.integers(0, runs.num_runs, (self.config.replicas, runs.num_runs))
        tables = [self._solve(Transitions.of(runs.select(draw)), ridge, initial=self.table)[0]
                  for draw in progress_bar(draws, desc="fit linear-bootstrap", unit="replica", leave=False)]
        self.replica_tables = torch.stack(tables)
        in_bag = np.zeros((self.config.replicas, runs.num_runs), dtype=bool)
        in_bag[np.arange(self.config.replicas)[:, None], draws] = True
        self._calibrate(runs, in_bag, np.random.default_rng(self.config.seed + 1).permutation(runs.num_runs) % 2)
        self.fit_info.update(replicas=self.config.replicas, interval_scale_90=self.interval_scale(0.9),
                             out_of_bag_runs=int((~in_bag).any(0).sum()))

    def _calibrate(self, runs: RunSet, in_bag: np.ndarray, half: np.ndarray) -> None:
        """Noise variance and conformal score quantiles from out-of-bag residuals (module docstring)."""
        replicas = self._replica_rollouts(runs.curricula, runs.initial_losses.astype(np.float64))
        replicas = replicas[:, :, runs.eval_steps].astype(np.float64)  # [K, R, E, M]
        out_of_bag = ~in_bag
        usable = out_of_bag.sum(0) >= 2  # a variance needs two out-of-bag replicas
        if usable.sum() < 2 or len(set(half[usable])) < 2:
            raise RunDataError("<runs>", "runs", "too few runs are out of bag in two or more replicas to calibrate "
                               "the intervals", "raise replicas or fit on more runs")
        weights = out_of_bag[:, usable, None, None].astype(np.float64)
        count = weights.sum(0)
        mean = (replicas[:, usable] * weights).sum(0) / count
        spread = (((replicas[:, usable] - mean) ** 2) * weights).sum(0) / (count - 1)
        squared_error = (runs.losses[usable].astype(np.float64) - mean) ** 2
        excess = squared_error - spread  # [R', E, M]
        half = half[usable]

        def noise(rows: np.ndarray) -> np.ndarray:
            return np.maximum(excess[rows].mean(0), 0.0)

        scores = []
        for part in (0, 1):
            other = noise(half != part)
            mine = half == part
            scale = np.sqrt(spread[mine] + other)[:, 1:]
            error = np.sqrt(squared_error[mine])[:, 1:]
            scores.append(np.where(scale > 0, error / np.where(scale > 0, scale, 1.0), np.where(error > 0, np.inf, 0)))
        self.score_quantiles = np.quantile(np.concatenate([s.ravel() for s in scores]), _SCORE_GRID)
        variance = noise(np.ones(half.size, dtype=bool))
        steps = np.arange(runs.num_steps + 1)
        self.noise_variance = np.stack([np.interp(steps, runs.eval_steps, variance[:, m])
                                        for m in range(runs.num_test)], axis=1)

    # --- prediction ---------------------------------------------------------------
    def interval_scale(self, level: float) -> float:
        """``q_level``: the calibrated multiple of the predictive standard deviation."""
        self._check_fitted()
        if not 0 < level < 1:
            raise UsageError(f"level must lie strictly between 0 and 1 (e.g. 0.9), got {level}")
        return float(np.interp(level, _SCORE_GRID, self.score_quantiles))

    def _replica_rollouts(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        """float32 ``[K, R, T + 1, M]``: every replica rolled out at once (one wide table)."""
        replicas, num_train, width = self.replica_tables.shape
        num_test = width // 2
        # rollout reads [A | B] with num_test = initial's width: lay the replicas side by side in each half.
        halves = self.replica_tables.view(replicas, num_train, 2, num_test).permute(1, 2, 0, 3)
        wide = halves.reshape(num_train, 2 * replicas * num_test)
        out = rollout(wide, curricula, np.tile(initial, (1, replicas)), self.alpha_offset, self.fit_alpha,
                      batch_size=self._batch_size())
        out = out.reshape(*out.shape[:2], replicas, num_test).transpose(2, 0, 1, 3)  # [K, R, T + 1, M]
        # Blended with the mean trajectory as the point prediction is (blend_, linear's nest_mean).
        stacked = self._blended(out.reshape(-1, *out.shape[2:]), np.tile(initial, (replicas, 1)))
        return stacked.reshape(out.shape)

    def simulate_replicas(self, curricula: Any, initial_losses: Any, source: str = "<input>") -> np.ndarray:
        """float32 ``[K, R, T + 1, M]``: the bootstrap replicas' trajectories (inputs as in ``simulate``)."""
        _, curricula, initial = self._validated(curricula, initial_losses, source)
        return self._replica_rollouts(curricula, initial)

    def simulate_interval(self, curricula: Any, initial_losses: Any, level: float = 0.9,
                          source: str = "<input>") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lower, prediction, upper)``, each float32 ``[R, T + 1, M]`` (``[T + 1, M]`` for one run).

        ``prediction`` is :meth:`simulate`'s; the band is meant to hold a share ``level`` of
        real trajectories (checked on held-out runs, see ``benchmarks/uncertainty.py``).
        """
        scale = self.interval_scale(level)
        single = np.ndim(curricula) == 2
        prediction, curricula, initial = self._validated(curricula, initial_losses, source)
        spread = self._replica_rollouts(curricula, initial).astype(np.float64).var(axis=0, ddof=1)
        steps = np.minimum(np.arange(curricula.shape[1] + 1), self.noise_variance.shape[0] - 1)
        half_width = scale * np.sqrt(spread + self.noise_variance[steps][None])
        lower = (prediction - half_width).astype(np.float32)
        upper = (prediction + half_width).astype(np.float32)
        return (lower[0], prediction[0], upper[0]) if single else (lower, prediction, upper)

    def _validated(self, curricula: Any, initial_losses: Any, source: str) -> tuple[np.ndarray, ...]:
        """``simulate``'s prediction ``[R, T + 1, M]``, curricula ``[R, T, B]``, initial losses ``[R, M]``.

        ``simulate`` validates the inputs.
        """
        prediction = self.simulate(curricula, initial_losses, source)
        curricula, initial = np.asarray(curricula, dtype=np.int32), np.asarray(initial_losses, dtype=np.float64)
        if curricula.ndim == 2:
            return prediction[None], curricula[None], initial[None]
        return prediction, curricula, initial

    # --- persistence --------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {**super()._arrays(), "replica_tables": self.replica_tables.cpu().numpy(),
                "noise_variance": self.noise_variance, "score_quantiles": self.score_quantiles}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        super()._restore(arrays)
        tables, noise, scores = arrays["replica_tables"], arrays["noise_variance"], arrays["score_quantiles"]
        expected = (self.config.replicas, *self.table.shape)
        if tables.shape != expected:
            raise ValueError(f"replica_tables has shape {tables.shape}, expected {expected}")
        if noise.ndim != 2 or noise.shape[1] != self.test_ids.size:
            raise ValueError(f"noise_variance has shape {noise.shape}, expected [steps + 1, {self.test_ids.size}]")
        if scores.shape != _SCORE_GRID.shape:
            raise ValueError(f"score_quantiles has shape {scores.shape}, expected {_SCORE_GRID.shape}")
        self.replica_tables = torch.as_tensor(tables, device=self.table.device)
        self.noise_variance, self.score_quantiles = noise, scores
