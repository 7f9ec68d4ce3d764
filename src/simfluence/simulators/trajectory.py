r"""``linear-trajectory``: a linear model of the whole rolled-out trajectory that knows the step.

Simfluence-Linear predicts one step from the last and compounds its errors over the rollout;
its effects are the same at every step. Real fine-tuning (AdamW, warm-up and decay) breaks
both: an example's effect scales with the step's learning rate, Adam's momentum carries a
batch's gradient into the following steps, and later training partly overwrites earlier
steps. This simulator models the trajectory itself:

.. math::

    z^m_t = z^m_0 + G^m_t + F_t \cdot b^m, \qquad
    F_t = \delta^{s_t}\, F_{t-1} + s_t\, u_t, \qquad
    u_t = \rho\, u_{t-1} + (1 - \rho)\, x_t,

* :math:`z = L` (``space="loss"``), :math:`z = \log L` (``space="log"``: effects
  proportional to the loss, predictions never negative) or :math:`z = \log(e^L - 1)`
  (``space="margin"``, the inverse of softplus: for a cross-entropy :math:`L =
  \log(1 + e^{-\text{margin}})` this is minus the margin, in which training moves a
  classifier about linearly; like ``log`` for small losses and like ``loss`` for large ones);
* :math:`x_t \in \mathbb{R}^N`: the batch of step ``t`` as example counts divided by the
  batch size, each example's count weighted by :math:`\gamma^{n_{t,i}}` (``repeat_decay``
  :math:`\gamma`, :math:`n_{t,i}` the times example ``i`` was trained on before step ``t`` in
  this run): with :math:`\gamma < 1` an example the model has already seen teaches less each
  time it comes back (1: every occurrence as much as the first); :math:`u_t` its
  momentum-smoothed form (``momentum`` :math:`\rho`, Adam's :math:`\beta_1` where the runs name
  it; 0 for SGD);
* :math:`s_t = \eta_t / \max_k \eta_k`: the step's learning rate (read from the runs' meta:
  the rates the recorder saw, else the task's schedule), or 1 with ``schedule=False``;
* :math:`\delta` (``decay``): how much of an earlier step's effect survives each later step
  taken at the full learning rate (1: effects are permanent). A step at rate :math:`s_t` keeps
  :math:`\delta^{s_t}`: later training overwrites earlier effects as far as it moves the model,
  so the small steps of a warm-up or of a decay's tail forget little. Under a constant rate this
  is :math:`\delta` per step. (On 4 splits of 48 minilm-finetune runs, 36 fitting / 12 held out,
  against :math:`\delta` per step whatever the rate: ``gradient-trajectory``'s final-step MSE fell
  from 1.00x to 0.81x the mean trajectory's, all-steps from 0.70x to 0.67x, across-run Spearman
  rose from 0.31 to 0.40; ``docs/benchmarks.md``.)
* :math:`G^m_t`: a free term per step and test example. With :math:`b = 0` the model is
  exactly the mean-trajectory baseline (in loss space), so it nests that baseline;
* :math:`b^m \in \mathbb{R}^N`: the effect of each training example on test example ``m``.

Because the rollout is linear in the parameters, the fit minimises the error of the rolled-out
trajectory directly (all recorded steps of every fitting run), not of one-step transitions:
with :math:`G` free, :math:`b^m` is the ridge regression of the per-step-centred trajectories
on the per-step-centred features :math:`F`, and :math:`G^m_t = \overline{z_t - z_0} - \bar F_t
\cdot b^m`. The ridge strength is chosen **per test example** by K-fold cross-validation over
fitting runs on a grid scaled to the features' spectrum (extended when the best value lies on
an edge), so one extreme test example cannot set it for the others; ``space``, ``momentum``,
``decay`` and ``repeat_decay`` are chosen by the same cross-validation (total held-out-fold
all-steps MSE in loss units; ``decay`` on :data:`DECAYS`, extended to faster forgetting where its
fastest is chosen; ``repeat_decay`` on :data:`REPEAT_DECAYS`) unless fixed.

Test examples that are alike are moved by the same training examples (same class, same
topic), so the effect matrix :math:`B = [b^1 \dots b^M]` (``[N, M]``) is close to low rank.
With few fitting runs the per-pair estimates are noisy; ``rank`` keeps the ``k`` leading
directions of the fitted trajectories (reduced-rank ridge: :math:`B_k = B\, V_k V_k^\top`, with
:math:`V_k` the top right singular vectors of the fitted centred trajectories :math:`X B`), so
every test example borrows strength from the ones like it. ``rank="auto"`` cross-validates
``k`` over powers of two and the full rank.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from simfluence.errors import UsageError
from simfluence.func.spaces import (
    SPACES,
    candidate_spaces,
    check_initial,
    control_variate_mean,
    from_space,
    loss_bounds,
    to_space,
)
from simfluence.runs.log import PAD, RunSet
from simfluence.simulators.base import Capabilities, Simulator, pool_curricula, register, run_folds
from simfluence.simulators.config import SimulatorConfig, boolean, integer, one_of, positive, setting

DECAYS = (1.0, 0.97, 0.9, 0.8, 0.7, 0.5)
REPEAT_DECAYS = (1.0, 0.5, 0.25)
r"""The :math:`\gamma` cross-validated by default. On held-out runs (``docs/benchmarks.md``) 0.5 lowered
``gradient-trajectory``'s all-steps error on text-minilm from 0.445x to 0.295x the mean trajectory's
while 1 was best on tiny-lm (0.318x against 0.417x at 0.5): the data decide."""
MIN_DECAY = 1e-4
"""Where the grid's fastest forgetting is chosen it is squared (0.25, 0.0625, ...) while that lowers the
cross-validated error, down to this."""
GRID_DECADES = (-8.0, 1.0)
GRID_STEP = 0.5
"""Ridge grid: ``10**e`` times the features' largest Gram eigenvalue, ``e`` in steps of half a decade."""
MIN_CV_RUNS = 4
"""With fewer fitting runs nothing is cross-validated: loss space, no forgetting, and a ridge
as large as the features' largest eigenvalue (effects strongly shrunk towards the mean
trajectory)."""
ADAM_OPTIMIZERS = ("adam", "adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused")


def batch_matrix(curricula: np.ndarray, num_train: int) -> np.ndarray:
    """float64 ``[R, T, N]``: example counts of each step's batch divided by the batch's size."""
    runs, steps, _ = curricula.shape
    x = np.zeros((runs, steps, num_train))
    r, t, slot = np.nonzero(curricula != PAD)
    sizes = np.maximum((curricula != PAD).sum(axis=2), 1)
    np.add.at(x, (r, t, curricula[r, t, slot]), 1.0 / sizes[r, t])
    return x


def repeat_weights(curricula: np.ndarray, num_train: int, repeat_decay: float) -> np.ndarray:
    r"""float64 ``[R, T, N]``: :math:`\gamma^{n_{t,i}}`, ``n`` the occurrences of ``i`` in the run before step ``t``."""
    runs, steps, _ = curricula.shape
    counts = np.zeros((runs, steps, num_train))
    r, t, slot = np.nonzero(curricula != PAD)
    np.add.at(counts, (r, t, curricula[r, t, slot]), 1.0)
    return float(repeat_decay) ** (np.cumsum(counts, axis=1) - counts)


def step_rates(rates: np.ndarray, num_steps: int) -> np.ndarray:
    """float64 ``[T]``: the :math:`s_t` of ``num_steps`` steps from ``rates`` (past its end: its last value)."""
    rates = np.asarray(rates, dtype=np.float64)
    return rates[np.minimum(np.arange(num_steps), len(rates) - 1)]


def trajectory_features(curricula: np.ndarray, num_train: int, rates: np.ndarray, momentum: float,
                        decay: float, per_rate: bool = True, repeat_decay: float = 1.0) -> np.ndarray:
    r"""float64 ``[R, T + 1, N]``: :math:`F_t` of the module docstring (``F_0 = 0``).

    ``rates`` is float ``[T]`` (the :math:`s_t`, steps past its end use its last value). Each step
    keeps :math:`\delta^{s_t}` of the features before it; ``per_rate=False``: :math:`\delta`
    whatever the rate (models saved before the per-rate forgetting). Each count is weighted by
    ``repeat_decay`` to the power of the example's earlier occurrences in the run (:func:`repeat_weights`).
    """
    x = batch_matrix(curricula, num_train)
    if repeat_decay != 1.0:
        x *= repeat_weights(curricula, num_train, repeat_decay)
    runs, steps, _ = x.shape
    scale = step_rates(rates, steps)
    kept = kept_fraction(decay, scale, per_rate)
    features = np.zeros((runs, steps + 1, num_train))
    smoothed = np.zeros((runs, num_train))
    for t in range(steps):
        smoothed = momentum * smoothed + (1.0 - momentum) * x[:, t]
        features[:, t + 1] = kept[t] * features[:, t] + scale[t] * smoothed
    return features


def kept_fraction(decay: float, scale: np.ndarray, per_rate: bool = True) -> np.ndarray:
    r"""float64 ``[T]``: the share of the earlier features each step keeps, :math:`\delta^{s_t}` (or :math:`\delta`)."""
    return decay ** scale if per_rate else np.full(scale.shape, float(decay))


def step_weights(runs: RunSet) -> np.ndarray:
    """float64 ``[T]``: each step's learning rate over the largest (ones if the runs do not say)."""
    from simfluence.tasks.schedules import run_learning_rates

    rates = run_learning_rates(runs.meta, runs.num_steps)
    if rates is None or not np.isfinite(rates).all() or rates.max() <= 0:
        return np.ones(runs.num_steps)
    return rates / rates.max()


def adam_momentum(meta: dict) -> float | None:
    """Adam's ``beta1`` when the runs' meta says they were trained with Adam(W), else ``None``."""
    trainer = meta.get("trainer")
    if not isinstance(trainer, dict):
        trainer = {}
    optimizer = str(trainer.get("optim") or meta.get("optimizer") or "").lower()
    if optimizer.startswith("adam") or optimizer in ADAM_OPTIMIZERS:
        beta1 = trainer.get("adam_beta1", 0.9)
        return float(beta1) if isinstance(beta1, (int, float)) and 0 <= beta1 < 1 else 0.9
    return None


@dataclass(frozen=True)
class TrajectoryConfig(SimulatorConfig):
    """Settings of ``linear-trajectory``; ``"auto"`` settings are chosen by cross-validation."""

    ridge: float | None = setting(None, "Fixed ridge strength (absolute) for every test example; None: one per "
                                  "test example by cross-validation.")
    space: str = setting("auto", "'loss', 'log', 'margin' or 'auto' ('log' and 'margin' only where every fitting "
                         "loss is positive).")
    momentum: float | str = setting("auto", "rho in [0, 1), or 'auto': {0, beta1} for runs trained with Adam(W), "
                                    "else 0.")
    decay: float | str = setting("auto", "delta in (0, 1], or 'auto': cross-validated over DECAYS (extended "
                                 "below its smallest value where that one is chosen).")
    repeat_decay: float | str = setting("auto", "gamma in (0, 1]: an example's k-th occurrence in a run counts "
                                        "gamma^(k-1) (1: every occurrence as much as the first), or 'auto': "
                                        "cross-validated over REPEAT_DECAYS.")
    rank: int | str = setting("auto", "Keep the k leading directions of the effect matrix (0: full rank), or "
                              "'auto': 1, 2, 4, ... and the full rank.")
    schedule: bool = setting(True, "Scale each step's effects by its learning rate (from the runs' meta).")
    cv_folds: int = setting(3, "Folds of fitting runs for the cross-validation.")
    seed: int = setting(0, "The folds' shuffle.")

    def validate(self) -> None:
        """Check each setting's range."""
        self._set("ridge", positive("ridge", self.ridge, allow_none=True, allow_zero=True))
        one_of("space", self.space, (*SPACES, "auto"))
        if self.momentum != "auto" and not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise UsageError(f"momentum: expected a number in [0, 1) or 'auto', got {self.momentum!r}")
        for name in ("decay", "repeat_decay"):
            value = getattr(self, name)
            if value != "auto" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        and 0 < value <= 1):
                raise UsageError(f"{name}: expected a number in (0, 1] or 'auto', got {value!r}")
        if self.rank != "auto":
            self._set("rank", integer("rank", self.rank, 0, " (0: full rank) or 'auto'"))
        self._set("schedule", boolean("schedule", self.schedule))
        self._set("cv_folds", integer("cv_folds", self.cv_folds, 2))
        self._set("seed", integer("seed", self.seed, 0))


@register
class TrajectorySimulator(Simulator):
    r"""Linear model of the rolled-out trajectory with step-aware effects (see the module docstring).

    Args:
        ridge: fixed ridge strength for every test example; ``None`` (default) chooses one per
            test example by cross-validation.
        space: ``"loss"``, ``"log"``, ``"margin"`` or ``"auto"`` (cross-validated; ``"log"`` and
            ``"margin"`` only where every fitting loss is positive).
        momentum: :math:`\rho` in ``[0, 1)``, or ``"auto"``: cross-validated over ``{0, beta1}``
            for runs trained with Adam(W) (their meta says so), else 0.
        decay: :math:`\delta` in ``(0, 1]``, or ``"auto"``: cross-validated over
            :data:`DECAYS`, squared while that helps where its smallest value is chosen.
        repeat_decay: :math:`\gamma` in ``(0, 1]``, or ``"auto"``: cross-validated over
            :data:`REPEAT_DECAYS`.
        rank: keep the ``k`` leading directions of the effect matrix (0: full rank), or
            ``"auto"``: cross-validated over 1, 2, 4, ... and the full rank.
        schedule: scale each step's effects by its learning rate (from the runs' meta).
        cv_folds: folds of fitting runs for the cross-validation.
        seed: the folds' shuffle.

    Fitted state: ``coef_`` float64 ``[N, M]`` (:math:`b`), ``offset_`` ``[T_fit + 1, M]``
    (:math:`G`), ``rates_`` ``[T_fit]`` (:math:`s`), ``ridge_`` ``[M]``, and the chosen
    ``space_``, ``momentum_``, ``decay_``, ``repeat_decay_``; ``per_rate_`` (``True``: a step keeps
    :math:`\delta^{s_t}`; ``False`` only in models saved before, which kept :math:`\delta` per step).
    """

    kind = "linear-trajectory"
    capabilities = Capabilities("learned", ridge=True, cross_validation=True, expected_rollout=True)

    config_class = TrajectoryConfig
    config: TrajectoryConfig

    # --- fitting ---------------------------------------------------------------------
    def _effect_prior(self, runs: RunSet) -> np.ndarray | None:
        """float64 ``[K, N, M]``: the directions :math:`p^m_k` each effect vector is shrunk towards (``None``: 0)."""
        return None

    def _fit(self, runs: RunSet) -> None:
        config = self.config
        prior = as_priors(self._effect_prior(runs), (runs.num_train, runs.num_test))
        losses = runs.losses.astype(np.float64)
        rates = step_weights(runs) if config.schedule else np.ones(runs.num_steps)
        spaces = candidate_spaces(config.space, losses)
        beta1 = adam_momentum(runs.meta)
        momenta = [float(config.momentum)] if config.momentum != "auto" else ([0.0] if beta1 is None else [0.0, beta1])
        decays = [float(config.decay)] if config.decay != "auto" else list(DECAYS)
        repeats = [float(config.repeat_decay)] if config.repeat_decay != "auto" else list(REPEAT_DECAYS)
        folds = run_folds(runs.num_runs, config.cv_folds, config.seed)
        table: list[dict] = []
        if runs.num_runs < MIN_CV_RUNS:   # too few runs to cross-validate: strong shrinkage, no choices
            space = "loss" if config.space == "auto" else config.space
            momentum, decay = momenta[-1], 1.0 if config.decay == "auto" else decays[0]
            repeat = 1.0 if config.repeat_decay == "auto" else repeats[0]
            features = trajectory_features(runs.curricula, runs.num_train, rates, momentum, decay,
                                           repeat_decay=repeat)[:, runs.eval_steps]
            target = to_space(losses, space)
            x = _centred(features, target)[0]
            strong = float(np.linalg.eigvalsh(x.T @ x).max()) if x.size else 1.0
            if prior is not None:   # with a prior, the strongest shrinkage is the scaled prior itself
                strong = np.inf
            error, ridges = float("nan"), np.full(runs.num_test, config.ridge if config.ridge is not None else strong)
            rank = config.rank if isinstance(config.rank, int) else 0   # "auto" without a search: full rank
        else:
            best: tuple | None = None   # only the best setting's arrays are kept

            def consider(setting: tuple[str, float, float, float]) -> bool:
                """Cross-validate one (space, momentum, decay, repeat_decay); keep it if best so far. Whether it was."""
                nonlocal best
                space, momentum, decay, repeat = setting
                features = trajectory_features(runs.curricula, runs.num_train, rates, momentum, decay,
                                               repeat_decay=repeat)[:, runs.eval_steps]
                target = to_space(losses, space)
                ridges, error = _cross_validate(features, target, losses, space, folds, config.ridge, prior)
                table.append({"space": space, "momentum": momentum, "decay": decay, "repeat_decay": repeat,
                              "cv_mse": error})
                if best is None or error < best[0]:
                    best = (error, setting, features, target, ridges)
                    return True
                return False

            for setting in itertools.product(spaces, momenta, decays, repeats):
                consider(setting)
            assert best is not None   # the grid has at least one setting
            if config.decay == "auto":   # the fastest forgetting won: square it while that helps
                space, momentum, decay, repeat = best[1]
                while decay == min(decays) and decay > MIN_DECAY and consider((space, momentum, decay ** 2, repeat)):
                    decays.append(decay := decay ** 2)
            error, (space, momentum, decay, repeat), features, target, ridges = best
            ranks = [config.rank] if isinstance(config.rank, int) else _ranks(runs.num_train, runs.num_test)
            rank_errors = _rank_errors(features, target, losses, space, folds, ridges, ranks, prior)
            error, rank = min(zip(rank_errors, ranks))
            if config.ridge is None:   # chosen on (K-1)/K of the runs: scale to the Gram of all of them
                ridges = ridges * len(folds) / (len(folds) - 1)
        coef, offset, scale = _solve(features, target, ridges, rank, prior)
        self.coef_, self.ridge_, self.rates_, self.prior_scale_ = coef, ridges, rates, scale
        self.space_, self.momentum_, self.decay_, self.per_rate_ = space, momentum, decay, True
        self.repeat_decay_ = float(repeat)
        self.offset_ = _interpolate(offset, runs.eval_steps, runs.num_steps)
        self.floor_, self.ceiling_ = loss_bounds(losses)
        self.rank_ = rank
        finite = ridges[np.isfinite(ridges)]
        self.fit_info.update({"space": space, "momentum": momentum, "decay": decay, "repeat_decay": repeat,
                              "rank": rank, "cv_mse": error,
                              "ridge_median": float(np.median(finite)) if finite.size else None, "cv_table": table})

    # --- simulation ------------------------------------------------------------------
    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        return self._losses(self._effects(curricula), initial).astype(np.float32)

    def _effects(self, curricula: np.ndarray) -> np.ndarray:
        """float64 ``[R, T + 1, M]``: the fitted effects :math:`F_t b` along ``curricula`` ``[R, T, B]``."""
        features = trajectory_features(curricula, self.train_ids.size, self.rates_, self.momentum_, self.decay_,
                                       self.per_rate_, self.repeat_decay_)
        return features @ self.coef_

    @property
    def expected_estimator(self) -> str:
        """``"closed form"`` in loss space; ``"control variate"`` (around :math:`E[z_t]`) in ``log`` / ``margin``."""
        return "closed form" if self.space_ == "loss" else "control variate"

    def _expected(self, weights: np.ndarray, num_steps: int, batch_size: int, initial: np.ndarray) -> np.ndarray:
        """float64 ``[P, T + 1, M]``: the losses of the expected batch (:meth:`_expected_effects`).

        In loss space :math:`E[L_t]` (where the clip to the fitting losses' range does not bind); in
        ``log`` / ``margin`` space the loss at :math:`E[z_t]`, which :meth:`_sampled_expected` corrects.
        """
        return self._losses(self._expected_effects(weights, num_steps, batch_size), initial)

    def _sampled_expected(self, pools: np.ndarray, num_steps: int, batch: int, initial: np.ndarray, draws: int,
                          seed: int, source: str, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[P, T + 1, M]``: in ``log`` / ``margin`` space :math:`E[f(z_t)]` by a control variate.

        The ``draws`` curricula of :meth:`Simulator._sampled_expected` (the same seeds) around the
        exact :math:`E[z_t]` (:func:`~simfluence.func.spaces.control_variate_mean`); in loss space the
        plain mean (the base class's).
        """
        if self.space_ == "loss":
            return super()._sampled_expected(pools, num_steps, batch, initial, draws, seed, source, rows)
        effects = self._expected_effects(pools / pools.sum(axis=1, keepdims=True), num_steps, batch)
        mean_z = self._z(effects, initial)
        trajectories = np.full((pools.shape[0], num_steps + 1, self.test_ids.size), np.nan, dtype=np.float32)
        for p in range(pools.shape[0]) if rows is None else rows:
            curricula = pool_curricula(pools[p], num_steps, batch, draws, seed, p)
            z = self._z(self._effects(curricula), np.repeat(initial[p][None], draws, 0))
            trajectories[p] = control_variate_mean(z, mean_z[p], self.space_, self.floor_, self.ceiling_)
            trajectories[p, 0] = initial[p]
        return trajectories

    def _expected_effects(self, weights: np.ndarray, num_steps: int, batch_size: int) -> np.ndarray:
        r"""float64 ``[P, T + 1, M]``: :math:`E[F_t\, b]`, the effects of the expected batch :math:`E[x_t] = w`.

        With :math:`x_t = w` at every step, :math:`u_t = (1 - \rho^t)\, w` and :math:`F_t = c_t\, w`
        with the scalar :math:`c_t = \delta^{s_t} c_{t-1} + s_t (1 - \rho^t)`, so one product :math:`w\, b`
        serves every step. :math:`z` is linear in :math:`x`, so :meth:`_z` of these is :math:`E[z_t]`
        exactly.

        With :math:`\gamma < 1` (``repeat_decay_``) an example's weight depends on its earlier
        occurrences, which are independent of the step's own draw: with ``B`` slots each holding
        ``i`` with probability :math:`w_i`, :math:`E[x_{t,i}] = w_i (1 - w_i (1 - \gamma))^{B t}`
        (steps counted from 0), and the recurrence runs on that vector per pool.
        """
        scale = step_rates(self.rates_, num_steps)
        kept = kept_fraction(self.decay_, scale, self.per_rate_)
        if self.repeat_decay_ != 1.0:
            kept_per_step = (1.0 - weights * (1.0 - self.repeat_decay_)) ** batch_size    # [P, N]
            smoothed, features = np.zeros(weights.shape), np.zeros(weights.shape)
            effects = np.zeros((weights.shape[0], num_steps + 1, self.coef_.shape[1]))
            for t in range(num_steps):
                smoothed = self.momentum_ * smoothed + (1.0 - self.momentum_) * weights * kept_per_step ** t
                features = kept[t] * features + scale[t] * smoothed
                effects[:, t + 1] = features @ self.coef_
            return effects
        c = np.zeros(num_steps + 1)
        for t in range(num_steps):
            c[t + 1] = kept[t] * c[t] + scale[t] * (1.0 - self.momentum_ ** (t + 1))
        return c[None, :, None] * (weights @ self.coef_)[:, None, :]

    def _z(self, effects: np.ndarray, initial: np.ndarray) -> np.ndarray:
        """float64 ``[R, T + 1, M]``: the z of effects :math:`F_t b` ``[R, T + 1, M]`` from ``initial`` ``[R, M]``.

        Losses a ``log`` / ``margin`` model cannot take raise one clear error (:func:`check_initial`).
        """
        steps = np.minimum(np.arange(effects.shape[1]), self.offset_.shape[0] - 1)
        check_initial(initial, self.space_)
        return to_space(initial[:, None, :], self.space_) + self.offset_[steps][None] + effects

    def _losses(self, effects: np.ndarray, initial: np.ndarray) -> np.ndarray:
        """float64 ``[R, T + 1, M]`` losses of effects :math:`F_t b` ``[R, T + 1, M]`` from ``initial`` ``[R, M]``."""
        losses = from_space(self._z(effects, initial), self.space_, self.floor_, self.ceiling_)
        losses[:, 0] = initial
        return losses

    # --- persistence -----------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef_, "offset": self.offset_, "rates": self.rates_, "ridge": self.ridge_,
                "choice": np.array([SPACES.index(self.space_), self.momentum_, self.decay_, self.floor_, self.rank_,
                                    self.ceiling_, float(self.per_rate_), self.repeat_decay_])}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.coef_, self.offset_, self.rates_, self.ridge_ = (np.asarray(arrays[key], dtype=np.float64)
                                                              for key in ("coef", "offset", "rates", "ridge"))
        choice = np.asarray(arrays["choice"], dtype=np.float64)
        n, m = self.train_ids.size, self.test_ids.size
        if self.coef_.shape != (n, m) or self.offset_.ndim != 2 or self.offset_.shape[1] != m or \
                choice.shape not in ((6,), (7,), (8,)):
            raise ValueError("array shapes do not match the ids")
        if int(choice[0]) not in range(len(SPACES)):
            raise ValueError("'choice' names no known space")
        self.space_, self.momentum_, self.decay_, self.floor_ = SPACES[int(choice[0])], *map(float, choice[1:4])
        self.rank_, self.ceiling_ = int(choice[4]), float(choice[5])
        self.per_rate_ = bool(choice[6]) if choice.size > 6 else False   # files from before: delta per step
        self.repeat_decay_ = float(choice[7]) if choice.size > 7 else 1.0   # files from before: every occurrence
        if not 0 < self.repeat_decay_ <= 1:
            raise ValueError("'choice' holds a repeat_decay outside (0, 1]")


def _interpolate(offset: np.ndarray, eval_steps: np.ndarray, num_steps: int) -> np.ndarray:
    """``[K, M]`` at ``eval_steps`` -> ``[T + 1, M]`` at every step (linear between evaluations)."""
    if offset.shape[0] == num_steps + 1:
        return offset
    steps = np.arange(num_steps + 1)
    return np.stack([np.interp(steps, eval_steps, offset[:, m]) for m in range(offset.shape[1])], axis=1)


def _centred(features: np.ndarray, target: np.ndarray):
    """Per-step centring over runs, steps ``1..`` only: ``(F - mean F, Δz - mean Δz)`` flattened, and the means."""
    delta = target[:, 1:] - target[:, :1]
    f_mean, d_mean = features[:, 1:].mean(axis=0), delta.mean(axis=0)
    x = (features[:, 1:] - f_mean).reshape(-1, features.shape[-1])
    y = (delta - d_mean).reshape(-1, target.shape[-1])
    return x, y, f_mean, d_mean


def _prior_fit(x: np.ndarray, y: np.ndarray, prior: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(s [K, M], y - sum_k s_k * (x @ prior_k))``: each test example's least-squares scales of its priors.

    ``prior`` is float ``[K, N, M]`` (``K`` prior columns per test example, fitted jointly; the
    minimum-norm solution where they are collinear or zero). Without a prior the scales are
    ``[0, M]`` and ``y`` is unchanged.
    """
    if prior is None:
        return np.zeros((0, y.shape[-1])), y
    fitted = np.stack([x @ column for column in prior])                  # [K, S, M]
    gram = np.einsum("ksm,lsm->mkl", fitted, fitted)                      # [M, K, K]
    rhs = np.einsum("ksm,sm->mk", fitted, y)                              # [M, K]
    scale = (np.linalg.pinv(gram, hermitian=True) @ rhs[..., None])[..., 0].T   # [K, M]
    return scale, y - np.einsum("ksm,km->sm", fitted, scale)


def _prior_effects(prior: np.ndarray | None, scale: np.ndarray) -> np.ndarray | None:
    """The scaled priors ``sum_k s_k prior_k`` as one float ``[N, M]`` effect matrix (``None``: no prior)."""
    return None if prior is None else np.einsum("knm,km->nm", prior, scale)


def as_priors(prior: np.ndarray | None, shape: tuple[int, int] | None) -> np.ndarray | None:
    """``prior`` (``[N, M]`` or ``[K, N, M]``) as float64 ``[K, N, M]``; checked against ``shape = (N, M)`` if given."""
    if prior is None:
        return None
    prior = np.asarray(prior, dtype=np.float64)
    prior = prior[None] if prior.ndim == 2 else prior
    if prior.ndim != 3 or prior.shape[0] < 1 or (shape is not None and prior.shape[1:] != tuple(shape)):
        expected = "" if shape is None else f" with (N, M) = {tuple(shape)}"
        raise ValueError(f"prior has shape {prior.shape}, expected [N, M] or [K, N, M]{expected}")
    return prior


def _shrunk(values: np.ndarray, projected: np.ndarray, ridges) -> np.ndarray:
    """``projected / (values + ridge)`` per column; an infinite ridge gives 0 (no residual)."""
    ridges = np.broadcast_to(np.asarray(ridges, dtype=np.float64), (projected.shape[-1],))
    out = np.zeros_like(projected)
    finite = np.isfinite(ridges)
    out[:, finite] = projected[:, finite] / (values[:, None] + ridges[None, finite])
    return out


def _solve(features: np.ndarray, target: np.ndarray, ridges: np.ndarray, rank: int = 0,
           prior: np.ndarray | None = None):
    """Ridge coefficients ``[N, M]``, the per-step offsets ``[E, M]`` and the priors' scales ``[K, M]``.

    One ridge strength per test example (``inf``: the scaled prior alone); the coefficients
    (the residual around the scaled prior, when there is one) are reduced to ``rank`` unless 0.
    """
    x, y, f_mean, d_mean = _centred(features, target)
    scale, y = _prior_fit(x, y, prior)
    values, vectors = np.linalg.eigh(x.T @ x)
    projected = vectors.T @ (x.T @ y)                                  # [N, M]
    coef = vectors @ _shrunk(np.maximum(values, 0), projected, ridges)
    if rank:
        coef = _reduce(coef, x, [rank])[0]
    if prior is not None:
        coef = coef + _prior_effects(prior, scale)
    offset = np.vstack([np.zeros((1, target.shape[-1])), d_mean - f_mean @ coef])
    return coef, offset, scale


def _ranks(num_train: int, num_test: int) -> list[int]:
    """Candidate ranks: 1, 2, 4, ... below ``min(N, M)``, and 0 (full rank)."""
    limit = min(num_train, num_test)
    return [2 ** k for k in range(int(math.log2(max(limit, 1))) + 1) if 2 ** k < limit] + [0]


def _reduce(coef: np.ndarray, x: np.ndarray, ranks: list[int]) -> list[np.ndarray]:
    """``coef`` ``[N, M]`` reduced to each rank (0: unchanged).

    That is ``B V_k V_k^T`` with ``V`` the right singular vectors of the fitted values ``x @ coef``.
    """
    fitted = x @ coef
    _, vectors = np.linalg.eigh(fitted.T @ fitted)            # right singular vectors, ascending
    vt = vectors[:, ::-1].T
    return [coef if not k else (coef @ vt[:k].T) @ vt[:k] for k in ranks]


def _rank_errors(features, target, losses, space, folds, ridges, ranks, prior=None) -> list[float]:
    """Held-out-fold all-steps MSE (loss units) of each rank, at the chosen ridges."""
    num_runs = losses.shape[0]
    errors = np.zeros(len(ranks))
    for fold in folds:
        train = np.setdiff1d(np.arange(num_runs), fold)
        x, y, f_mean, d_mean = _centred(features[train], target[train])
        scale, y = _prior_fit(x, y, prior)
        values, vectors = np.linalg.eigh(x.T @ x)
        coef = vectors @ _shrunk(np.maximum(values, 0), vectors.T @ (x.T @ y), ridges)
        base = target[fold][:, :1] + d_mean
        centred = features[fold][:, 1:] - f_mean
        if prior is not None:
            base = base + centred @ _prior_effects(prior, scale)
        for j, reduced in enumerate(_reduce(coef, x, ranks)):
            predicted = from_space(base + centred @ reduced, space, *loss_bounds(losses))
            errors[j] += ((predicted - losses[fold][:, 1:]) ** 2).sum()
    return (errors / (num_runs * (losses.shape[1] - 1) * losses.shape[2])).tolist()


def _cross_validate(features: np.ndarray, target: np.ndarray, losses: np.ndarray, space: str, folds: list,
                    ridge: float | None, prior: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Each test example's ridge ``[M]`` and the resulting all-steps MSE in loss units.

    The ridge is the grid value with the least held-out-fold error. With a ``prior`` ``[K, N, M]``
    (``K`` priors) the effects are its columns scaled by least squares (in each fold) plus a ridge residual, and
    ``inf`` (the scaled prior alone, no residual) joins the grid.

    The grid is one value per :data:`GRID_STEP` decades over :data:`GRID_DECADES` times the largest eigenvalue of
    the features' Gram matrix (on the first fold); where a test example's best value lies on an
    edge, the grid grows by three decades on that side (down to ``1e-20`` and up to ``1e12`` times
    that eigenvalue, where the effects have shrunk to nothing and the model is the mean trajectory).
    """
    num_runs, _, num_test = losses.shape
    bounds = loss_bounds(losses)
    parts = []
    for fold in folds:
        train = np.setdiff1d(np.arange(num_runs), fold)
        x, y, f_mean, d_mean = _centred(features[train], target[train])
        scale, y = _prior_fit(x, y, prior)
        values, vectors = np.linalg.eigh(x.T @ x)
        centred = features[fold][:, 1:] - f_mean
        base = target[fold][:, :1] + d_mean
        if prior is not None:
            base = base + centred @ _prior_effects(prior, scale)
        parts.append((np.maximum(values, 0), vectors.T @ (x.T @ y), centred @ vectors, base, losses[fold][:, 1:]))
    top = max(float(parts[0][0].max()), 1e-12)
    cache: dict[float, np.ndarray] = {}

    def errors_at(exponent: float) -> np.ndarray:
        if exponent not in cache:
            value = ridge if ridge is not None else top * 10.0 ** exponent   # exponent inf: no residual
            total = np.zeros(num_test)
            for values, projected, rotated, base, truth in parts:
                predicted = from_space(base + rotated @ _shrunk(values, projected, value), space, *bounds)
                total += ((predicted - truth) ** 2).sum(axis=(0, 1))
            cache[exponent] = total
        return cache[exponent]

    low, high = GRID_DECADES
    while True:
        exponents = [0.0] if ridge is not None else [float(e) for e in np.arange(low, high + 0.25, GRID_STEP)]
        errors = np.stack([errors_at(e) for e in exponents])
        best = errors.argmin(axis=0)
        grow_low = bool((best == 0).any()) and low > -20
        grow_high = bool((best == len(exponents) - 1).any()) and high < 12
        if ridge is not None or not (grow_low or grow_high):
            break
        low, high = low - 3 * grow_low, min(high + 3 * grow_high, 12)
    if prior is not None and ridge is None:   # the scaled prior alone, also where it ties with a huge ridge
        alone = errors_at(np.inf)
        best = np.where(alone <= errors[best, np.arange(num_test)] * (1 + 1e-9), len(exponents), best)
        exponents.append(np.inf)
        errors = np.vstack([errors, alone[None]])
    chosen = np.asarray(exponents)[best]
    ridges = np.full(num_test, ridge, dtype=np.float64) if ridge is not None else top * 10.0 ** chosen
    count = num_runs * (losses.shape[1] - 1) * num_test
    return ridges, float(errors[best, np.arange(num_test)].sum() / count)
