r"""``gradient-trajectory``: linear-trajectory whose effects are a scaled gradient prior plus a residual.

``linear-trajectory`` (:mod:`simfluence.simulators.trajectory`) models the rolled-out trajectory

.. math::

    z^m_t = z^m_0 + G^m_t + F_t \cdot b^m, \qquad F_t = \delta F_{t-1} + s_t u_t,

with a free effect vector :math:`b^m \in \mathbb{R}^N` per test example. From a few dozen runs
those ``N`` free numbers are noisy. Here each is anchored to what the model's gradients say:

.. math::

    b^m = \sigma_m\, p^m + r^m,

* :math:`p^m = -P_{:,m}`, minus a column of prior scores ``P`` ``[N, M]`` in which a positive
  score means "training on ``i`` lowers the loss of ``m``". By default
  :math:`P_{im} = g_i^\top D^{-1} g_m`, the gradient inner products of training example ``i``
  and test example ``m`` at a checkpoint (``prior_checkpoint``), preconditioned by Adam's
  diagonal :math:`D = \operatorname{diag}(\sqrt{v} + \epsilon)` (:math:`v` the mean squared
  training gradient) for runs trained with Adam(W), and each training row divided by its own
  preconditioned norm (``normalise``, on by default: raw rows at the start of text-minilm span
  7e-5 to 34, and the few large ones drove a rolled-out loss to 7x its true value; normalised,
  held-out all-steps MSE there is 0.37x the mean trajectory's instead of 0.94x, and about equal
  on minilm-finetune, 0.716x vs 0.709x). Any other scores can be given instead:
  ``fit(runs, prior=scores)``.
* :math:`\sigma_m`: one scalar per test example, the least-squares fit of the prior's rolled-out
  trajectories to the centred fitting trajectories (the same centring as linear-trajectory's).
* :math:`r^m`: a ridge residual on what the scaled prior leaves, its strength chosen per test
  example by cross-validation over the fitting runs on linear-trajectory's data-scaled grid
  **plus** :math:`\lambda = \infty` (no residual: the scaled prior alone).

So the fit nests linear-trajectory's free fit (small :math:`\lambda`: the residual takes over), the
"decay kernel" :math:`b^m = \sigma_m p^m` (:math:`\lambda = \infty`) and, with a zero prior and
:math:`\lambda = \infty`, exactly the mean trajectory. ``space``, ``momentum``, ``decay``, ``repeat_decay``,
``schedule`` and ``rank`` (applied to the residual) are linear-trajectory's settings, chosen the
same way. The saved model holds :math:`b` itself, so loading needs no task.

The gradients need the task (model and data): the one named in the runs' meta unless ``task``
is given. ``prior_checkpoint="start"`` reads the starting model only; ``"middle"`` (the
default) replays ``T // 2`` steps of a curriculum drawn like the fitting runs' (their sampler over the task's pool,
a fixed seed, so the same for any subset of the runs) with
:func:`~simfluence.collect.train.train_states` (through the Hugging Face Trainer for Trainer
tasks), so it works on any task that can be replayed; ``"both"`` uses the two as ``K = 2``
priors, :math:`b^m = \sigma_{m1} p^m_1 + \sigma_{m2} p^m_2 + r^m`, the scales fitted jointly by
least squares. The middle prior is the default because it was better than the start's on every
built-in task (held-out all-steps MSE, ratio to the mean trajectory: digits-mlp 0.371 vs 0.394,
text-minilm 0.475 vs 0.478, tiny-lm 0.328 vs 0.381, minilm-finetune 0.68 vs 0.72; ``"both"`` was no
better than the middle alone; ``docs/benchmarks.md``). Products are computed in bounded memory
(:func:`~simfluence.func.gradients.gradient_products`) and kept in a small in-process cache keyed
by the task, the checkpoint and the settings, so refitting on other runs of the same task
(``auto``'s folds) does not recompute them, and (``disk_cache``, on by default) in the on-disk
cache of :mod:`simfluence.cache` under the same key plus the simfluence and torch versions, so a
refit in a new process (``simfluence fit`` again) does not either; ``fit_info["prior_cached"]``
says ``"memory"``, ``"disk"`` or ``False`` (computed).

**TRAK beside the gradients** (``checkpoints=STORE``: a run store that kept the fitting runs'
final weights, ``simfluence collect --checkpoint-steps T``). TRAK scores (``traker``, the
``peers`` extra; :class:`~simfluence.peers.TRAK` with :func:`~simfluence.peers.peer_settings`)
of the ensemble of those final models become one more prior with its own scale, so
:math:`b^m = \sum_k \sigma_{mk} p^m_k + r^m` over the gradient prior(s) and TRAK's. The gradient
prior knows one point of training; TRAK's ensemble averages over the curricula the runs took.
On minilm-finetune (40 fitting runs, 50 retrained subsets) the pair ranks subsets at 0.51 against
TRAK's 0.43 and the middle prior's 0.47 (``docs/benchmarks.md``). It costs TRAK's projection of
every fitting run's final model (about 40 s a model there, on 2 CPU cores), computed once per
machine by :func:`~simfluence.peers.fitting.fitting_run_trak` (shared with ``simfluence lds``'s
``trak``) and kept in the on-disk cache, keyed by the task, the runs' ids and curricula and the
versions. The fitting runs' own final weights enter the prior, so the ridge and scales
cross-validated over those runs see a prior that has seen the validation fold (a mild
optimism of the choice, never of held-out scores).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from simfluence.runs.log import RunDataError, RunSet
from simfluence.simulators.base import Capabilities, register
from simfluence.simulators.config import TaskConfig, boolean, integer, one_of, positive, setting, store_path
from simfluence.simulators.trajectory import TrajectoryConfig, TrajectorySimulator, adam_momentum, as_priors

CHECKPOINTS = ("start", "middle", "both")
PRIOR_SEED = 0
"""Seed of the curriculum a ``"middle"`` prior replays (drawn like the fitting runs', never one of them)."""
PRECONDITIONERS = ("auto", "adam", "none")
CACHE_SIZE = 4
"""Gradient priors kept in memory (per process) for refits on the same task and checkpoint."""
_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()


@dataclass(frozen=True)
class GradientTrajectoryConfig(TaskConfig, TrajectoryConfig):
    """Settings of ``gradient-trajectory``: linear-trajectory's, the task, and how the prior is computed."""

    prior_checkpoint: str = setting("middle", "Weights the gradients are taken at: 'start' (the task's starting "
                                    "model), 'middle' (after T // 2 steps of a curriculum drawn like the fitting "
                                    "runs', replayed) or 'both' (two priors, each with its own scale). Neither "
                                    "depends on which fitting runs are given, so each is computed once per process.")
    preconditioner: str = setting("auto", "'adam': divide the products by Adam's diagonal sqrt(v) + eps (v: mean "
                                  "squared training gradient); 'none'; 'auto': 'adam' where the runs' meta names "
                                  "an Adam-family optimizer, else 'none'.")
    normalise: bool = setting(True, "Divide each training example's row by its gradient's (preconditioned) "
                              "norm, so an example the checkpoint already fits (tiny gradient) or a huge one "
                              "does not dominate the prior.")
    chunk_size: int = setting(64, "Training examples per vectorised gradient pass (fewer where their gradients "
                              "would exceed memory_gb).")
    test_chunk_size: int | None = setting(None, "Test gradients held at once (one pass over the training "
                                          "gradients per chunk); None: as many as fit in memory_gb.")
    disk_cache: bool = setting(True, "Keep computed priors in the on-disk cache ($SIMFLUENCE_CACHE, default "
                               "~/.cache/simfluence), keyed by the task, checkpoint, settings and versions, so a "
                               "refit in a new process skips the gradients.")
    checkpoints: str | None = setting(None, "A run store holding the fitting runs' final weights (collected with "
                                      "--checkpoint-steps T, usually their own store): TRAK scores of those models "
                                      "(traker, the 'peers' extra) join the gradient prior as one more prior with "
                                      "its own scale. None: the gradient prior alone.")
    memory_gb: float = setting(1.0, "Bound, in GiB, on the gradients held at once on each side (test, training); "
                               "peak memory is about three times this plus one forward/backward pass.")

    def validate(self) -> None:
        """linear-trajectory's and the task's checks, then the prior's settings."""
        super().validate()
        one_of("prior_checkpoint", self.prior_checkpoint, CHECKPOINTS)
        one_of("preconditioner", self.preconditioner, PRECONDITIONERS)
        boolean("normalise", self.normalise)
        boolean("disk_cache", self.disk_cache)
        self._set("chunk_size", integer("chunk_size", self.chunk_size, 1))
        if self.test_chunk_size is not None:
            self._set("test_chunk_size", integer("test_chunk_size", self.test_chunk_size, 1, " or None"))
        self._set("memory_gb", positive("memory_gb", self.memory_gb))
        self._set("checkpoints", store_path("checkpoints", self.checkpoints))


@register
class GradientTrajectorySimulator(TrajectorySimulator):
    r"""linear-trajectory with :math:`b^m = \sigma_m p^m + r^m` around a gradient prior (module docstring).

    Args:
        prior_checkpoint: ``"middle"`` (default), ``"start"`` or ``"both"``.
        preconditioner: ``"auto"``, ``"adam"`` or ``"none"``.
        normalise: divide each training row by its norm (default ``True``).
        chunk_size, test_chunk_size, memory_gb: the gradient passes' sizes and memory bound.
        checkpoints: a run store with the fitting runs' final weights: TRAK's scores of them
            become one more prior (module docstring).
        task / task_options: the task the gradients come from (default: the runs' meta).
        **trajectory: the settings of :class:`~simfluence.simulators.trajectory.TrajectorySimulator`.

    ``fit(runs, prior=scores)`` takes the prior scores ``[N, M]`` or ``[K, N, M]`` (``K`` priors;
    positive: helpful) instead of computing gradients. Fitted state adds ``prior_`` ``[K, N, M]``
    (:math:`p`; ``K = 2`` for ``"both"``, else 1; one more with ``checkpoints``, last),
    ``prior_scale_`` ``[K, M]`` (:math:`\sigma`) and
    ``ridge_`` with ``inf`` where a test example chose the prior alone; ``fit_info`` adds ``prior``
    (its source), ``prior_seconds``, ``prior_only`` (how many test examples chose :math:`\lambda =
    \infty`), ``ridge_quantiles`` (of the finite ``ridge_``), ``prior_scale_median`` and, with
    ``checkpoints``, ``trak_cached`` (``"disk"`` or ``False``: computed).
    """

    kind = "gradient-trajectory"
    capabilities = Capabilities("extension", task="optional", ridge=True, cross_validation=True, trainer_tasks=True,
                                checkpoints=True, expected_rollout=True)

    config_class = GradientTrajectoryConfig
    config: GradientTrajectoryConfig

    def __init__(self, config: GradientTrajectoryConfig | None = None, **settings: Any):
        super().__init__(config, **settings)
        self._given_prior: np.ndarray | None = None

    def fit(self, runs: RunSet, prior: Any = None) -> GradientTrajectorySimulator:
        """Learn from ``runs``; ``prior`` float ``[N, M]`` scores (positive: helpful) skip the gradients."""
        if prior is not None:
            try:
                scores = as_priors(prior, (runs.num_train, runs.num_test) if isinstance(runs, RunSet) else None)
            except ValueError as error:
                raise RunDataError("<prior>", "prior", f"{error} (training, test examples)") from None
            assert scores is not None
            if not np.isfinite(scores).all():
                raise RunDataError("<prior>", "prior", "holds NaN or inf values")
            self._given_prior = scores
        try:
            super().fit(runs)
        finally:
            self._given_prior = None
        return self

    def _effect_prior(self, runs: RunSet) -> np.ndarray:
        start = time.perf_counter()
        cached: str | bool = False
        if self._given_prior is not None:
            scores, source = self._given_prior, "given"
        else:
            scores, source, cached = self._gradient_scores(runs)
        if self.config.checkpoints is not None:
            trak, models, trak_cached = self._trak_scores(runs)
            scores = np.concatenate([scores, -trak[None]])        # TRAK: negative helps; the prior: positive
            source = f"{source}; TRAK of {models} fitting runs' final weights"
            self.fit_info["trak_cached"] = trak_cached
        self.prior_ = -scores
        self.fit_info.update(prior=source, prior_seconds=time.perf_counter() - start, prior_cached=cached)
        return self.prior_

    def _task(self, runs: RunSet):
        """The task the runs were collected from (``task`` or their meta), with the runs' ids checked."""
        from simfluence.tasks.registry import task_for_runs

        task = task_for_runs(self.task_spec, self.config.task_options, runs.meta,
                             "pass task=... (the Task the runs were collected from), or fit(runs, prior=scores)")
        for name, mine, theirs in (("train_ids", task.train_ids, runs.train_ids),
                                   ("test_ids", task.test_ids, runs.test_ids)):
            if not np.array_equal(mine, theirs):
                raise RunDataError("<runs>", name, f"differ from task '{task.name}'s ids",
                                   "fit on runs collected from that task, or pass prior=scores")
        return task

    def _trak_scores(self, runs: RunSet) -> tuple[np.ndarray, int, str | bool]:
        """TRAK's float64 ``[N, M]`` scores (negative: helpful) of the fitting runs' final weights in ``checkpoints``.

        Returns the scores, the number of models and where they came from (``"disk"``, or ``False``: computed).
        """
        from simfluence.peers.fitting import fitting_run_trak

        assert self.config.checkpoints is not None
        trak = fitting_run_trak(self._task(runs), runs, self.config.checkpoints, disk_cache=self.config.disk_cache)
        return trak.scores, trak.models, "disk" if trak.cached else False

    def _gradient_scores(self, runs: RunSet) -> tuple[np.ndarray, str, str | bool]:
        from simfluence.cache import cached_scores, package_version
        from simfluence.collect.curricula import pool_sampler
        from simfluence.collect.train import train_states
        from simfluence.func.gradients import gradient_products, model_at

        config = self.config
        task = self._task(runs)
        adam = adam_momentum(runs.meta) is not None
        preconditioner = config.preconditioner if config.preconditioner != "auto" else ("adam" if adam else "none")
        normalise = config.normalise
        trainer = runs.meta.get("trainer")
        eps = trainer.get("adam_epsilon") if isinstance(trainer, dict) else None
        eps = float(eps) if isinstance(eps, (int, float)) and eps > 0 else 1e-8
        steps = {"start": [0], "middle": [runs.num_steps // 2], "both": [0, runs.num_steps // 2]}[
            config.prior_checkpoint]
        self.fit_info.update(task=task.name, prior_step=steps if len(steps) > 1 else steps[0],
                             preconditioner=preconditioner, normalise=bool(normalise))
        kind = (runs.meta.get("sampler") or {}).get("kind", "uniform")
        sampler = pool_sampler(kind if kind in ("uniform", "epoch") else "uniform", task.default_pool(),
                               runs.batch_size)
        priors, cached, disk = [], True, False
        for step in steps:
            curriculum = sampler.sample(step, PRIOR_SEED) if step else None
            replayed = None if curriculum is None else np.ascontiguousarray(curriculum).tobytes()
            key = (task.name, json.dumps(task.config(), sort_keys=True, default=str), step,
                   None if replayed is None else hashlib.sha256(replayed).hexdigest(), preconditioner, eps,
                   bool(normalise))
            if key in _CACHE:
                _CACHE.move_to_end(key)
                priors.append(_CACHE[key])
                continue
            computed: list[int] = []

            def compute(step: int = step, curriculum: np.ndarray | None = curriculum,
                        computed: list[int] = computed) -> dict[str, torch.Tensor]:
                computed.append(step)
                state = train_states(task, curriculum, [step])[0] if step else None
                model, params = model_at(task, state)
                return {"scores": gradient_products(
                    task, model, params, chunk_size=config.chunk_size,
                    preconditioner=None if preconditioner == "none" else "adam", eps=eps,
                    normalise_train=bool(normalise), test_chunk_size=config.test_chunk_size,
                    memory_bytes=int(config.memory_gb * 2 ** 30))}

            entry = {"key": list(key), "simfluence": package_version(), "torch": torch.__version__}
            scores, _ = cached_scores("gradient-prior", entry, compute, (runs.num_train, runs.num_test),
                                      f"gradient products of task '{task.name}' at step {step}", config.disk_cache)
            cached = cached and not computed
            disk = disk or not computed
            _CACHE[key] = scores
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
            priors.append(scores)
        source = " and ".join(f"after step {step} of a replayed curriculum" if step else "at the start"
                              for step in steps)
        source = f"gradients {source} ({'Adam-preconditioned' if preconditioner == 'adam' else 'plain'}" \
            + f"{', normalised training rows' if normalise else ''})"
        return np.stack(priors), source, ("disk" if disk else "memory") if cached else False

    def _fit(self, runs: RunSet) -> None:
        super()._fit(runs)
        ridges = self.ridge_
        finite = ridges[np.isfinite(ridges)]
        self.fit_info.update(
            prior_only=int((~np.isfinite(ridges)).sum()),
            ridge_quantiles=np.quantile(finite, [0, 0.25, 0.5, 0.75, 1]).tolist() if finite.size else None,
            prior_scale_median=float(np.median(self.prior_scale_)))

    # --- persistence -----------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = super()._arrays()
        arrays["ridge"] = np.where(np.isfinite(self.ridge_), self.ridge_, -1.0)   # -1: the prior alone
        arrays.update(prior=self.prior_, prior_scale=self.prior_scale_)
        return arrays

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        super()._restore(arrays)
        self.ridge_ = np.where(self.ridge_ < 0, np.inf, self.ridge_)
        prior = np.asarray(arrays["prior"], dtype=np.float64)
        scale = np.asarray(arrays["prior_scale"], dtype=np.float64)
        self.prior_ = prior[None] if prior.ndim == 2 else prior          # files from before K priors: [N, M], [M]
        self.prior_scale_ = scale[None] if scale.ndim == 1 else scale
        num_priors = self.prior_.shape[0]
        if self.prior_.shape[1:] != self.coef_.shape or self.prior_scale_.shape != (num_priors, self.test_ids.size):
            raise ValueError("prior shapes do not match the ids")
