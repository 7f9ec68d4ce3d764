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

Fitting minimises the teacher-forced one-step squared error of Linear plus
``ridge (|a|^2 + |b|^2) + pair_ridge (|U|^2 + |V|^2)``, starting from the
``linear-identity`` solution (ridge chosen by its cross-validation). ``gamma`` is linear in
``V`` for fixed ``U`` with one design ``F`` shared by all test examples, so ``V`` is solved
exactly inside the objective (a ``k^2 x k^2`` ridge system; variable projection) and
L-BFGS moves ``(a, b, U)`` jointly. Alternating exact ``(a, b)`` solves with ``U`` steps
converges far more slowly: ``(a, b)`` first soak up part of the interaction. The number
of L-BFGS rounds is chosen on a validation fold of the fitting runs (``validate``): on
small run sets the pair terms overfit as the optimisation goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from simfluence.progress import progress_bar

from simfluence.runs.log import RunSet
from simfluence.simulators.base import register
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.linear import _DTYPES, LinearIdentitySimulator, Transitions, all_steps_mse, rollout


def pair_features(embeddings: torch.Tensor, curricula: np.ndarray, window: int | None) -> torch.Tensor:
    """``F_t`` of the module docstring, flattened: ``[R, T, k * k]`` for curricula ``[R, T, B]``.

    Args:
        embeddings: ``U``, ``[N, k]`` (differentiable).
        curricula: int ``[R, T, B]``, ``-1`` pads.
        window: earlier steps paired with each step; ``None`` for all of them.
    """
    num_runs, num_steps, width = curricula.shape
    rank = embeddings.shape[1]
    design = BatchDesign(curricula.reshape(-1, width), embeddings.shape[0], embeddings.device)
    outer = (embeddings[:, :, None] * embeddings[:, None, :]).reshape(-1, rank * rank)
    step_sum = design.matmul(embeddings).view(num_runs, num_steps, rank)                 # e_t
    self_pairs = design.matmul(outer).view(num_runs, num_steps, rank * rank)             # Q_t
    before = torch.cumsum(step_sum, dim=1) - step_sum                                    # sum over s < t
    if window is not None and window < num_steps:
        lagged = torch.zeros_like(before)
        lagged[:, window:] = before[:, :num_steps - window]
        before = before - lagged                                                         # s in [t - window, t)
    cross = step_sum[..., :, None] * (before + 0.5 * step_sum)[..., None, :]
    cross = 0.5 * (cross + cross.transpose(-1, -2))
    return cross.reshape(num_runs, num_steps, rank * rank) - 0.5 * self_pairs


@register
class PairwiseSimulator(LinearIdentitySimulator):
    """``linear-pairwise``: Linear-identity plus low-rank pair terms (module docstring).

    Args:
        rank: ``k``, the size of the training-example embeddings ``u_i``.
        window: earlier steps whose examples pair with a step's examples; ``None`` pairs
            with every earlier step of the run, ``0`` only within a batch.
        pair_ridge: penalty on ``|U|^2 + |V|^2``; ``None``: a tenth of the Linear ridge strength.
        rounds: L-BFGS restarts (the teacher-forced error after each is kept in ``fit_info``);
            with ``validate``, the most that are used.
        steps: L-BFGS iterations per round.
        learning_rate: L-BFGS step size (with a strong-Wolfe line search).
        init_scale: standard deviation of the random initial ``U`` (``V`` starts at 0, so
            the fit starts exactly at the ``linear-identity`` solution).
        validate: choose the number of rounds (0 to ``rounds``; 0 is plain linear-identity)
            by the rolled-out all-steps MSE on one of ``cv_folds`` folds of the fitting runs,
            fitted on the others; then refit on all runs. Costs about twice the fit.
        dtype: ``"float64"`` by default: the objective sums many small squared errors, and
            L-BFGS stalls early on float32 rounding.
        **linear: the arguments of :class:`~simfluence.simulators.linear.LinearSimulator`;
            ``seed`` also seeds ``U``'s initialisation.
    """

    kind = "linear-pairwise"

    def __init__(self, rank: int = 4, window: int | None = None, pair_ridge: float | None = None, rounds: int = 8,
                 steps: int = 50, learning_rate: float = 1.0, init_scale: float = 0.1, validate: bool = True,
                 dtype: str = "float64", **linear: Any):
        super().__init__(dtype=dtype, **linear)
        for name, value in (("rank", rank), ("rounds", rounds), ("steps", steps)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if window is not None and (int(window) != window or window < 0):
            raise ValueError(f"window must be None (all earlier steps) or an integer >= 0, got {window!r}")
        for name, value in (("learning_rate", learning_rate), ("init_scale", init_scale)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if pair_ridge is not None and not pair_ridge > 0:
            raise ValueError(f"pair_ridge must be positive, got {pair_ridge!r}")
        self.rank, self.window, self.pair_ridge = int(rank), None if window is None else int(window), pair_ridge
        self.rounds, self.steps = int(rounds), int(steps)
        self.learning_rate, self.init_scale = learning_rate, init_scale
        self.validate = bool(validate)
        self.embeddings: torch.Tensor | None = None    # U [N, k]
        self.interactions: torch.Tensor | None = None  # V [k * k, M], symmetric in each column's k x k

    # --- fitting ------------------------------------------------------------------
    def _fit(self, runs: RunSet) -> None:
        super()._fit(runs)  # linear-identity: ridge by cross-validation, the starting (a, b)
        pair_ridge = 0.1 * self.chosen_ridge if self.pair_ridge is None else self.pair_ridge
        linear_table, rounds = self.table, self.rounds
        if self.validate:
            # The pair terms overfit small run sets as L-BFGS goes on: choose how many rounds
            # (0 = plain linear-identity) by rolled-out MSE on one fold of the fitting runs.
            fold = np.random.default_rng(self.seed).permutation(runs.num_runs)[:max(1, runs.num_runs // self.cv_folds)]
            validation, rest = runs.select(np.sort(fold)), runs.select(np.setdiff1d(np.arange(runs.num_runs), fold))
            start, _ = self._solve(Transitions.of(rest), self.chosen_ridge)
            errors = [all_steps_mse(rollout(start, validation.curricula, validation.initial_losses.astype(np.float64),
                                            self.alpha_offset, self.fit_alpha), validation)]
            self._refine(rest, start, self.rounds, pair_ridge, lambda: errors.append(
                all_steps_mse(self._simulate(validation.curricula, validation.initial_losses.astype(np.float64)),
                              validation)))
            rounds = int(np.argmin(errors))
            self.fit_info.update(validation_mse_per_round=errors)
        history = self._refine(runs, linear_table, rounds, pair_ridge)
        self.fit_info.update(pair_ridge=float(pair_ridge), rounds_used=rounds, transition_mse_per_round=history)

    def _refine(self, runs: RunSet, table: torch.Tensor, rounds: int, pair_ridge: float,
                after_round: Callable[[], None] | None = None) -> list[float]:
        """Fit ``(a, b, U, V)`` from ``table`` (module docstring); sets the state after every round.

        Returns the teacher-forced one-step MSE after each round.
        """
        dtype, device = _DTYPES[self.dtype], torch.device(self.device)
        transitions = Transitions.of(runs)
        positions = runs.eval_steps[transitions.pairs]  # curriculum row of each transition's step
        design = BatchDesign(transitions.batches, runs.num_train, device)
        previous, current = (torch.as_tensor(x, dtype=dtype, device=device) for x in transitions.columns(slice(None)))
        target = current - previous
        generator = torch.Generator().manual_seed(self.seed)
        embeddings = (torch.randn(runs.num_train, self.rank, generator=generator, dtype=dtype) * self.init_scale)
        embeddings = embeddings.to(device).requires_grad_()
        table = table.clone().to(dtype).requires_grad_()
        optimizer = torch.optim.LBFGS([table, embeddings], lr=self.learning_rate, max_iter=self.steps,
                                      history_size=20, line_search_fn="strong_wolfe")
        num_test, width = runs.num_test, self.rank * self.rank
        identity = torch.eye(width, dtype=dtype, device=device)

        def pair_fit() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """The best V for the current (a, b, U): a k^2 x k^2 ridge solve shared by all test examples."""
            summed = design.matmul(table)
            residual = target - summed[:, :num_test] * previous - summed[:, num_test:]
            features = pair_features(embeddings, runs.curricula, self.window)[:, positions].reshape(-1, width)
            interactions = torch.linalg.solve(features.T @ features + pair_ridge * identity, features.T @ residual)
            error = (residual - features @ interactions).square()
            objective = (error.sum() + self.chosen_ridge * table.square().sum()
                         + pair_ridge * (interactions.square().sum() + embeddings.square().sum()))
            return interactions, error, objective

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            objective = pair_fit()[2]
            objective.backward()
            bar.update()
            return objective

        history = []
        with torch.no_grad():
            self.table, self.embeddings = table.detach().clone(), embeddings.detach().clone()
            self.interactions = torch.zeros(width, num_test, dtype=dtype, device=device)  # rounds == 0: linear
        with progress_bar(total=rounds * self.steps, desc="fit linear-pairwise", unit="evaluation", leave=False) as bar:
            for _ in range(rounds):
                optimizer.step(closure)
                with torch.no_grad():
                    self.interactions, error, _ = pair_fit()
                    self.table, self.embeddings = table.detach().clone(), embeddings.detach().clone()
                history.append(float(error.mean()))
                if after_round is not None:
                    after_round()
        return history

    # --- prediction ---------------------------------------------------------------
    def pair_terms(self, curricula: np.ndarray) -> np.ndarray:
        """float64 ``[R, T, M]``: ``gamma_t`` of every step for validated curricula ``[R, T, B]``."""
        self._check_fitted()
        with torch.no_grad():
            features = pair_features(self.embeddings, curricula, self.window)
            return (features @ self.interactions).cpu().numpy().astype(np.float64)

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        num_runs, num_steps, _ = curricula.shape
        num_train, num_test = self.table.shape[0], self.test_ids.size
        with torch.no_grad():
            gamma = (pair_features(self.embeddings, curricula, self.window) @ self.interactions)
        # gamma does not depend on the loss, so each step's gamma is the b-row of one extra
        # "example" (a = 0) trained on at that step only: the Linear rollout then adds it.
        extra = torch.cat([torch.zeros_like(gamma), gamma], dim=2).reshape(-1, 2 * num_test)
        table = torch.cat([self.table, extra.to(self.table.dtype)])
        extra_ids = num_train + np.arange(num_runs * num_steps).reshape(num_runs, num_steps, 1)
        return rollout(table, np.concatenate([curricula, extra_ids], axis=2), initial, self.alpha_offset,
                       self.fit_alpha)

    # --- persistence --------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {**super()._params(), "rank": self.rank, "window": self.window, "pair_ridge": self.pair_ridge,
                "rounds": self.rounds, "steps": self.steps, "learning_rate": self.learning_rate,
                "init_scale": self.init_scale, "validate": self.validate}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {**super()._arrays(), "embeddings": self.embeddings.cpu().numpy(),
                "interactions": self.interactions.cpu().numpy()}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        super()._restore(arrays)
        embeddings, interactions = arrays["embeddings"], arrays["interactions"]
        if embeddings.shape != (self.train_ids.size, self.rank):
            raise ValueError(f"embeddings has shape {embeddings.shape}, expected {(self.train_ids.size, self.rank)}")
        if interactions.shape != (self.rank * self.rank, self.test_ids.size):
            raise ValueError(f"interactions has shape {interactions.shape}, "
                             f"expected {(self.rank * self.rank, self.test_ids.size)}")
        self.embeddings = torch.as_tensor(embeddings, device=self.table.device)
        self.interactions = torch.as_tensor(interactions, device=self.table.device)
