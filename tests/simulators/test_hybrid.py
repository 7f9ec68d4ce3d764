"""``hybrid``: linear-identity with ridge towards a scaled gradient prior, against a dense solve."""

from __future__ import annotations

import numpy as np
import pytest
from dense import dense_design

from simfluence.collect import UniformSampler
from simfluence.collect.train import train_runs_vmap
from simfluence.runs import RunSet
from simfluence.simulators import Simulator, make_simulator
from simfluence.simulators.linear import Transitions
from simfluence.tasks import get_task


@pytest.fixture(scope="module")
def setting():
    task = get_task("digits-mlp", num_train=40, num_test=8)
    sampler = UniformSampler(task.default_pool(), task.batch_size)
    curricula = np.stack([sampler.sample(15, seed=r) for r in range(6)])
    runs = RunSet.from_logs(train_runs_vmap(task, curricula), task.train_ids, task.test_ids, task.meta())
    prior = make_simulator("tracin-cp-scaled", task=task, dtype="float64").fit(runs)
    return task, runs, prior


def test_ridge_around_the_prior_matches_a_dense_solve(setting):
    """min |y - F theta|^2 + lambda |theta - theta_0|^2 = theta_0 + (F'F + lambda I)^-1 F'(y - F theta_0)."""
    task, runs, prior = setting
    ridge = 0.3
    hybrid = make_simulator("hybrid", task=task, ridge=ridge, dtype="float64", tol=1e-12).fit(runs)
    transitions = Transitions.of(runs)
    previous, current = transitions.columns(slice(None))
    x = dense_design(transitions.batches, runs.num_train)
    prior_b = prior.coefficients[1]
    a, b = hybrid.coefficients
    for m in range(runs.num_test):
        features = np.hstack([previous[:, m:m + 1] * x, x])
        theta0 = np.concatenate([np.zeros(runs.num_train), prior_b[:, m]])
        target = current[:, m] - previous[:, m]
        gram = features.T @ features + ridge * np.eye(features.shape[1])
        theta = theta0 + np.linalg.solve(gram, features.T @ (target - features @ theta0))
        np.testing.assert_allclose(np.concatenate([a[:, m], b[:, m]]), theta, rtol=1e-5, atol=1e-8)
    assert hybrid.fit_info["prior"] == "tracin-cp" and hybrid.fit_info["prior_scale"] == pytest.approx(prior.scale)


def test_a_strong_ridge_gives_the_prior_and_a_weak_one_linear_identity(setting):
    task, runs, prior = setting
    strong = make_simulator("hybrid", task=task, ridge=1e9, dtype="float64").fit(runs)
    np.testing.assert_allclose(strong.coefficients[1], prior.coefficients[1], rtol=1e-4, atol=1e-9)
    assert np.abs(strong.coefficients[0]).max() < 1e-6
    weak = make_simulator("hybrid", task=task, ridge=1e-6, dtype="float64", tol=1e-12).fit(runs)
    plain = make_simulator("linear-identity", ridge=1e-6, dtype="float64", tol=1e-12).fit(runs)
    # Barely penalised, the prior hardly matters where the runs determine the coefficients.
    np.testing.assert_allclose(weak.simulate(runs.curricula, runs.initial_losses),
                               plain.simulate(runs.curricula, runs.initial_losses), rtol=1e-3, atol=1e-4)


def test_saves_without_the_task_and_refits_cleanly(setting, tmp_path):
    task, runs, _ = setting
    hybrid = make_simulator("hybrid", task=task, ridge=0.3).fit(runs)
    assert hybrid.prior_b is None   # the prior is folded into the table, not kept beside it
    loaded = Simulator.load(hybrid.save(tmp_path / "h.npz"))
    np.testing.assert_array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                                  hybrid.simulate(runs.curricula, runs.initial_losses))
    assert loaded.config.prior == "tracin-cp" and loaded.config.task == "digits-mlp"
