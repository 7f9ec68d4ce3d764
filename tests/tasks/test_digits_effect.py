"""digits-mlp is a useful benchmark: fine-tuning moves the test losses, and the curriculum matters.

The acceptance check of the task design: a Simfluence-Linear fit on 40 runs predicts 10
held-out runs' loss trajectories at least twice as well (all-steps MSE) as the mean
trajectory of the fitting runs. The fit here is a small, self-contained least-squares
reference (identity-centred Linear, one ridge problem per test example), so this test
checks the *data*, independently of the simulators package.
"""

import numpy as np
import pytest
import torch
from scipy import sparse

from simfluence.collect import collect

NUM_FIT, NUM_HELDOUT, STEPS = 40, 10, 100


def fit_linear(curricula, losses, num_train, ridge=1.0):
    """``L_t - L_{t-1} = sum_{i in c_t} (A_i L_{t-1} + B_i)`` per test example.

    curricula int [R, T, B]; losses [R, T+1, M]. Returns A, B float64 [N, M].
    """
    runs, steps, width = curricula.shape
    num_test = losses.shape[-1]
    batches = curricula.reshape(-1, width).astype(np.int64)
    previous = losses[:, :-1].reshape(-1, num_test).astype(np.float64)
    change = losses[:, 1:].reshape(-1, num_test) - previous
    transitions = batches.shape[0]
    # Batch-count design X [S, N] and, for the Gram blocks X^T diag(w) X of all test
    # examples at once, a pair matrix P [N*N, S] with P @ w = vec(X^T diag(w) X).
    rows, cols = np.repeat(np.arange(transitions), width), batches.ravel()
    keep = cols >= 0
    design = sparse.csr_matrix((np.ones(keep.sum()), (rows[keep], cols[keep])), shape=(transitions, num_train))
    left, right = np.repeat(batches, width, axis=1).ravel(), np.tile(batches, (1, width)).ravel()
    step_of = np.repeat(np.arange(transitions), width * width)
    keep = (left >= 0) & (right >= 0)
    pairs = sparse.csr_matrix((np.ones(keep.sum()), (left[keep] * num_train + right[keep], step_of[keep])),
                              shape=(num_train * num_train, transitions))

    def gram(weights):  # [S, M] -> [M, N, N]
        return np.asarray(pairs @ weights).T.reshape(-1, num_train, num_train)

    g_aa, g_ab = gram(previous ** 2), gram(previous)
    g_bb = np.broadcast_to(gram(np.ones((transitions, 1))), g_aa.shape)
    system = np.block([[g_aa, g_ab], [np.swapaxes(g_ab, 1, 2), g_bb]]) + ridge * np.eye(2 * num_train)
    rhs = np.concatenate([design.T @ (previous * change), design.T @ change]).T[..., None]
    # torch's batched Cholesky: NumPy's batched solve is ~10x slower here.
    factor = torch.linalg.cholesky(torch.from_numpy(system))
    solution = torch.cholesky_solve(torch.from_numpy(rhs), factor)[..., 0].numpy().T  # [2N, M]
    return solution[:num_train], solution[num_train:]


def roll_out(curricula, initial, a, b):
    """Predicted losses [R, T+1, M] from L_0 [R, M]."""
    runs, steps, width = curricula.shape
    current, path = initial.astype(np.float64), [initial.astype(np.float64)]
    for step in range(steps):
        counts = np.zeros((runs, a.shape[0]))
        for slot in range(width):
            index = curricula[:, step, slot]
            np.add.at(counts, (np.flatnonzero(index >= 0), index[index >= 0]), 1.0)
        current = current + current * (counts @ a) + counts @ b
        path.append(current)
    return np.stack(path, axis=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "store"
    return collect("digits-mlp", root, NUM_FIT + NUM_HELDOUT, STEPS, seed=0, threads=1, progress=False).load()


def test_fine_tuning_moves_the_losses_and_curricula_differ(runs):
    initial, final = runs.losses[:, 0], runs.losses[:, -1]
    assert final.mean() < 0.6 * initial.mean()
    # Per test example, the final loss varies across curricula by a visible fraction of its mean.
    assert final.std(axis=0).mean() > 0.15 * final.mean()


def test_linear_beats_the_mean_trajectory_twice_over(runs):
    fit, heldout = runs.select(np.arange(NUM_FIT)), runs.select(np.arange(NUM_FIT, NUM_FIT + NUM_HELDOUT))
    a, b = fit_linear(fit.curricula, fit.losses, runs.num_train)
    predicted = roll_out(heldout.curricula, heldout.losses[:, 0], a, b)
    linear_mse = ((predicted[:, 1:] - heldout.losses[:, 1:]) ** 2).mean()
    mean_mse = ((fit.losses.mean(axis=0)[None, 1:] - heldout.losses[:, 1:]) ** 2).mean()
    assert mean_mse > 2 * linear_mse, (mean_mse, linear_mse)
