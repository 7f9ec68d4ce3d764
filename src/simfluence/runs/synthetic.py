r"""Synthetic run sets drawn from known simulators: a ground truth for tests and benchmarks.

No model is trained: the losses follow a simulator's own equations with known coefficients,
so a fit can be checked against the truth. Shapes are those of :class:`~simfluence.runs.RunSet`:
curricula int ``[R, T, B]``, losses ``[R, T + 1, M]`` (every step recorded), training ids
``train-<i>`` and test ids ``test-<m>``.

**Simfluence-Linear** (:func:`linear_trajectories`): for run ``r``, step ``t`` with batch ``c_t``
and test example ``m``,

.. math::

    L^m_t = \Big(\alpha_0 + \sum_{i \in c_t} A_{im}\Big) L^m_{t-1} + \sum_{i \in c_t} B_{im}
            + \varepsilon, \qquad \varepsilon \sim \mathcal N(0, \text{noise}^2)

independently per (run, step, test example); ``alpha_0 = 1`` is the identity-centred form
(``linear-identity``), ``alpha_0 = 0`` the paper's. Two ways to draw it:

* :func:`linear_runs`, small and dense (NumPy, float64): ``A ~ N(0, 0.01)``,
  ``B ~ N(-0.01, 0.01)`` ``[N, M]``, curricula uniform over the training examples (with
  replacement), ``L_0 = 2 + U(0, 1)`` per test example (the same in every run);
* :func:`large_linear_runs`, at sizes where ``[N, M]`` tables do not fit in memory (torch,
  float32, one block of test examples at a time; :class:`LinearGroundTruth`): losses decay from
  about 2.3 towards a floor of 0.4-0.9 per test example, some training examples help a test
  example and some hurt it, and each run walks through random permutations of all training
  examples (:func:`epoch_curricula`).

**linear-trajectory** (:func:`trajectory_runs`): ``L_t = L_0 + G_t + F_t b`` with an AdamW-like
learning-rate schedule and momentum, ``F`` built by a loop over steps independently of the
library's own features.

Everything is a function of the seed: the same arguments give the same runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from simfluence.runs.log import RunSet


def _ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{k}" for k in range(count)]


# --- Simfluence-Linear, small and dense -------------------------------------------------
def linear_trajectories(a: np.ndarray, b: np.ndarray, curricula: np.ndarray, initial: np.ndarray,
                        rng: np.random.Generator, noise: float, alpha_offset: float = 1.0) -> np.ndarray:
    """float64 ``[R, T + 1, M]``: the Simfluence-Linear recursion of the module docstring.

    Args:
        a: ``A`` ``[N, M]``.
        b: ``B`` ``[N, M]``.
        curricula: int ``[R, T, B]`` training-example indices (no padding).
        initial: ``L_0``, ``[R, M]`` or ``[M]`` (the same in every run).
        rng: draws the noise, one ``[R, M]`` array per step in step order.
        noise: the noise's standard deviation.
        alpha_offset: ``alpha_0``.
    """
    num_runs, num_steps, _ = curricula.shape
    losses = np.zeros((num_runs, num_steps + 1, a.shape[1]))
    losses[:, 0] = initial
    for t in range(num_steps):
        alpha = alpha_offset + a[curricula[:, t]].sum(1)
        losses[:, t + 1] = alpha * losses[:, t] + b[curricula[:, t]].sum(1) + rng.normal(0, noise, losses[:, t].shape)
    return losses


def linear_runs(num_train: int = 40, num_test: int = 6, num_runs: int = 12, num_steps: int = 30, batch: int = 4,
                seed: int = 0, noise: float = 1e-3, alpha_offset: float = 1.0) -> tuple[RunSet, np.ndarray, np.ndarray]:
    """Runs drawn from a random Simfluence-Linear model: ``(runs, A, B)``, ``A`` and ``B`` ``[N, M]``.

    ``A ~ N(0, 0.01)``, ``B ~ N(-0.01, 0.01)``, curricula uniform (with replacement),
    ``L_0 = 2 + U(0, 1)`` per test example; the meta names the task ``synthetic-linear``.
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 0.01, (num_train, num_test))
    b = rng.normal(-0.01, 0.01, (num_train, num_test))
    curricula = rng.integers(0, num_train, (num_runs, num_steps, batch))
    initial = 2.0 + rng.random(num_test)
    losses = linear_trajectories(a, b, curricula, initial, rng, noise, alpha_offset)
    runs = RunSet.create(curricula, losses, _ids("train", num_train), _ids("test", num_test),
                         meta={"task": "synthetic-linear", "seed": seed})
    return runs, a, b


# --- Simfluence-Linear, large, block by block ---------------------------------------------
class LinearGroundTruth:
    r"""Identity-centred Simfluence-Linear coefficients, drawn block by block of test examples.

    Per test example ``m``: a total decay rate per step ``rate_m ~ U(0.007, 0.015)`` (at batch
    size ``B``), a loss floor ``floor_m ~ U(0.4, 0.9)`` and an initial loss ``~ 2.3``. Per training
    example ``i``: ``A_im = -(rate_m / B) g_im`` with ``g_im`` log-normal (mean 1, so some examples
    matter more than others), ``B_im = (rate_m / B) (g_im floor_m + 0.5 floor_m h_im)`` with
    ``h_im ~ N(0, 1)`` (some examples help this test example, some hurt it). The table of a block
    depends only on ``seed`` and the block index, so it is regenerated instead of stored.
    """

    block = 128

    def __init__(self, num_train: int, num_test: int, batch: int, seed: int):
        self.num_train, self.num_test, self.batch, self.seed = num_train, num_test, batch, seed
        rng = np.random.default_rng([seed, 1])
        self.rate = rng.uniform(0.007, 0.015, num_test)
        self.floor = rng.uniform(0.4, 0.9, num_test)
        self.initial = 2.3 + 0.1 * rng.standard_normal(num_test)

    def blocks(self):
        """The test-example slices of the blocks, in order."""
        for start in range(0, self.num_test, self.block):
            yield slice(start, min(start + self.block, self.num_test))

    def table(self, cols: slice) -> torch.Tensor:
        """float32 ``[N, 2w]`` = ``[A | B]`` for the test examples ``cols`` (a block)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cols.start)
        width = cols.stop - cols.start
        per_example = torch.as_tensor(self.rate[cols] / self.batch, dtype=torch.float32)
        floor = torch.as_tensor(self.floor[cols], dtype=torch.float32)
        gain = torch.exp(0.5 * torch.randn(self.num_train, width, generator=generator) - 0.125)
        spread = torch.randn(self.num_train, width, generator=generator)
        a = -per_example * gain
        b = per_example * floor * (gain + 0.5 * spread)
        return torch.cat([a, b], dim=1)


def epoch_curricula(num_runs: int, num_steps: int, batch: int, num_train: int,
                    rng: np.random.Generator) -> np.ndarray:
    """int32 ``[R, T, B]``: each run walks through random permutations of all examples (epochs)."""
    per_run = num_steps * batch
    epochs = -(-per_run // num_train)
    out = np.empty((num_runs, per_run), dtype=np.int32)
    for r in range(num_runs):
        out[r] = np.concatenate([rng.permutation(num_train) for _ in range(epochs)])[:per_run]
    return out.reshape(num_runs, num_steps, batch)


@dataclass
class LargeLinearRuns:
    """What :func:`large_linear_runs` returns."""

    fitting: RunSet
    held_out: RunSet | None
    truth_mse_per_test: np.ndarray | None
    """float64 ``[M]``: held-out all-steps MSE of the noiseless true model, per test example."""


def large_linear_runs(num_train: int, num_test: int, num_runs: int, num_steps: int, batch: int = 8,
                      held_out: int = 0, noise: float = 0.005, seed: int = 0) -> LargeLinearRuns:
    """``num_runs`` fitting and ``held_out`` held-out runs from :class:`LinearGroundTruth`, float32.

    Curricula by :func:`epoch_curricula`, ``L_0`` the truth's initial loss plus ``N(0, 0.02)`` per
    run. Simulated one block of test examples at a time: memory is the losses ``[R, T + 1, M]``
    plus one block's coefficients; the full ground-truth table is never held.
    """
    from simfluence.simulators.design import BatchDesign

    truth = LinearGroundTruth(num_train, num_test, batch, seed)
    rng = np.random.default_rng([seed, 2])
    total_runs, steps = num_runs + held_out, num_steps
    curricula = epoch_curricula(total_runs, steps, batch, num_train, rng)
    initial = (truth.initial[None, :] + 0.02 * rng.standard_normal((total_runs, num_test))).astype(np.float32)
    design = BatchDesign(curricula.transpose(1, 0, 2).reshape(-1, batch), num_train)  # step-major rows
    # Fitting and held-out runs in separate arrays, so no 1 GB copy is made when splitting them.
    losses = [np.empty((count, steps + 1, num_test), dtype=np.float32) for count in (num_runs, held_out)]
    truth_sse = np.zeros(num_test)
    for cols in truth.blocks():
        width = cols.stop - cols.start
        table = truth.table(cols)
        coefficients = design.matmul(table).view(steps, total_runs, 2 * width)
        generator = torch.Generator().manual_seed(seed * 7_919 + 17 + cols.start)
        trajectory = torch.empty(steps + 1, total_runs, width)
        trajectory[0] = torch.from_numpy(initial[:, cols])
        clean = trajectory[0, num_runs:].clone()
        clean_sse = torch.zeros(width, dtype=torch.float64)
        for t in range(steps):
            alpha = coefficients[t, :, :width] + 1.0
            beta = coefficients[t, :, width:]
            step_noise = torch.randn(total_runs, width, generator=generator).mul_(noise)
            torch.addcmul(beta + step_noise, alpha, trajectory[t], out=trajectory[t + 1])
            if held_out:
                clean = alpha[num_runs:] * clean + beta[num_runs:]
                clean_sse += ((clean - trajectory[t + 1, num_runs:]).double() ** 2).sum(0)
        runs_first = trajectory.permute(1, 0, 2).numpy()
        losses[0][:, :, cols] = runs_first[:num_runs]
        losses[1][:, :, cols] = runs_first[num_runs:]
        truth_sse[cols] = clean_sse.numpy()
        del coefficients, trajectory
    train_ids, test_ids = _ids("train", num_train), _ids("test", num_test)
    fitting = RunSet.create(curricula[:num_runs], losses[0], train_ids, test_ids)
    held = (RunSet.create(curricula[num_runs:], losses[1], train_ids, test_ids,
                          run_ids=[f"held-out-{r:06d}" for r in range(held_out)]) if held_out else None)
    truth_mse = truth_sse / (held_out * steps) if held_out else None
    return LargeLinearRuns(fitting, held, truth_mse)


# --- linear-trajectory ----------------------------------------------------------------
def trajectory_runs(num_train: int = 30, num_test: int = 8, num_runs: int = 24, num_steps: int = 40, batch: int = 4,
                    seed: int = 0, noise: float = 1e-3, momentum: float = 0.9, decay: float = 1.0, rank: int = 2,
                    warmup: int = 5, effects: np.ndarray | None = None,
                    repeat_decay: float = 1.0) -> tuple[RunSet, np.ndarray, np.ndarray]:
    """Runs drawn from a known ``linear-trajectory`` model with an AdamW-like schedule and momentum.

    ``L_t = L_0 + G_t + F_t b`` with ``F`` built independently of the library (a loop over
    steps; each step keeps ``decay ** s_t`` of the features before it, ``s_t`` its rate over the
    largest; an example's count weighs ``repeat_decay ** (its earlier occurrences in the run)``),
    ``b`` ``[N, M]`` of rank ``rank`` (or ``effects``, given), a warm-up then linear-decay
    schedule recorded in the meta as ``learning_rates``. Returns ``(runs, b, rates)``, ``rates``
    float64 ``[T]``.
    """
    rng = np.random.default_rng(seed)
    if effects is None:
        b = rng.normal(0, 1, (num_train, rank)) @ rng.normal(0, 0.02, (rank, num_test)) - 0.01
    else:
        b = np.asarray(effects, dtype=np.float64)
        num_train, num_test = b.shape
    steps = np.arange(1, num_steps + 1)
    rates = np.where(steps <= warmup, (steps - 1) / warmup, (num_steps - steps + 1) / (num_steps - warmup)) * 1e-3
    curricula = rng.integers(0, num_train, (num_runs, num_steps, batch))
    drift = -0.01 * np.arange(num_steps + 1)[:, None] * np.ones(num_test)   # G_t: the same in every run
    losses = np.zeros((num_runs, num_steps + 1, num_test))
    for r in range(num_runs):
        smoothed, features, seen = np.zeros(num_train), np.zeros(num_train), np.zeros(num_train)
        losses[r, 0] = 3.0
        for t in range(num_steps):
            counts = np.bincount(curricula[r, t], minlength=num_train)
            x = counts * repeat_decay ** seen / batch
            seen += counts
            smoothed = momentum * smoothed + (1 - momentum) * x
            features = decay ** (rates[t] / rates.max()) * features + rates[t] / rates.max() * smoothed
            losses[r, t + 1] = 3.0 + drift[t + 1] + features @ b + rng.normal(0, noise, num_test)
    meta = {"task": "synthetic-trajectory", "optimizer": "adamw", "learning_rates": rates.tolist()}
    runs = RunSet.create(curricula, losses, _ids("train", num_train), _ids("test", num_test), meta=meta)
    return runs, b, rates
