r"""GPTfluence (Chai et al., EMNLP 2024): a featurized ``n``-th order Markov simulator, as a peer.

"On Training Data Influence of GPT Models" simulates a test example's loss along a curriculum
``c_1..c_T`` by an ``n``-th order Markov process whose coefficients come from embeddings of
the training examples in each batch and of the test example. This module implements that
model beside ours, so both can be compared on the same runs:

.. math::

    L_t(z) = \sum_{j=1}^{n} \alpha_j(c_t, z)\, L_{t-j}(z) + \beta(c_t, z), \qquad
    L_{t-j} := L_0 \text{ for } t - j < 0,

with the coefficients built from batch means of learned pair terms

.. math::

    \bar A_h(c_t, z) = \frac{1}{|c_t|} \sum_{i \in c_t} A_h(i, z), \qquad
    A_h(i, z) = \langle W_h \tilde e_i,\; U_h \tilde e_z \rangle + o_h \quad (h = 1..n, \beta),

    \alpha_j = [j = 1] + s_\alpha \bar A_j, \qquad
    \beta = s_\beta \bar A_\beta - c\, s_\alpha \sum_{j=1}^{n} \bar A_j,

so that one step is
``L_t = L_{t-1} + s_alpha sum_j Abar_j (L_{t-j} - c) + s_beta Abar_beta``, where

* ``e~ = [(f - mu) / sigma, 1]``: the example's FROZEN embedding ``f`` (the task's
  :meth:`~simfluence.tasks.Task.example_features`, or the caller's ``train_features`` /
  ``test_features``), standardised per column (``mu``, ``sigma`` over the training examples;
  test features of another width by their own) with a 1 appended, so the maps are affine;
* ``W_h`` ``[r, D + 1]`` and ``U_h`` ``[r, D' + 1]`` are learned maps of rank ``r`` and ``o_h``
  scalar offsets, one set per head (``n`` heads for ``alpha``, one for ``beta``);
* ``c`` is the mean loss, ``s_alpha = sigma_Delta / sigma_L`` and ``s_beta = sigma_Delta``
  (``sigma_Delta`` the root mean square of the one-step loss changes, ``sigma_L`` that of
  ``L - c``, over the fitting transitions): the learned ``A_h`` are of order 1 for any loss
  scale, and centring the losses on ``c`` keeps the ``alpha`` heads from nearly duplicating the
  ``beta`` head (Adam converges much faster than with ``beta = s_beta Abar_beta`` alone).

These choices change the parametrisation, not the model class, of the paper's (a sum of
bilinear pair terms is one of higher rank): ``alpha_1`` is centred on 1 (the untrained model
keeps the loss constant), ``beta`` carries the centring term, and the batch sums are batch
means (for a batch-mean loss an example's one-step effect scales with ``1 / |c_t|``; with a
fixed batch size that is a constant factor the maps absorb, and a short last batch is not
under-weighted).

Fitting, as in the paper, is on teacher-forced transitions: for each fitting run and each
recorded step ``t`` whose losses ``L_{t-1}, ..., L_{t-n}`` are recorded (or padded with ``L_0``)

.. math::

    \min_\theta\ \frac{1}{S M \sigma_\Delta^2} \sum_{s, z} \big(\hat L_t(z) - L_t(z)\big)^2
    + \lambda \lVert \theta \rVert^2

by full-batch Adam (one step per epoch, the learning rate decayed to 0 over ``epochs`` on a
cosine), from a seeded start (``W`` random, ``U`` and ``o`` 0: the constant model). Batch means
of the pair terms are computed as ``<W_h ebar_t, U_h e~_z> + o_h`` from the batch's mean
embedding ``ebar_t``, so no ``[N, M]`` table is formed. A ``validation_fraction`` of the
fitting runs (never held-out runs) is kept aside: every ``eval_every`` epochs the model is
rolled out on them from their true ``L_0`` and its all-steps MSE recorded; training stops
after ``patience`` epochs without improvement and keeps the best epoch (epoch 0, the constant
model, included). With ``refit`` the model is then trained again, from the same start and on
the same schedule, on all fitting runs for that many epochs.

The paper encodes examples with a pretrained language model; here the frozen embeddings are
whatever the task provides (MiniLM sentence embeddings and the head's output error for
``text-minilm``, pixels, hidden activations and output error for ``digits-mlp``, mean hidden
states for ``tiny-lm``) or the caller gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.functional import embedding_bag

from simfluence.errors import UsageError
from simfluence.func.features import check_features, given_features, task_features
from simfluence.runs.log import PAD, RunDataError, RunSet
from simfluence.simulators.base import Capabilities, Simulator, register
from simfluence.simulators.config import TaskConfig, boolean, integer, positive, setting

_FIX = "pass train_features and test_features, or task="


@dataclass(frozen=True)
class MarkovTransitions:
    """Teacher-forced ``n``-th order transitions of a run set.

    Attributes:
        batches: int ``[S, B]``: the batch of each transition's step ``t`` (``-1`` pads).
        previous: float32 ``[S, n, M]``: ``L_{t-1}, ..., L_{t-n}`` (``L_0`` before step 0).
        target: float32 ``[S, M]``: ``L_t``.
    """

    batches: np.ndarray
    previous: np.ndarray
    target: np.ndarray

    @classmethod
    def of(cls, runs: RunSet, order: int, source: str = "<runs>") -> MarkovTransitions:
        """Every recorded step ``t >= 1`` whose ``order`` previous losses are recorded (or padded)."""
        steps = runs.eval_steps.astype(np.int64)
        position = np.full(runs.num_steps + 1, -1, dtype=np.int64)
        position[steps] = np.arange(steps.size)
        targets = steps[1:]                                                               # [K - 1]
        lags = position[np.maximum(targets[:, None] - np.arange(1, order + 1)[None], 0)]  # [K - 1, n]
        valid = (lags >= 0).all(axis=1)
        if not valid.any():
            raise RunDataError(source, "eval_steps", f"has no step whose {order} previous steps are recorded, so no "
                               f"order-{order} transition can be fitted",
                               "record losses after every step, or lower the order")
        batches = runs.curricula[:, targets[valid] - 1]                                   # [R, K', B]
        previous = runs.losses[:, lags[valid]]                                           # [R, K', n, M]
        target = runs.losses[:, 1:][:, valid]                                             # [R, K', M]
        num_test = runs.num_test
        return cls(batches.reshape(-1, batches.shape[-1]), previous.reshape(-1, order, num_test).astype(np.float32),
                   target.reshape(-1, num_test).astype(np.float32))


def _standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation ``[D]`` (1 where a column is constant)."""
    mean = features.mean(axis=0, dtype=np.float64)
    scale = features.std(axis=0, dtype=np.float64)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def _embeddings(features: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``[n, D + 1]``: ``[(features - mean) / scale, 1]``."""
    standardised = (features.astype(np.float64) - mean) / scale
    return np.concatenate([standardised, np.ones((features.shape[0], 1))], axis=1).astype(np.float32)


def batch_embeddings(train: torch.Tensor, batches: torch.Tensor) -> torch.Tensor:
    """``[S, D + 1]``: the mean of ``train``'s rows ``[N, D + 1]`` over each batch ``[S, B]``.

    ``-1`` pads; a batch of padding only gives 0 (also in the last, constant column, so that
    its batch means of the pair terms, offsets included, are 0).
    """
    padding = train.shape[0]
    table = torch.cat([train, train.new_zeros(1, train.shape[1])])
    index = torch.where(batches == PAD, padding, batches)
    return embedding_bag(index, table, mode="mean", padding_idx=padding)


def batch_means(batch: torch.Tensor, test: torch.Tensor, train_maps: torch.Tensor, test_maps: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
    r"""``[S, H, M]``: ``Abar_h(c_s, z) = <W_h ebar_s, U_h e~_z> + o_h [c_s non-empty]``.

    The batch mean of the bilinear pair terms is the pair term of the batch's mean embedding.

    Args:
        batch: ``[S, D + 1]`` mean training embeddings of the batches (:func:`batch_embeddings`).
        test: ``[M, D' + 1]`` test embeddings ``e~_z``.
        train_maps: ``W`` ``[H, r, D + 1]``.
        test_maps: ``U`` ``[H, r, D' + 1]``.
        offsets: ``o`` ``[H]``.
    """
    left = torch.einsum("sd,hrd->hsr", batch, train_maps)
    right = torch.einsum("md,hrd->hmr", test, test_maps)
    return torch.einsum("hsr,hmr->shm", left, right) + offsets[None, :, None] * batch[:, -1:, None]


def markov_step(means: torch.Tensor, history: list[torch.Tensor], units: tuple[float, float, float]) -> torch.Tensor:
    r"""``L_t = L_{t-1} + s_alpha sum_j Abar_j (L_{t-j} - c) + s_beta Abar_beta`` (``[R, M]``).

    Args:
        means: ``[R, n + 1, M]`` batch means ``Abar_1..Abar_n, Abar_beta`` (:func:`batch_means`).
        history: ``n`` tensors ``[R, M]``: ``L_{t-1}, ..., L_{t-n}``.
        units: ``(s_alpha, s_beta, c)``.
    """
    scale_alpha, scale_beta, center = units
    order = len(history)
    step = scale_beta * means[:, order]
    for j, previous in enumerate(history):
        step = step + scale_alpha * means[:, j] * (previous - center)
    return history[0] + step


def markov_rollout(train: torch.Tensor, test: torch.Tensor, params: tuple[torch.Tensor, ...], curricula: np.ndarray,
                   initial: torch.Tensor, units: tuple[float, float, float], steps_per_block: int = 16) -> torch.Tensor:
    """Roll the module's model out from ``initial``, in ``initial``'s dtype.

    Args:
        train: ``[N, D + 1]`` training embeddings.
        test: ``[M, D' + 1]`` test embeddings.
        params: ``(W, U, o)`` as for :func:`batch_means`; ``n = H - 1``.
        curricula: int ``[R, T, B]``, ``-1`` pads.
        initial: ``[R, M]`` losses before training.
        units: ``(s_alpha, s_beta, c)``.
        steps_per_block: steps whose batch means are computed at once.

    Returns:
        ``[R, T + 1, M]``, index 0 being ``initial``.
    """
    num_runs, num_steps, width = curricula.shape
    num_test = initial.shape[1]
    train, test = train.to(initial.dtype), test.to(initial.dtype)
    train_maps, test_maps, offsets = (value.to(initial.dtype) for value in params)
    index = torch.as_tensor(np.ascontiguousarray(curricula), dtype=torch.int64)
    out = initial.new_empty(num_runs, num_steps + 1, num_test)
    out[:, 0] = initial
    history = [initial] * (train_maps.shape[0] - 1)  # L_{t-1}, ..., L_{t-n}
    for start in range(0, num_steps, steps_per_block):
        span = min(steps_per_block, num_steps - start)
        batch = batch_embeddings(train, index[:, start:start + span].reshape(-1, width))
        means = batch_means(batch, test, train_maps, test_maps, offsets).view(num_runs, span, -1, num_test)
        for k in range(span):
            loss = markov_step(means[:, k], history, units)
            history = [loss, *history[:-1]]
            out[:, start + k + 1] = loss
    return out


@dataclass(frozen=True)
class GPTfluenceConfig(TaskConfig):
    """Settings of ``gptfluence``."""

    order: int = setting(2, "n, the number of previous losses each step depends on.")
    rank: int = setting(8, "r, the rank of the learned maps W_h, U_h (an embedding size).")
    epochs: int = setting(1000, "Most full-batch Adam steps (and the length of the cosine learning-rate decay).")
    learning_rate: float = setting(1e-2, "Adam's initial learning rate.")
    weight_decay: float = setting(1e-4, "lambda, the L2 penalty on all learned parameters (absolute).")
    validation_fraction: float = setting(0.2, "Share of the fitting runs kept aside for early stopping (0: none, "
                                         "all epochs are run).")
    patience: int = setting(500, "Epochs without a better validation MSE before training stops.")
    eval_every: int = setting(10, "Epochs between validation rollouts.")
    refit: bool = setting(True, "After early stopping, train again on all fitting runs for the best epoch count.")
    seed: int = setting(0, "Seed of the validation split and of the initial maps.")

    def validate(self) -> None:
        """Check each setting's range."""
        super().validate()
        for name in ("order", "rank", "epochs", "patience", "eval_every"):
            self._set(name, integer(name, getattr(self, name), 1))
        self._set("learning_rate", positive("learning_rate", self.learning_rate))
        self._set("weight_decay", positive("weight_decay", self.weight_decay, allow_zero=True))
        if isinstance(self.validation_fraction, bool) or not isinstance(self.validation_fraction, (int, float)) \
                or not 0 <= self.validation_fraction < 1:
            raise UsageError(f"validation_fraction: expected a number in [0, 1), got {self.validation_fraction!r}")
        self._set("validation_fraction", float(self.validation_fraction))
        self._set("refit", boolean("refit", self.refit))
        self._set("seed", integer("seed", self.seed, 0))


@register
class GPTfluenceSimulator(Simulator):
    r"""GPTfluence's featurized ``n``-th order Markov simulator (see the module docstring for the model).

    Args:
        train_features: float ``[N, D]`` frozen embeddings, one row per training id of the fitting
            runs; default: the task's :meth:`~simfluence.tasks.Task.example_features`.
        test_features: float ``[M, D']``, one row per test id of the fitting runs (given with
            ``train_features`` or not at all).
        task: a registered task name or a :class:`~simfluence.tasks.Task` supplying the
            features by id; default: the task named in the runs' meta (runs made by ``collect``).
        task_options: options for a task given by name (default: the runs' ``task_config``).
        order: ``n``, the number of previous losses each step depends on.
        rank: ``r``, the rank of the learned maps ``W_h``, ``U_h``.
        epochs: most full-batch Adam steps (and the length of the cosine learning-rate decay).
        learning_rate: Adam's initial learning rate.
        weight_decay: ``lambda``, the L2 penalty on all learned parameters.
        validation_fraction: share of the fitting runs kept aside for early stopping (at least
            one run when there are two or more; 0: no early stopping, all ``epochs`` are run).
        patience: epochs without a better validation MSE before training stops.
        eval_every: epochs between validation rollouts.
        refit: after early stopping, train again on all fitting runs for the best epoch count
            (``False``: keep the model trained without the validation runs).
        seed: seed of the validation split and of the initial maps.

    Fitted state (attributes ending in ``_``): ``train_embeddings_`` ``[N, D + 1]``,
    ``test_embeddings_`` ``[M, D' + 1]``, ``train_maps_`` ``W`` ``[n + 1, r, D + 1]``,
    ``test_maps_`` ``U`` ``[n + 1, r, D' + 1]``, ``offsets_`` ``o`` ``[n + 1]`` (the last head is
    ``beta``'s) and ``units_`` ``[3]`` = ``(s_alpha, s_beta, c)``.
    """

    kind = "gptfluence"
    capabilities = Capabilities("extension", task="optional", transitions=True)

    config_class = GPTfluenceConfig
    config: GPTfluenceConfig

    def __init__(self, config: GPTfluenceConfig | None = None, *, train_features: Any = None,
                 test_features: Any = None, **settings: Any):
        super().__init__(config, **settings)
        self.given_features = {"train": train_features, "test": test_features}
        self.train_embeddings_: np.ndarray | None = None
        self.test_embeddings_: np.ndarray | None = None
        self.train_maps_: np.ndarray | None = None
        self.test_maps_: np.ndarray | None = None
        self.offsets_: np.ndarray | None = None
        self.units_: np.ndarray | None = None

    # --- features -------------------------------------------------------------------
    def _features(self, runs: RunSet) -> tuple[np.ndarray, np.ndarray]:
        """Unscaled float32 features ``[N, D]`` and ``[M, D']`` in the order of the runs' ids."""
        given = given_features(self.given_features["train"], self.given_features["test"], runs.train_ids,
                               runs.test_ids)
        if given is not None:
            return given
        from simfluence.tasks.registry import task_for_runs

        task = task_for_runs(self.task_spec, self.config.task_options, runs.meta, _FIX)
        try:
            return task_features(task, "train", runs.train_ids)[0], task_features(task, "test", runs.test_ids)[0]
        except NotImplementedError as error:
            raise RunDataError("<runs>", "meta.task", str(error).splitlines()[0], _FIX) from None

    # --- fitting ----------------------------------------------------------------------
    def _fit(self, runs: RunSet) -> None:
        config = self.config
        train, test = self._features(runs)
        train_stats = _standardisation(train)
        test_stats = train_stats if test.shape[1] == train.shape[1] else _standardisation(test)
        self.train_embeddings_ = _embeddings(train, *train_stats)
        self.test_embeddings_ = _embeddings(test, *test_stats)

        transitions = MarkovTransitions.of(runs, config.order)
        previous = transitions.previous[:, 0].astype(np.float64)
        delta_rms = max(float(np.sqrt(np.mean(np.square(transitions.target - previous)))), 1e-12)
        center = float(previous.mean())
        loss_rms = max(float(np.sqrt(np.mean(np.square(previous - center)))), 1e-12)
        self.units_ = np.array([delta_rms / loss_rms, delta_rms, center])

        num_validation = 0
        if config.validation_fraction > 0 and runs.num_runs >= 2:
            num_validation = min(max(round(config.validation_fraction * runs.num_runs), 1), runs.num_runs - 1)
        permutation = np.random.default_rng(config.seed).permutation(runs.num_runs)
        training = runs.select(np.sort(permutation[num_validation:])) if num_validation else runs
        validation = runs.select(np.sort(permutation[:num_validation])) if num_validation else None
        params, best_epoch, scores = self._train(MarkovTransitions.of(training, config.order), validation,
                                                 config.epochs)
        refit = validation is not None and config.refit and best_epoch > 0
        if refit:
            params, _, _ = self._train(transitions, None, best_epoch)
        self.train_maps_, self.test_maps_, self.offsets_ = (value.numpy().copy() for value in params)
        with torch.no_grad():
            relative_mse = float(self._transition_loss(self._tensors(transitions), params))
        self.fit_info.update(order=config.order, rank=config.rank,
                             feature_dims=[int(train.shape[1]), int(test.shape[1])],
                             units=self.units_.tolist(), best_epoch=best_epoch, validation_runs=num_validation,
                             validation_mse=scores, refit=refit, transition_relative_mse=relative_mse)

    def _tensors(self, transitions: MarkovTransitions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 tensors of ``transitions``: batch mean embeddings ``[S, D + 1]``, previous, target."""
        train = torch.as_tensor(self.train_embeddings_)
        batch = batch_embeddings(train, torch.as_tensor(transitions.batches, dtype=torch.int64))
        return batch, torch.as_tensor(transitions.previous), torch.as_tensor(transitions.target)

    def _transition_loss(self, tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                         params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Teacher-forced MSE of ``L_t`` divided by ``sigma_Delta^2`` (without the penalty).

        Args:
            tensors: from :meth:`_tensors`.
            params: ``(W, U, o)`` as for :func:`batch_means`.
        """
        batch, previous, target = tensors
        means = batch_means(batch, torch.as_tensor(self.test_embeddings_), *params)
        predicted = markov_step(means, list(previous.unbind(dim=1)), self._units())
        return (predicted - target).square().mean() / self._units()[1] ** 2

    def _train(self, transitions: MarkovTransitions, validation: RunSet | None,
               epochs: int) -> tuple[tuple[torch.Tensor, ...], int, dict[str, float]]:
        """Full-batch Adam from the seeded start for at most ``epochs`` epochs.

        Returns:
            The parameters ``(W, U, o)`` of the best epoch (the last without ``validation``), that
            epoch, and the validation MSE every ``eval_every`` epochs by epoch (empty without ``validation``).
        """
        config = self.config
        assert self.train_embeddings_ is not None and self.test_embeddings_ is not None
        heads = config.order + 1
        width = self.train_embeddings_.shape[1]
        generator = torch.Generator().manual_seed(config.seed)
        params = (torch.randn(heads, config.rank, width, generator=generator).div_(np.sqrt(width)).requires_grad_(True),
                  torch.zeros(heads, config.rank, self.test_embeddings_.shape[1], requires_grad=True),
                  torch.zeros(heads, requires_grad=True))
        optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: 0.5 * (1 + float(np.cos(np.pi * min(epoch, config.epochs) / config.epochs))))
        tensors = self._tensors(transitions)

        def snapshot() -> tuple[torch.Tensor, ...]:
            return tuple(value.detach().clone() for value in params)

        scores: dict[str, float] = {}
        best, best_epoch, best_score = snapshot(), 0, float("inf")
        if validation is not None:
            best_score = scores["0"] = self._validation_mse(validation, best)
        for epoch in range(1, epochs + 1):
            optimizer.zero_grad()
            loss = self._transition_loss(tensors, params)
            if config.weight_decay:
                loss = loss + config.weight_decay * sum(value.square().sum() for value in params)
            loss.backward()
            optimizer.step()
            schedule.step()
            if validation is None or (epoch % config.eval_every and epoch != epochs):
                continue
            score = scores[str(epoch)] = self._validation_mse(validation, snapshot())
            if score < best_score:
                best, best_epoch, best_score = snapshot(), epoch, score
            elif epoch - best_epoch >= config.patience:
                break
        if validation is None:
            best, best_epoch = snapshot(), epochs
        return best, best_epoch, scores

    def _validation_mse(self, runs: RunSet, params: tuple[torch.Tensor, ...]) -> float:
        """Rolled-out all-steps MSE on ``runs`` (at their recorded steps) of the model ``params``."""
        with torch.no_grad():
            initial = torch.as_tensor(runs.losses[:, 0], dtype=torch.float64)
            predicted = markov_rollout(*self._embedding_tensors(), params, runs.curricula, initial, self._units())
            recorded = torch.as_tensor(runs.eval_steps[1:], dtype=torch.int64)
            truth = torch.as_tensor(runs.losses[:, 1:], dtype=torch.float64)
            return float((predicted[:, recorded] - truth).square().mean())

    # --- simulation -------------------------------------------------------------------
    def _embedding_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.train_embeddings_ is not None and self.test_embeddings_ is not None
        return torch.as_tensor(self.train_embeddings_), torch.as_tensor(self.test_embeddings_)

    def _units(self) -> tuple[float, float, float]:
        assert self.units_ is not None
        return float(self.units_[0]), float(self.units_[1]), float(self.units_[2])

    def _fitted_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.train_maps_ is not None and self.test_maps_ is not None and self.offsets_ is not None
        return torch.as_tensor(self.train_maps_), torch.as_tensor(self.test_maps_), torch.as_tensor(self.offsets_)

    def pair_terms(self) -> np.ndarray:
        r"""float64 ``[n + 1, N, M]``: the fitted ``A_h(i, z) = <W_h e~_i, U_h e~_z> + o_h``.

        With ``(s_alpha, s_beta, c) = units_``, a batch ``c_t`` gives
        ``alpha_j = [j = 1] + s_alpha mean_{i in c_t} A_j(i, z)`` and
        ``beta = s_beta mean A_beta - c s_alpha sum_j mean A_j`` (the module's formula).
        """
        self._check_fitted()
        train, test = (value.double() for value in self._embedding_tensors())
        train_maps, test_maps, offsets = (value.double() for value in self._fitted_params())
        left = torch.einsum("nd,hrd->hnr", train, train_maps)
        right = torch.einsum("md,hrd->hmr", test, test_maps)
        return (torch.einsum("hnr,hmr->hnm", left, right) + offsets[:, None, None]).numpy()

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = markov_rollout(*self._embedding_tensors(), self._fitted_params(), curricula,
                                 torch.as_tensor(initial, dtype=torch.float64), self._units())
        return out.numpy().astype(np.float32)

    # --- persistence --------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        state = {"train_embeddings": self.train_embeddings_, "test_embeddings": self.test_embeddings_,
                 "train_maps": self.train_maps_, "test_maps": self.test_maps_, "offsets": self.offsets_,
                 "units": self.units_}
        return {name: np.asarray(value) for name, value in state.items()}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        config = self.config
        assert self.train_ids is not None and self.test_ids is not None
        train = check_features(arrays["train_embeddings"], self.train_ids, "state.train_embeddings")
        test = check_features(arrays["test_embeddings"], self.test_ids, "state.test_embeddings")
        heads = config.order + 1
        shapes = {"train_maps": (heads, config.rank, train.shape[1]), "test_maps": (heads, config.rank, test.shape[1]),
                  "offsets": (heads,), "units": (3,)}
        for name, shape in shapes.items():
            if arrays[name].shape != shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, expected {shape}")
        self.train_embeddings_, self.test_embeddings_ = train, test
        self.train_maps_ = arrays["train_maps"].astype(np.float32)
        self.test_maps_ = arrays["test_maps"].astype(np.float32)
        self.offsets_ = arrays["offsets"].astype(np.float32)
        self.units_ = arrays["units"].astype(np.float64)
