r"""Gradient-based attribution methods as additive simulators.

TracIn, Grad-Dot and influence functions predict how one SGD step on batch :math:`c_t`
changes a test example's loss: with batch-mean loss and learning rate :math:`\eta_t`,

.. math::

    L_t - L_{t-1} \approx \sum_{i \in c_t} B_i, \qquad
    B_i = -\frac{\bar\eta}{|c_t|}\, \nabla\ell(z_{\text{test}})^\top M \,\nabla\ell(z_i),

which is Simfluence-Additive with :math:`B` read off gradients instead of fitted. ``B`` is
the same at every step, so the learning-rate schedule enters as its average over the run,
:math:`\bar\eta = \frac1T \sum_t \eta_t` (the rates come from the runs' meta, which
records how they were trained):

* ``grad-dot``: :math:`M = I`, gradients at the starting checkpoint;
* ``tracin-cp``: :math:`M = I`, gradients at checkpoints :math:`\theta_k` (after steps
  :math:`s_1 < \dots < s_K` of one fitting run, stored during collection or replayed; by
  default the centres of 4 equal segments of the run), checkpoint :math:`k` standing for the
  steps whose weights are nearest to it (:func:`~simfluence.func.checkpoints.checkpoint_weights`,
  the midpoint rule, as the TracIn-CP peer), so
  :math:`\bar\eta\, g^\top g \to \frac1T \sum_k \big(\sum_{t \in k} \eta_t\big)\, g_k^\top g_k`.
  Against checkpoints at the segments' starts (step 0 and every quarter, before), subset /
  5 %-removal LDS rose from 0.69 / 0.76 to 0.75 / 0.79 on digits-mlp and from 0.69 / 0.61 to
  0.73 / 0.66 on text-minilm (tiny-lm about even);
* ``influence``: :math:`M = (H + \lambda I)^{-1}` with :math:`H` the Hessian of the mean
  training loss at the starting checkpoint (exact for small models, Hessian-vector
  products otherwise, see below). Influence functions estimate the effect of an
  example over the whole run, so their score is spread over its occurrences:
  :math:`B_i = -\nabla\ell(z_\text{test})^\top (H + \lambda I)^{-1} \nabla\ell(z_i) / (T\,|c|)`
  (:math:`\lambda` first lifts the smallest eigenvalue of :math:`H` to zero: the loss is not
  convex; the mean training loss weighs each example by :math:`1/N`, and a run trains on
  :math:`T|c|` example-occurrences, :math:`\bar o = T|c|/N` of them per example).
  Above ``exact_max_params`` weights :math:`H` is never formed: Lanczos with
  Hessian-vector products finds its top-:math:`k` eigenpairs :math:`(V, \Lambda)` and the
  rest of the spectrum is taken as 0,
  :math:`(H + \lambda I)^{-1} g \approx V (\Lambda + \lambda)^{-1} V^\top g + (g - V V^\top g)/\lambda`
  (``k`` Hessian-vector products in all, however many test examples).

Each has a ``-scaled`` form: one global scalar :math:`s` multiplying every predicted step
change, fitted by least squares on the fitting runs' one-step transitions,
:math:`s = \langle \hat\Delta, \Delta \rangle / \langle \hat\Delta, \hat\Delta \rangle`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from simfluence.errors import UsageError
from simfluence.func.checkpoints import checkpoint_weights, segment_centres
from simfluence.func.gradients import gradient_products, model_at, per_example_gradients
from simfluence.runs.log import RunDataError, RunSet
from simfluence.simulators.base import Capabilities, register
from simfluence.simulators.config import TaskConfig, integer, positive, setting, store_path
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.linear import TableConfig, TableSimulator, Transitions
from simfluence.tasks.schedules import run_learning_rates

DEFAULT_CHECKPOINTS = 4
"""Checkpoints ``tracin-cp`` replays by default: the centres of this many equal segments of the run."""


@dataclass(frozen=True)
class GradientConfig(TaskConfig, TableConfig):
    """Settings of the gradient kinds: the task, the table's device and precision, the chunk size."""

    chunk_size: int = setting(256, "Examples per vectorised gradient pass.")

    def validate(self) -> None:
        """Check the chunk size (and the task, device and dtype)."""
        super().validate()
        self._set("chunk_size", integer("chunk_size", self.chunk_size, 1))


@dataclass(frozen=True)
class TracInConfig(GradientConfig):
    """Settings of ``tracin-cp``."""

    checkpoint_steps: tuple[int, ...] | None = setting(None, "Steps whose weights serve as checkpoints; None: "
                                                       "those stored (with checkpoints=STORE), else the centres "
                                                       "of 4 equal segments of the run.")
    checkpoints: str | None = setting(None, "A run store collected with checkpoint_steps, whose checkpoints of the "
                                      "first fitting run that has them are read; None: replay the first fitting "
                                      "run (or use the state dicts given as checkpoints).")

    def validate(self) -> None:
        """Check the checkpoint steps and the store path."""
        super().validate()
        if self.checkpoint_steps is not None:
            steps = self.checkpoint_steps if isinstance(self.checkpoint_steps, (list, tuple)) else None
            if not steps:
                raise UsageError(f"checkpoint_steps: expected a non-empty list of steps, got {self.checkpoint_steps!r}")
            self._set("checkpoint_steps", tuple(sorted({integer("checkpoint_steps", step, 0) for step in steps})))
        self._set("checkpoints", store_path("checkpoints", self.checkpoints))


@dataclass(frozen=True)
class InfluenceConfig(GradientConfig):
    """Settings of ``influence``."""

    damping: float = setting(0.01, "After shifting H to be positive semi-definite, damping * |H|_2 is added to "
                             "its diagonal (scale-free).")
    exact_max_params: int = setting(8000, "Up to this many parameters H is formed and solved exactly; above, "
                                    "Lanczos finds its top lanczos_rank eigenpairs.")
    lanczos_rank: int = setting(128, "Lanczos steps (eigenpairs of H kept) above exact_max_params.")

    renamed: ClassVar[Mapping[str, str]] = {"rank": "lanczos_rank"}
    # Conjugate gradient, one solve per test example, was an alternative to Lanczos; it did not
    # finish fitting in 1,000 s where Lanczos took 373 s (docs/benchmarks.md), so it was removed.
    retired: ClassVar[Mapping[str, Any]] = {"solver": "lanczos", "cg_iterations": None}

    def validate(self) -> None:
        """Check damping, the exact-solve cap and the Lanczos rank."""
        super().validate()
        self._set("damping", positive("damping", self.damping))
        self._set("exact_max_params", integer("exact_max_params", self.exact_max_params, 0))
        self._set("lanczos_rank", integer("lanczos_rank", self.lanczos_rank, 1))


class GradientSimulator(TableSimulator):
    """Shared machinery: ``B`` from gradients, optional fitted scale, additive rollout.

    Args:
        task: a registered task name or a :class:`~simfluence.tasks.Task` (supplies
            the starting checkpoint, loss and data); default: the task named in the fitting
            runs' meta, with their recorded options. The learning rates come from the runs'
            meta (``learning_rate``, ``task_config.lr_schedule`` and ``warmup_steps``)
            where recorded, else from the task.
        task_options: options for a task given by name.
        chunk_size: examples per vectorised gradient pass.
    """

    fit_alpha = False
    alpha_offset = 1.0
    fitted_scale = False

    config_class = GradientConfig
    config: GradientConfig

    def __init__(self, config: GradientConfig | None = None, **settings: Any):
        super().__init__(config, **settings)
        self.scale = 1.0

    def _task_for(self, runs: RunSet):
        from simfluence.tasks.registry import replayable_task, task_for_runs

        # The resolved task is fitted state (task_): the setting config.task stays as given, so a
        # second fit on other runs reads their task, not the first runs'.
        self.task_ = replayable_task(task_for_runs(self.task_spec, self.config.task_options, runs.meta,
                                                   "pass task=... (the Task the runs were collected from)"))
        self.fit_info.update(task=self.task_.name)
        return self.task_

    @staticmethod
    def _learning_rates(task, runs: RunSet) -> np.ndarray:
        """float64 ``[T]``: the rates the runs were trained with (their meta first, then the task)."""
        rates = run_learning_rates(runs.meta, runs.num_steps)
        return task.learning_rates(runs.num_steps) if rates is None else rates

    # --- fitting ------------------------------------------------------------------
    def _fit(self, runs: RunSet) -> None:
        task = self._task_for(runs)
        for name, mine, theirs in (("train_ids", task.train_ids, runs.train_ids),
                                   ("test_ids", task.test_ids, runs.test_ids)):
            if not np.array_equal(mine, theirs):
                raise RunDataError("<runs>", name, f"differ from task '{task.name}'s ids",
                                   "fit gradient methods on runs collected from the same task")
        rates = self._learning_rates(task, runs)
        scores = self._scores(task, runs, rates)  # [N, M] = B
        self.scale = self._fit_scale(scores, runs) if self.fitted_scale else 1.0
        self.table = torch.as_tensor(self.scale * scores, dtype=getattr(torch, self.config.dtype),
                                     device=torch.device(self.config.device))
        self.fit_info.update(learning_rate=float(rates.mean()), scale=self.scale)

    def _scores(self, task, runs: RunSet, rates: np.ndarray) -> np.ndarray:
        """float64 ``[N, M]``: ``B`` for the runs' step learning rates ``rates`` ``[T]``."""
        raise NotImplementedError

    def _fit_scale(self, scores: np.ndarray, runs: RunSet) -> float:
        """Least-squares ``s`` of ``L_t - L_{t-1} ~ s X_t scores`` over the runs' transitions."""
        transitions = Transitions.of(runs)
        design = BatchDesign(transitions.batches, runs.num_train, batch_size=self._batch_size(runs))
        predicted = design.matmul(torch.as_tensor(scores)).numpy()
        previous, current = transitions.columns(slice(None))
        change = (current - previous).astype(np.float64)
        denominator = float((predicted * predicted).sum())
        return float((predicted * change).sum() / denominator) if denominator > 0 else 0.0

    # --- persistence --------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {"table": self.table.cpu().numpy(), "scale": np.array(self.scale)}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        super()._restore(arrays)
        self.scale = float(arrays["scale"])


@register
class GradDotSimulator(GradientSimulator):
    """``B_i = -(eta / |c|) g_test . g_i`` at the starting checkpoint."""

    kind = "grad-dot"
    capabilities = Capabilities(
        "gradient", task="required", device=True, precision=True, column_rollout=True, expected_rollout=True,
        replay_runs=0)

    def _scores(self, task, runs, rates):
        model, params = model_at(task, None)
        products = gradient_products(task, model, params, chunk_size=self.config.chunk_size)
        return (-rates.mean() / runs.batch_size * products).numpy()


@register
class TracInCPSimulator(GradientSimulator):
    """TracIn-CP: Grad-Dot over checkpoints along a fitting run, weighted by their learning rates.

    Args:
        checkpoint_steps: steps whose weights serve as checkpoints; default: those stored
            (with ``checkpoints=STORE``), else the centres of 4 equal segments of the run
            (:func:`~simfluence.func.checkpoints.segment_centres`). Each stands for the steps
            nearest to it, weighted by their learning rates
            (:func:`~simfluence.func.checkpoints.checkpoint_weights`).
        checkpoints: where the checkpoints come from:

            * ``None``: replay the first fitting run with the task's trainer (deterministic
              given the curriculum) and take its weights after ``checkpoint_steps``;
            * a run store path (collected with ``checkpoint_steps``): the stored checkpoints
              of the first fitting run that has them;
            * a list of state dicts, after ``checkpoint_steps`` (default: unknown, so each
              stands for an equal share of the steps).
    """

    kind = "tracin-cp"
    capabilities = Capabilities(
        "gradient", task="required", device=True, precision=True, checkpoints=True, column_rollout=True,
        expected_rollout=True, replay_runs=1)

    config_class = TracInConfig
    config: TracInConfig

    def __init__(self, config: TracInConfig | None = None, **settings: Any):
        checkpoints = settings.get("checkpoints")
        self.checkpoint_states: list[Mapping[str, torch.Tensor]] | None = None
        """State dicts given as ``checkpoints`` (not a setting: kept in memory, not saved)."""
        if checkpoints is not None and not isinstance(checkpoints, (str, os.PathLike)):
            self.checkpoint_states = list(checkpoints)
            settings = {**settings, "checkpoints": None}
        super().__init__(config, **settings)

    def _checkpoints(self, task, runs: RunSet) -> tuple[list[int] | None, Sequence[Mapping[str, torch.Tensor]]]:
        """The checkpoint steps ``s_k`` (``None``: unknown) and their state dicts."""
        config = self.config
        steps = None if config.checkpoint_steps is None else list(config.checkpoint_steps)
        num_steps = runs.num_steps
        states: Sequence[Mapping[str, torch.Tensor]]
        if config.checkpoints is not None:
            from simfluence.runs.store import RunStore

            store = RunStore(config.checkpoints)
            stored = {run_id: store.checkpoint_steps(run_id) for run_id in runs.run_ids}
            run_id = next((run_id for run_id, found in stored.items() if found), None)
            if run_id is None:
                raise RunDataError(config.checkpoints, "checkpoints", "holds no checkpoint of the fitting runs",
                                   "collect with --checkpoint-steps, or leave checkpoints unset to replay a run")
            steps = stored[run_id] if steps is None else steps
            states = [store.read_checkpoint(run_id, step) for step in steps]
        elif self.checkpoint_states is not None:
            states = self.checkpoint_states
        else:
            from simfluence.collect.train import train_states

            if steps is None:   # the centres of 4 equal segments, as the TracIn-CP peer reads a run
                steps = segment_centres(num_steps, DEFAULT_CHECKPOINTS)
            if max(steps) > num_steps:
                raise UsageError(f"checkpoint_steps: {max(steps)} is past the runs' {num_steps} steps")
            states = train_states(task, runs.curricula[0], steps)
        if steps is not None and len(steps) != len(states):
            raise UsageError(f"checkpoint_steps: {len(steps)} steps for {len(states)} checkpoints; "
                             "give one per checkpoint")
        return steps, states

    def _scores(self, task, runs, rates):
        steps, states = self._checkpoints(task, runs)
        self.checkpoint_steps_ = steps          # fitted: the steps used (the setting may be None)
        self.fit_info.update(checkpoint_steps=steps)
        if steps is None:
            weights = [rates.mean() / len(states)] * len(states)
        else:  # each checkpoint stands for the steps nearest to it (checkpoint_weights, as the peers)
            weights = list(checkpoint_weights(rates, steps) / runs.num_steps)
        total = np.zeros((task.num_train, task.num_test))
        for weight, state in zip(weights, states):
            model, params = model_at(task, state)
            total += weight * gradient_products(task, model, params, chunk_size=self.config.chunk_size).numpy()
        return -total / runs.batch_size


@register
class InfluenceSimulator(GradientSimulator):
    """Influence functions with a damped inverse Hessian, spread over an example's occurrences.

    Args:
        damping: after shifting ``H`` to be positive semi-definite (training losses are not
            convex), ``lambda = damping * |H|_2`` is added to its diagonal (scale-free).
        exact_max_params: up to this many parameters ``H`` is formed and solved exactly;
            above, Lanczos with Hessian-vector products finds its top ``rank`` eigenpairs (see
            the module docstring).
    """

    kind = "influence"
    capabilities = Capabilities(
        "gradient", task="required", device=True, precision=True, column_rollout=True, expected_rollout=True,
        replay_runs=0)

    config_class = InfluenceConfig
    config: InfluenceConfig

    def _scores(self, task, runs, rates):
        model, params = model_at(task, None)
        data = task.data
        names = list(params)
        shapes = [params[name].shape for name in names]
        sizes = [params[name].numel() for name in names]
        flat0 = torch.cat([params[name].reshape(-1) for name in names]).double()

        def mean_train_loss(flat: torch.Tensor) -> torch.Tensor:
            pieces = torch.split(flat.to(params[names[0]].dtype), sizes)
            p = {name: piece.reshape(shape) for name, piece, shape in zip(names, pieces, shapes)}
            return task.example_losses(model, data.train_inputs, data.train_targets, params=p).mean()

        if flat0.numel() <= self.config.exact_max_params:
            hessian = torch.func.hessian(mean_train_loss)(flat0.float()).double()
            eigenvalues = torch.linalg.eigvalsh(hessian)
            damping = _positive_damping(float(eigenvalues[0]), float(eigenvalues.abs().max()), self.config.damping)
            system = hessian + damping * torch.eye(hessian.shape[0], dtype=torch.float64)

            def solve(test_grads: torch.Tensor) -> torch.Tensor:
                return torch.linalg.solve(system, test_grads.double().T).T
        else:
            point = flat0.float()

            def hvp(vectors: torch.Tensor) -> torch.Tensor:
                def one(v):
                    return torch.func.jvp(torch.func.grad(mean_train_loss), (point,), (v,))[1]
                return torch.func.vmap(one)(vectors.float()).double()

            eigenvalues, eigenvectors = _lanczos(hvp, flat0.numel(), self.config.lanczos_rank)
            damping = _positive_damping(float(eigenvalues.min()), float(eigenvalues.abs().max()), self.config.damping)

            def solve(test_grads: torch.Tensor) -> torch.Tensor:
                test_grads = test_grads.double()
                coordinates = test_grads @ eigenvectors                        # [M, k]
                inside = (coordinates / (eigenvalues + damping)) @ eigenvectors.T
                return inside + (test_grads - coordinates @ eigenvectors.T) / damping

        self.fit_info["damping_absolute"] = damping
        products = gradient_products(task, model, params, test_transform=solve, chunk_size=self.config.chunk_size)
        return (-products / (runs.num_steps * runs.batch_size)).numpy()


def _positive_damping(smallest: float, largest: float, relative: float) -> float:
    """Shift that makes ``H + shift I`` positive definite, plus ``relative`` times ``|H|``.

    Training losses are not convex: ``H`` can have negative eigenvalues, and a solve with
    an indefinite matrix is meaningless. The shift lifts the smallest eigenvalue to
    ``relative * |H|_2``.
    """
    return max(0.0, -smallest) + relative * max(largest, 1e-12)


def _lanczos(hvp, size: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Extreme eigenpairs of a symmetric operator: float64 eigenvalues ``[k]`` and orthonormal vectors ``[P, k]``.

    ``rank`` Lanczos steps with full reorthogonalisation (the Krylov basis is kept, ``P x k``
    floats), then the Ritz pairs of the tridiagonal matrix: they converge first at both
    ends of the spectrum, the large eigenvalues and the most negative ones.
    """
    rank = min(rank, size)
    basis = torch.zeros(size, rank, dtype=torch.float64)
    alphas, betas = torch.zeros(rank, dtype=torch.float64), torch.zeros(rank, dtype=torch.float64)
    vector = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    vector /= vector.norm()
    steps = rank
    for j in range(rank):
        basis[:, j] = vector
        product = hvp(vector[None])[0]
        alphas[j] = vector @ product
        for _ in range(2):  # full reorthogonalisation; twice, as once loses orthogonality in floating point
            product -= basis[:, :j + 1] @ (basis[:, :j + 1].T @ product)
        betas[j] = product.norm()
        if j + 1 < rank and float(betas[j]) <= 1e-10 * float(alphas[:j + 1].abs().max().clamp_min(1e-300)):
            steps = j + 1  # the Krylov space is invariant: its Ritz pairs are exact
            break
        vector = product / betas[j]
    tridiagonal = (torch.diag(alphas[:steps]) + torch.diag(betas[:steps - 1], 1)
                   + torch.diag(betas[:steps - 1], -1))
    values, rotation = torch.linalg.eigh(tridiagonal)
    return values, basis[:, :steps] @ rotation


def _scaled(base: type[GradientSimulator]) -> type[GradientSimulator]:
    cls = type(f"{base.__name__[:-len('Simulator')]}ScaledSimulator", (base,),
               {"kind": f"{base.kind}-scaled", "fitted_scale": True,
                "capabilities": replace(base.capabilities, transitions=True),   # the scale is fitted on them
                "__doc__": f"``{base.kind}`` with one least-squares global scale fitted on the fitting runs."})
    return register(cls)


GradDotScaledSimulator = _scaled(GradDotSimulator)
TracInCPScaledSimulator = _scaled(TracInCPSimulator)
InfluenceScaledSimulator = _scaled(InfluenceSimulator)

__all__ = ["GradDotScaledSimulator", "GradDotSimulator", "GradientSimulator", "InfluenceScaledSimulator",
           "InfluenceSimulator", "TracInCPScaledSimulator", "TracInCPSimulator", "per_example_gradients"]
