r"""Featurized Simfluence: coefficients predicted from features of both examples.

Simfluence-Linear keeps a free ``(A_i^m, B_i^m)`` per (training example ``i``, test example
``m``), so it knows nothing about examples absent from the fitting runs. Here the
coefficients are functions of a feature vector ``f_i`` of the training example and ``g_m`` of
the test example, so they exist for any example whose features are known
(identity-centred, as ``linear-identity``):

.. math::

    L^m_t = \Big(1 + \sum_{i \in c_t} a_i^m\Big) L^m_{t-1} + \sum_{i \in c_t} b_i^m, \qquad
    a_i^m = \phi_i^\top W_a\, \psi_m + \sum_j k_j(i, m)\,\big(\phi_i^\top u_{a,j} + \tilde\psi_m^\top v_{a,j}\big)
            + c^a_m + r^{a}_{im}

and the same for ``b`` with ``W_b, u_b, v_b, c^b, r^b``:

* kernels ``k_j(i, m) = f_{i,j} \cdot g_{m,j} / \sigma_j``: the inner products of the examples'
  feature block ``j`` (blocks: the task's features, the gradient features), scaled to unit
  root mean square over the fitting pairs. With gradient features
  (:func:`~simfluence.func.features.gradient_sketch`, at ``checkpoints`` checkpoints of a
  replayed fitting run) the kernel is Grad-Dot (one checkpoint) or TracIn-CP's sum
  (several): for one SGD step with batch-mean loss,
  ``b_i^m \approx -(\eta/|c|)\, g_m \cdot g_i``, so the bilinear form ``f_i^\top (\theta I) g_m``
  already holds the first-order effect, and fitting on runs calibrates it;
* ``phi_i = [P (f_i - mu) / s, 1]``, ``psi_m = [P (g_m - mu) / s, 1]`` (``psi~`` without the 1):
  the features centred, projected on their top ``dim`` principal directions ``P`` (fitted on all
  ``N`` training examples and the fitting test examples; one projection when both share a
  space) and scaled to unit mean square. ``W [dim + 1, dim + 1]`` is a low-rank bilinear
  correction, ``u, v`` let the kernels' gains vary with the examples. With ``dim = 0`` (the
  default: it generalises best to new test examples, see ``docs/benchmarks.md``) only the
  constant is left: ``a = w_a + \sum_j \theta_{a,j} k_j``, likewise ``b``;
* all of these are fitted together by full-batch L-BFGS (torch, float32) on the teacher-forced
  one-step transitions of the fitting runs (:class:`~simfluence.simulators.linear.Transitions`),
  minimising

  .. math::

      \frac{1}{S M\,\sigma_\Delta^2}\sum_{s, m} \big(\hat\Delta^m_s - \Delta^m_s\big)^2
      + \lambda \lVert \text{parameters in units of } \sigma_\Delta, \sigma_L \rVert^2

  (``Delta`` the one-step loss changes, ``sigma`` root mean squares, so ``lambda`` is free
  of loss units; ``weight_decay``, or chosen by K-fold cross-validation over the fitting
  runs on the rolled-out all-steps MSE when ``None``);
* ``c^a, c^b`` ``[M]``: one offset per fitted test example, fitted afterwards by least squares
  (its curve's level: the shared part describes an average test example); 0 for test
  examples added later;
* ``r^a, r^b`` ``[N, M]``: per-pair residuals, fitted last by the ridge solver of
  Simfluence-Linear on what is left unexplained (ridge chosen by cross-validation on rolled-out
  MSE unless given). Ridge keeps them exactly 0 for training examples that no fitting run
  trained on, and test examples added later have none, so unseen examples fall back to the
  feature part.

Features come from the task (:meth:`simfluence.tasks.Task.example_features`), from
per-example gradients, or from the caller (``train_features=``, ``test_features=``); they are
read and scaled by :mod:`simfluence.func.features`.
:meth:`FeaturizedSimulator.for_test_examples` returns a simulator for other (possibly never
seen) test examples from their features alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from simfluence.func.features import (
    block_scales,
    check_features,
    checkpoint_states,
    checkpoint_steps,
    given_features,
    scale_blocks,
)
from simfluence.func.features import task_features as read_task_features
from simfluence.runs.log import RunDataError, RunSet
from simfluence.simulators.base import Capabilities, Simulator, register
from simfluence.simulators.config import TaskConfig, boolean, integer, one_of, positive, positive_grid, setting
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.linear import DEFAULT_RIDGE_GRID, Transitions, cross_validate, rollout
from simfluence.simulators.ridge import solve_transition_ridge

FEATURE_SOURCES = ("task", "gradients", "task+gradients")
DEFAULT_WEIGHT_DECAY_GRID = (1e-2, 1e-3, 1e-4, 1e-5)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Projection:
    """Centre, project on the top principal directions, scale to unit mean square, append 1.

    ``mean`` ``[D]``, ``basis`` ``[D, k]``, ``scale`` a scalar; :meth:`__call__` maps features
    ``[n, D]`` to ``[n, k + 1]``.
    """

    mean: np.ndarray
    basis: np.ndarray
    scale: float

    @classmethod
    def fit(cls, features: np.ndarray, dim: int) -> Projection:
        """The projection of ``features`` ``[n, D]`` on their top ``dim`` principal directions."""
        centred = features.astype(np.float64) - features.mean(axis=0)
        basis = np.zeros((features.shape[1], 0))
        if dim > 0:
            _, singular, directions = np.linalg.svd(centred, full_matrices=False)
            # Directions with no variance would be scaled up from rounding noise.
            rank = int((singular > 1e-6 * max(float(singular[0]), 1e-30)).sum()) if singular.size else 0
            basis = directions[:min(dim, rank)].T
        projected = centred @ basis
        scale = float(np.sqrt(np.mean(projected**2))) if projected.size else 1.0
        return cls(features.mean(axis=0).astype(np.float64), basis, scale if scale > 0 else 1.0)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """``features`` ``[n, D]`` projected: float64 ``[n, k + 1]``, the last column 1."""
        projected = (features.astype(np.float64) - self.mean) @ self.basis / self.scale
        return np.concatenate([projected, np.ones((features.shape[0], 1))], axis=1)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The state as arrays named ``<prefix>_mean``, ``_basis`` and ``_scale``."""
        return {f"{prefix}_mean": self.mean, f"{prefix}_basis": self.basis, f"{prefix}_scale": np.array(self.scale)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> Projection:
        """The projection saved by :meth:`arrays` under ``prefix``."""
        return cls(arrays[f"{prefix}_mean"], arrays[f"{prefix}_basis"], float(arrays[f"{prefix}_scale"]))


PARAMETERS = ("w_a", "w_b", "u_a", "u_b", "v_a", "v_b")


def coefficient_table(phi: torch.Tensor, psi: torch.Tensor, kernels: torch.Tensor,
                      params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[N, 2M]`` = ``[a | b]`` (the layout :func:`rollout` reads) from the module's formula.

    Args:
        phi: ``[N, K]`` projected training features (last column 1).
        psi: ``[M, K']`` projected test features (last column 1).
        kernels: ``[J, N, M]`` scaled feature inner products ``k_j``.
        params: ``w_*`` ``[K, K']``, ``u_*`` ``[J, K]``, ``v_*`` ``[J, K' - 1]`` for ``* = a, b``.
    """
    heads = []
    for head in ("a", "b"):
        table = phi @ params[f"w_{head}"] @ psi.T
        if kernels.shape[0]:
            gain = (phi @ params[f"u_{head}"].T).T[:, :, None] + (psi[:, :-1] @ params[f"v_{head}"].T).T[:, None, :]
            table = table + (kernels * gain).sum(dim=0)
        heads.append(table)
    return torch.cat(heads, dim=1).contiguous()


def fit_coefficients(
    design: BatchDesign, previous: torch.Tensor, delta: torch.Tensor, phi: torch.Tensor, psi: torch.Tensor,
    kernels: torch.Tensor, weight_decay: float, max_iter: int, initial: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    r"""Parameters minimising the module's transition objective, by full-batch L-BFGS.

    Args:
        design: batch indicators ``X`` ``[S, N]`` of the transitions.
        previous: ``[S, M]`` losses before each transition.
        delta: ``[S, M]`` one-step loss changes ``L_t - L_{t-1}``.
        phi: as for :func:`coefficient_table`.
        psi: as for :func:`coefficient_table`.
        kernels: as for :func:`coefficient_table`.
        weight_decay: ``lambda``.
        max_iter: L-BFGS iterations.
        initial: warm start (loss units), e.g. the solution for a stronger ``lambda``.

    Returns:
        The parameters in loss units, and ``lbfgs_iterations`` and the final relative transition MSE.

    Memory is ``O(S M + N M J)``: all transitions and the coefficient table at once.
    """
    delta_rms = float(delta.square().mean().sqrt().clamp_min(1e-12))
    previous_rms = float(previous.square().mean().sqrt().clamp_min(1e-12))
    # Work in loss-free units so that one weight-decay grid fits every task.
    previous_scaled, delta_scaled = previous / previous_rms, delta / delta_rms
    units = {"a": delta_rms / previous_rms, "b": delta_rms}
    num_test = psi.shape[0]
    shapes = {"w": (phi.shape[1], psi.shape[1]), "u": (kernels.shape[0], phi.shape[1]),
              "v": (kernels.shape[0], psi.shape[1] - 1)}
    params = {name: (torch.zeros(shapes[name[0]]) if initial is None else initial[name] / units[name[-1]])
              .clone().requires_grad_(True) for name in PARAMETERS}
    optimizer = torch.optim.LBFGS(list(params.values()), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def transition_mse() -> torch.Tensor:
        summed = design.matmul(coefficient_table(phi, psi, kernels, params))   # [S, 2M]: sums over each batch
        predicted = summed[:, :num_test] * previous_scaled + summed[:, num_test:]
        return (predicted - delta_scaled).square().mean()

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = transition_mse() + weight_decay * sum(value.square().sum() for value in params.values())
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        relative_mse = float(transition_mse())
    state = optimizer.state[optimizer._params[0]]
    info = {"lbfgs_iterations": int(state.get("n_iter", 0)), "transition_relative_mse": relative_mse}
    return {name: value.detach() * units[name[-1]] for name, value in params.items()}, info


_CV_FIX = "pass an explicit weight_decay and residual_ridge"

@dataclass(frozen=True)
class FeaturizedConfig(TaskConfig):
    """Settings of ``featurized``."""

    features: str = setting("gradients", "'gradients' (gradient sketches), 'task' (Task.example_features) or "
                            "'task+gradients' (both, each scaled to unit mean square, each its own kernel).")
    sketch_dim: int = setting(4096, "Width of the gradient sketches (gradients with fewer weights are kept whole).")
    dim: int = setting(0, "Principal directions of the low-rank bilinear correction (0: kernels and constants "
                       "only).")
    weight_decay: float | None = setting(1e-4, "lambda on the feature coefficients (absolute); None: chosen from "
                                         "weight_decay_grid by cross-validation.")
    weight_decay_grid: tuple[float, ...] = setting(DEFAULT_WEIGHT_DECAY_GRID, "Candidates for weight_decay; "
                                                     "extended past an edge (up to 3 values per side) while the "
                                                     "best value lies on it.")
    residual_ridge_factor: float | None = setting(None, "Ridge of the per-pair residuals as a multiple of the mean "
                                                  "number of times a training example was trained on; None: "
                                                  "chosen from residual_ridge_grid by cross-validation.")
    residual_ridge_grid: tuple[float, ...] = setting(DEFAULT_RIDGE_GRID, "Candidate factors for "
                                                     "residual_ridge_factor (as linear's ridge_grid).")
    fit_offsets: bool = setting(True, "Fit per-test-example offsets (c_a, c_b) after the feature part (new test "
                                "examples get 0).")
    fit_residuals: bool = setting(True, "Fit the per-pair residuals.")
    cv_folds: int = setting(3, "Folds of fitting runs for the cross-validated choices.")
    lbfgs_iterations: int = setting(200, "L-BFGS iterations per fit.")
    num_checkpoints: int = setting(4, "Gradient features are taken at this many checkpoints, after steps 0, T/K, "
                                   "2T/K, ... of the first fitting run; 1: the starting checkpoint only.")
    seed: int = setting(0, "Seed of the folds and of the gradient sketch.")
    batch_mean: bool = setting(True, "Effects are those of a batch-mean loss: a step with k of the n batch slots "
                               "filled scales each example's effect by n / k (as linear's).")

    renamed: ClassVar[Mapping[str, str]] = {"residual_ridge": "residual_ridge_factor", "max_iter": "lbfgs_iterations",
                                            "checkpoints": "num_checkpoints"}
    # Adam fine-tuning on rolled-out trajectories lowered the fitting runs' rollout error but not the
    # held-out one (docs/benchmarks.md), so it was removed; files saved without it still load.
    retired: ClassVar[Mapping[str, Any]] = {"rollout_iterations": 0}

    def validate(self) -> None:
        """Check each setting's range."""
        super().validate()
        one_of("features", self.features, FEATURE_SOURCES)
        self._set("sketch_dim", integer("sketch_dim", self.sketch_dim, 1))
        self._set("dim", integer("dim", self.dim, 0))
        self._set("weight_decay", positive("weight_decay", self.weight_decay, allow_none=True))
        self._set("weight_decay_grid", positive_grid("weight_decay_grid", self.weight_decay_grid))
        self._set("residual_ridge_factor", positive("residual_ridge_factor", self.residual_ridge_factor,
                                                    allow_none=True))
        self._set("residual_ridge_grid", positive_grid("residual_ridge_grid", self.residual_ridge_grid))
        self._set("fit_offsets", boolean("fit_offsets", self.fit_offsets))
        self._set("fit_residuals", boolean("fit_residuals", self.fit_residuals))
        self._set("cv_folds", integer("cv_folds", self.cv_folds, 2))
        self._set("lbfgs_iterations", integer("lbfgs_iterations", self.lbfgs_iterations, 1))
        self._set("num_checkpoints", integer("num_checkpoints", self.num_checkpoints, 1))
        self._set("seed", integer("seed", self.seed, 0))
        self._set("batch_mean", boolean("batch_mean", self.batch_mean))


@register
class FeaturizedSimulator(Simulator):
    r"""Identity-centred Simfluence-Linear whose coefficients are functions of example features.

    Args:
        train_features: float ``[N, D]``, one row per training id of the fitting runs (all ``N``
            training examples, also those no fitting run trains on); default from ``task``.
        test_features: float ``[M, D']``, one row per test id of the fitting runs.
        task: a registered task name or a :class:`~simfluence.tasks.Task` supplying
            features by id; default: the task named in the runs' meta (runs made by ``collect``).
        task_options: options for a task given by name (default: the runs' ``task_config``).
        features: ``"gradients"`` (:func:`~simfluence.func.features.gradient_sketch`), ``"task"``
            (:meth:`Task.example_features`) or ``"task+gradients"`` (both, each scaled to unit mean
            square, each its own kernel).
        sketch_dim: width of the gradient sketches (gradients with fewer weights are kept whole).
        dim: principal directions of the low-rank bilinear correction (0: kernels and constants only).
        weight_decay: ``lambda``; ``None`` chooses it from ``weight_decay_grid`` by cross-validation.
        residual_ridge_factor: ridge of the per-pair residuals (``residual_ridge`` before) as a
            multiple of the mean number of times a training example was trained on (as ``linear``'s
            grid); ``None`` chooses it from ``residual_ridge_grid`` by cross-validation (rolled-out
            MSE), as ``linear`` does.
        fit_offsets: fit per-test-example offsets ``(c_a, c_b)`` of every coefficient after the
            feature part (its level for each fitted test example; new test examples get 0).
        fit_residuals: ``False`` leaves the per-pair residuals out.
        cv_folds: folds of fitting runs for the cross-validated choices.
        lbfgs_iterations: L-BFGS iterations per fit (``max_iter`` before).
        num_checkpoints: gradient features are taken at this many checkpoints (``checkpoints``
            before), after steps ``0, T/K, 2T/K, ...`` of the first fitting run (replayed with the
            task's trainer, as TracIn-CP does); 1: the starting checkpoint only.
        seed: seed of the folds and of the gradient sketch.
    """

    kind = "featurized"
    capabilities = Capabilities("learned", task="optional", cross_validation=True, new_test_examples=True,
                                transitions=True)
    alpha_offset = 1.0
    config_class = FeaturizedConfig
    config: FeaturizedConfig

    def __init__(self, config: FeaturizedConfig | None = None, *, train_features: Any = None,
                 test_features: Any = None, **settings: Any):
        super().__init__(config, **settings)
        self.given_features = {"train": train_features, "test": test_features}
        self.offsets: torch.Tensor | None = None  # [1, 2M]
        self.checkpoint_curriculum: np.ndarray | None = None  # int [T, B]: the fitting run replayed for them
        # Fitted state, None until fit or load (or given features are resolved); typed as fitted.
        self.train_features: np.ndarray = None  # type: ignore[assignment]
        self.test_features: np.ndarray = None  # type: ignore[assignment]
        self.kernel_blocks = np.zeros((0, 2), dtype=np.int64)  # [J, 2] feature column ranges, one per kernel
        self.kernel_scales = np.zeros(0)                        # [J]: root mean square of each kernel
        self.feature_scales = np.zeros(0)                       # [J]: of each block of task features
        self.projections: dict[str, Projection] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.residuals: torch.Tensor | None = None  # [N, 2M] = [r_a | r_b], or None

    # --- features -------------------------------------------------------------------
    def task(self, runs: RunSet | None = None):
        """The task that supplies features.

        The setting ``task``, else the one ``runs``' meta names, else (after fitting or loading)
        the one the fitting runs named (``fit_info``).
        """
        from simfluence.tasks.registry import replayable_task, task_for_runs

        if runs is not None:
            meta = runs.meta
        elif "task" in self.fit_info:
            meta = {"task": self.fit_info["task"], "task_config": self.fit_info.get("task_config", {})}
        else:
            meta = {}
        # One task object per (task, options): its data (e.g. embeddings) is loaded once.
        key = json.dumps([meta.get("task"), meta.get("task_config")], sort_keys=True, default=str)
        cached = getattr(self, "_task_cache", None)
        if cached is not None and cached[0] == key:
            task = cached[1]
        else:
            task = replayable_task(task_for_runs(self.task_spec, self.config.task_options, meta,
                                                 "pass train_features and test_features, or task="))
            self._task_cache = (key, task)
        if runs is not None:  # fitted state, kept with the model so loading can find it again
            self.fit_info.update(task=task.name, task_config=task.config())
        return task

    def task_features(self, split: str, ids: np.ndarray, runs: RunSet | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Unscaled ``features`` of the ``split`` examples ``ids`` from the task.

        float32 ``[len(ids), D]`` and the column ranges ``[J, 2]`` of its blocks (each block is
        one kernel); :func:`simfluence.func.features.task_features`.
        """
        task = self.task(runs)
        config = self.config
        return read_task_features(task, split, ids, config.features.split("+"), config.sketch_dim, config.seed,
                                  self._states(task))

    def _scaled(self, features: np.ndarray) -> np.ndarray:
        """``features`` with each kernel block divided by its scale (fitted on the training features)."""
        return scale_blocks(features, self.kernel_blocks, self.feature_scales)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the replayed fitting run after which gradient features are taken."""
        num_steps = 0 if self.checkpoint_curriculum is None else self.checkpoint_curriculum.shape[0]
        return checkpoint_steps(num_steps, self.config.num_checkpoints)

    def _states(self, task) -> Sequence[Mapping[str, torch.Tensor] | None]:
        return checkpoint_states(task, self.checkpoint_curriculum, self.checkpoint_steps())

    def _resolve(self, runs: RunSet) -> None:
        given = given_features(self.given_features["train"], self.given_features["test"], runs.train_ids,
                               runs.test_ids)
        if given is None:
            self.checkpoint_curriculum = runs.curricula[0]
            train, self.kernel_blocks = self.task_features("train", runs.train_ids, runs)
            # Unit mean square per block (over the training examples, so that every later test
            # example is scaled alike): no block dominates the principal directions by its units.
            self.feature_scales = block_scales(train, self.kernel_blocks)
            self.train_features = self._scaled(train)
            self.test_features = self._scaled(self.task_features("test", runs.test_ids, runs)[0])
            return
        self.train_features, self.test_features = given
        width = self.train_features.shape[1]
        # Features of one space (same width) also give one kernel: their inner products.
        self.kernel_blocks = np.array([[0, width]] if self.test_features.shape[1] == width else [], dtype=np.int64
                                      ).reshape(-1, 2)
        self.feature_scales = np.ones(len(self.kernel_blocks))

    def _kernels(self) -> torch.Tensor:
        """``[J, N, M]`` scaled inner products of each feature block (float32)."""
        kernels = [self.train_features[:, start:stop].astype(np.float64) @ self.test_features[:, start:stop].T.astype(
            np.float64) / scale for (start, stop), scale in zip(self.kernel_blocks, self.kernel_scales)]
        shape = (len(kernels), self.train_features.shape[0], self.test_features.shape[0])
        return torch.as_tensor(np.stack(kernels) if kernels else np.zeros(shape), dtype=torch.float32)

    # --- fitting ----------------------------------------------------------------------
    def _fit(self, runs: RunSet) -> None:
        self._resolve(runs)
        if self.train_features.shape[1] == self.test_features.shape[1]:
            # One feature space: one projection, fitted on all examples, so that the few test
            # examples do not pick directions of their own that new test examples lack.
            shared = Projection.fit(np.concatenate([self.train_features, self.test_features]), self.config.dim)
            self.projections = {"train": shared, "test": shared}
        else:
            self.projections = {split: Projection.fit(getattr(self, f"{split}_features"), self.config.dim)
                                for split in SPLITS}
        self.kernel_scales = np.ones(len(self.kernel_blocks))
        raw = self._kernels().to(torch.float64)
        self.kernel_scales = raw.square().mean(dim=(1, 2)).sqrt().clamp_min(1e-12).numpy()
        phi, psi, kernels = self._inputs()
        weight_decay, scores = ((self.config.weight_decay, None) if self.config.weight_decay is not None
                                else self._cross_validate(runs, phi, psi, kernels))
        design, previous, delta = _problem(Transitions.of(runs), self._batch_size(runs))
        self.params, fitted = fit_coefficients(design, previous, delta, phi, psi, kernels, weight_decay,
                                               self.config.lbfgs_iterations)
        info: dict[str, Any] = dict(fitted)
        self.offsets = None
        if self.config.fit_offsets:
            # Fitted after the shared part, so that part keeps the level of an average test example,
            # which is what a new test example gets.
            self.offsets = _test_offsets(design, previous, delta, coefficient_table(phi, psi, kernels, self.params))
        self.residuals = None
        if self.config.fit_residuals:
            scale = float(design.occurrences.mean())
            factor = self.config.residual_ridge_factor
            ridge, info["residual_cv_scores"] = ((factor * scale, None) if factor is not None
                                                 else self._choose_residual_ridge(runs, phi, psi, kernels, weight_decay,
                                                                                  scale))
            table = coefficient_table(phi, psi, kernels, self.params)
            table = table if self.offsets is None else table + self.offsets
            self.residuals, info["cg_iterations"] = _residuals(design, previous, delta, table, ridge)
            info["residual_ridge"] = ridge
        self.fit_info.update(weight_decay=float(weight_decay), cv_scores=scores, features=self.config.features,
                             feature_dims=[int(self.train_features.shape[1]), int(self.test_features.shape[1])],
                             projected_dims=[phi.shape[1] - 1, psi.shape[1] - 1],
                             kernels=len(self.kernel_blocks), **info)

    def _cross_validate(self, runs: RunSet, phi: torch.Tensor, psi: torch.Tensor,
                        kernels: torch.Tensor) -> tuple[float, dict[str, float]]:
        """Choose ``weight_decay`` by rolled-out all-steps MSE on K folds of the fitting runs.

        The grid is ``weight_decay_grid``, extended past an edge while the best value lies on it
        (:func:`~simfluence.simulators.linear.cross_validate`). Returns it and the error of every
        evaluated value.
        """
        def tables(fitting: RunSet, values: Sequence[float]):
            problem, params = _problem(Transitions.of(fitting), self._batch_size(runs)), None
            for weight_decay in values:  # strong -> weak: each warm-starts the next
                params, _ = fit_coefficients(*problem, phi, psi, kernels, weight_decay, self.config.lbfgs_iterations,
                                             params)
                yield coefficient_table(phi, psi, kernels, params)

        chosen = cross_validate(runs, self.config.weight_decay_grid, tables, self.config.cv_folds, self.config.seed,
                                fix=_CV_FIX, batch_size=self._batch_size(runs))
        return chosen.best, chosen.scores

    def _choose_residual_ridge(self, runs: RunSet, phi: torch.Tensor, psi: torch.Tensor, kernels: torch.Tensor,
                               weight_decay: float, scale: float) -> tuple[float, dict[str, float]]:
        """Residual ridge (absolute) by rolled-out all-steps MSE on K folds of the fitting runs.

        The grid is ``residual_ridge_grid`` times ``scale``, extended past an edge while the best
        value lies on it (:func:`~simfluence.simulators.linear.cross_validate`).
        """
        grid = [scale * factor for factor in self.config.residual_ridge_grid]

        def tables(fitting: RunSet, values: Sequence[float]):
            design, previous, delta = _problem(Transitions.of(fitting), self._batch_size(runs))
            params, _ = fit_coefficients(design, previous, delta, phi, psi, kernels, weight_decay,
                                         self.config.lbfgs_iterations)
            table = coefficient_table(phi, psi, kernels, params)
            if self.config.fit_offsets:
                table = table + _test_offsets(design, previous, delta, table)
            residuals = None
            for ridge in values:  # strong -> weak: each warm-starts the next
                residuals, _ = _residuals(design, previous, delta, table, ridge, residuals)
                yield table + residuals

        chosen = cross_validate(runs, grid, tables, self.config.cv_folds, self.config.seed, fix=_CV_FIX,
                                batch_size=self._batch_size(runs))
        return chosen.best, chosen.scores

    # --- coefficients -----------------------------------------------------------------
    def _inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``phi [N, K]``, ``psi [M, K']``, ``kernels [J, N, M]`` (float32)."""
        phi, psi = (torch.as_tensor(self.projections[split](features), dtype=torch.float32)
                    for split, features in (("train", self.train_features), ("test", self.test_features)))
        return phi, psi, self._kernels()

    def _full_table(self) -> torch.Tensor:
        table = self._feature_table()
        return table if self.residuals is None else table + self.residuals

    def _feature_table(self) -> torch.Tensor:
        table = coefficient_table(*self._inputs(), self.params)
        return table if self.offsets is None else table + self.offsets

    @property
    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` float32 ``[N, M]``: feature part plus residuals (``alpha = 1 + sum_i a_i``)."""
        self._check_fitted()
        table = self._full_table()
        num_test = self.test_ids.size
        return table[:, :num_test].numpy(), table[:, num_test:].numpy()

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        return rollout(self._full_table(), curricula, initial, 1.0, True, batch_size=self._batch_size())

    # --- new test examples ------------------------------------------------------------
    def for_test_examples(self, test_ids: Any, test_features: Any = None) -> FeaturizedSimulator:
        """A copy that simulates the test examples ``test_ids`` ``[M']`` (any, also never seen).

        ``test_features`` ``[M', D']`` default to the task's features of those ids; either are
        unscaled (as the task gives them or as passed to fit) and get the fitted scaling. Residuals are
        kept for ids the simulator was fitted on; new ids use the feature part alone. Their
        ``mean_change`` (the mean-trajectory baseline) is the mean over the fitted test examples.
        """
        self._check_fitted()
        test_ids = np.asarray(test_ids).astype(str)
        if test_ids.ndim != 1 or test_ids.size == 0 or np.unique(test_ids).size != test_ids.size:
            raise RunDataError("test_ids", "shape", "expected a non-empty 1-D list of unique ids")
        width = self.test_features.shape[1]
        if test_features is None:
            test_features, name = self.task_features("test", test_ids)[0], "task test features"
        else:
            name = "test_features"
        # The fitted per-block scaling, for the task's features and the caller's alike (the same
        # raw features as for fitting; a no-op when the simulator was fitted on given features).
        features = self._scaled(check_features(test_features, test_ids, name, width))
        position = {key: m for m, key in enumerate(self.test_ids.tolist())}
        known = np.array([position.get(key, -1) for key in test_ids.tolist()])
        other = copy.copy(self)
        other.test_ids, other.test_features = test_ids, features
        fallback = self.mean_change.mean(axis=1, keepdims=True)
        other.mean_change = np.where(known >= 0, self.mean_change[:, np.maximum(known, 0)], fallback)
        if self.offsets is not None:  # new test examples: the feature part's own level (offset 0)
            num_test, columns = self.test_ids.size, torch.as_tensor(np.maximum(known, 0))
            keep = torch.as_tensor(known >= 0, dtype=self.offsets.dtype)
            other.offsets = torch.cat([self.offsets[:, :num_test][:, columns] * keep,
                                       self.offsets[:, num_test:][:, columns] * keep], dim=1)
        if self.residuals is not None:
            num_test = self.test_ids.size
            columns = torch.as_tensor(np.maximum(known, 0))
            keep = torch.as_tensor(known >= 0, dtype=self.residuals.dtype)
            other.residuals = torch.cat([self.residuals[:, :num_test][:, columns] * keep,
                                         self.residuals[:, num_test:][:, columns] * keep], dim=1)
        return other

    # --- persistence --------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"train_features": self.train_features, "test_features": self.test_features,
                  "kernel_blocks": self.kernel_blocks, "kernel_scales": self.kernel_scales,
                  "feature_scales": self.feature_scales,
                  **{name: value.numpy() for name, value in self.params.items()},
                  **self.projections["train"].arrays("train"), **self.projections["test"].arrays("test")}
        if self.residuals is not None:
            arrays["residuals"] = self.residuals.numpy()
        if self.offsets is not None:
            arrays["offsets"] = self.offsets.numpy()
        if self.checkpoint_curriculum is not None:
            arrays["checkpoint_curriculum"] = self.checkpoint_curriculum
        return arrays

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.train_features = check_features(arrays["train_features"], self.train_ids, "state.train_features")
        self.test_features = check_features(arrays["test_features"], self.test_ids, "state.test_features")
        self.kernel_blocks, self.kernel_scales = arrays["kernel_blocks"].reshape(-1, 2), arrays["kernel_scales"]
        self.feature_scales = arrays["feature_scales"]
        self.projections = {split: Projection.from_arrays(arrays, split) for split in SPLITS}
        self.params = {name: torch.as_tensor(arrays[name]) for name in PARAMETERS}
        try:
            table = coefficient_table(*self._inputs(), self.params)
        except RuntimeError as error:  # inconsistent shapes
            raise ValueError(str(error).splitlines()[0]) from None
        self.residuals = torch.as_tensor(arrays["residuals"]) if "residuals" in arrays else None
        self.offsets = torch.as_tensor(arrays["offsets"]) if "offsets" in arrays else None
        if self.offsets is not None and self.offsets.shape != (1, table.shape[1]):
            raise ValueError(f"offsets have shape {tuple(self.offsets.shape)}, expected {(1, table.shape[1])}")
        self.checkpoint_curriculum = arrays.get("checkpoint_curriculum")
        if self.residuals is not None and self.residuals.shape != table.shape:
            raise ValueError(f"residuals have shape {tuple(self.residuals.shape)}, expected {tuple(table.shape)}")


def _test_offsets(design: BatchDesign, previous: torch.Tensor, delta: torch.Tensor, table: torch.Tensor,
                  ridge: float = 1e-3) -> torch.Tensor:
    """``[1, 2M]``: per-test-example ``(c_a, c_b)`` added to every training example's coefficients.

    Least squares on what ``table`` leaves unexplained (2 x 2 normal equations per test example).
    """
    num_test = previous.shape[1]
    summed = design.matmul(table)
    unexplained = (delta - summed[:, :num_test] * previous - summed[:, num_test:]).double()
    counts = design.matmul(torch.ones(design.num_train, 1)).double()        # [S, 1] examples per batch
    x_a, x_b = counts * previous.double(), counts.expand_as(unexplained)
    scale = float((x_b * x_b).sum(0).mean())
    aa, ab, bb = (x_a * x_a).sum(0) + ridge * scale, (x_a * x_b).sum(0), (x_b * x_b).sum(0) + ridge * scale
    ya, yb = (x_a * unexplained).sum(0), (x_b * unexplained).sum(0)
    determinant = aa * bb - ab * ab
    c_a, c_b = (bb * ya - ab * yb) / determinant, (aa * yb - ab * ya) / determinant
    return torch.cat([c_a, c_b]).to(torch.float32)[None]


def _residuals(design: BatchDesign, previous: torch.Tensor, delta: torch.Tensor, table: torch.Tensor, ridge: float,
               initial: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Per-pair residuals ``[N, 2M]`` for what ``table`` leaves unexplained, and the CG iterations."""
    num_test = previous.shape[1]
    summed = design.matmul(table)
    unexplained = delta - summed[:, :num_test] * previous - summed[:, num_test:]
    solution = solve_transition_ridge(design, previous, unexplained, ridge, fit_alpha=True, initial=initial)
    assert solution.a is not None   # fit_alpha=True
    return torch.cat([solution.a, solution.b], dim=1), solution.iterations


def _problem(transitions: Transitions,
             batch_size: int | None = None) -> tuple[BatchDesign, torch.Tensor, torch.Tensor]:
    """Batch design ``X`` (batch-mean weights with ``batch_size``), previous losses and one-step changes ``[S, M]``."""
    previous, current = (torch.as_tensor(x, dtype=torch.float32) for x in transitions.columns(slice(None)))
    design = BatchDesign(transitions.batches, transitions.runs.num_train, batch_size=batch_size)
    return design, previous, current - previous
