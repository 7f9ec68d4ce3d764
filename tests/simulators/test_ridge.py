import numpy as np
import pytest
import torch

from dense import dense_design, dense_transition_ridge
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.ridge import solve_transition_ridge


def problem(seed, steps=200, num_train=30, batch=4, num_test=5):
    rng = np.random.default_rng(seed)
    batches = rng.integers(0, num_train, (steps, batch))
    batches[rng.random(steps) < 0.1, -1] = -1  # some smaller batches
    batches[0, 1] = batches[0, 0]  # a duplicate within one batch counts twice
    previous = rng.uniform(0.2, 3.0, (steps, num_test))
    target = rng.normal(size=(steps, num_test))
    return batches, num_train, previous, target


def test_design_products_match_dense():
    batches, num_train, previous, _ = problem(0)
    design = BatchDesign(batches, num_train)
    x = dense_design(batches, num_train)
    assert x[0, batches[0, 0]] >= 2
    table = torch.tensor(np.random.default_rng(1).normal(size=(num_train, 3)))
    assert np.allclose(design.matmul(table).numpy(), x @ table.numpy())
    values = torch.tensor(previous[:, :3])
    assert np.allclose(design.rmatmul(values).numpy(), x.T @ previous[:, :3])
    assert np.allclose(design.rmatmul(values, squared=True).numpy(), (x * x).T @ previous[:, :3])
    assert np.allclose(design.occurrences.numpy(), x.sum(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fit_alpha", [True, False])
@pytest.mark.parametrize("ridge", [1e-2, 1.0, 30.0])
def test_fast_solver_matches_dense_float64_reference(seed, fit_alpha, ridge):
    batches, num_train, previous, target = problem(seed)
    a_ref, b_ref = dense_transition_ridge(batches, num_train, previous, target, ridge, fit_alpha)
    solution = solve_transition_ridge(BatchDesign(batches, num_train), torch.tensor(previous), torch.tensor(target),
                                      ridge, fit_alpha, tol=1e-12, max_iter=5000)
    reference = np.hstack([a_ref, b_ref]) if fit_alpha else b_ref
    fast = torch.cat([solution.a, solution.b], 1).numpy() if fit_alpha else solution.b.numpy()
    assert np.linalg.norm(fast - reference) / np.linalg.norm(reference) < 1e-6


def test_float32_agrees_with_float64_and_warm_start_converges_fast():
    batches, num_train, previous, target = problem(3)
    design = BatchDesign(batches, num_train)
    exact = solve_transition_ridge(design, torch.tensor(previous), torch.tensor(target), 0.5, tol=1e-12)
    single = solve_transition_ridge(design, torch.tensor(previous, dtype=torch.float32),
                                    torch.tensor(target, dtype=torch.float32), 0.5, tol=1e-5)
    assert single.b.dtype == torch.float32
    rel = (single.b.double() - exact.b).norm() / exact.b.norm()
    assert rel < 1e-4
    warm = solve_transition_ridge(design, torch.tensor(previous), torch.tensor(target), 0.5, tol=1e-12,
                                  initial=torch.cat([exact.a, exact.b], 1))
    assert warm.iterations <= 1


def test_solver_rejects_non_positive_ridge():
    batches, num_train, previous, target = problem(0)
    with pytest.raises(ValueError, match="ridge"):
        solve_transition_ridge(BatchDesign(batches, num_train), torch.tensor(previous), torch.tensor(target), 0.0)
