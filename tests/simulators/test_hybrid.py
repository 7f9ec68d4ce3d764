"""``hybrid``: the ridge towards the prior against a dense solve, the prior's mixture against its formula."""

from __future__ import annotations

import numpy as np
import pytest
from dense import dense_design, every_curriculum, exact_average
from small_tasks import digits_runs

from simfluence.collect import UniformSampler
from simfluence.errors import UsageError
from simfluence.simulators import Simulator, make_simulator
from simfluence.simulators.hybrid import WEIGHTS, choose_prior_weight
from simfluence.simulators.linear import Transitions


@pytest.fixture(scope="module")
def setting():
    task, runs = digits_runs(num_runs=6, num_steps=15, num_test=8)
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
    weak = make_simulator("hybrid", task=task, ridge=1e-6, dtype="float64", tol=1e-12, prior_weight=0).fit(runs)
    plain = make_simulator("linear-identity", ridge=1e-6, dtype="float64", tol=1e-12).fit(runs)
    # Barely penalised, the prior hardly matters where the runs determine the coefficients.
    np.testing.assert_allclose(weak.simulate(runs.curricula, runs.initial_losses),
                               plain.simulate(runs.curricula, runs.initial_losses), rtol=1e-3, atol=1e-4)


def test_saves_without_the_task_and_refits_cleanly(setting, tmp_path):
    task, runs, _ = setting
    hybrid = make_simulator("hybrid", task=task, ridge=0.3, prior_weight=0.4).fit(runs)
    assert hybrid.prior_b is None   # the prior is folded into the table, not kept beside it
    loaded = Simulator.load(hybrid.save(tmp_path / "h.npz"))
    np.testing.assert_array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                                  hybrid.simulate(runs.curricula, runs.initial_losses))
    assert loaded.config.prior == "tracin-cp" and loaded.config.task == "digits-mlp"
    assert loaded.prior_weight_ == 0.4
    np.testing.assert_array_equal(loaded.prior_deviation_, hybrid.prior_deviation_)


def test_the_prior_mixture_follows_its_formula_from_public_parts(setting):
    """(1 - w) P + w (P_bar + r D): P the ridge fit alone, D the centred prior's additive rollout in numpy."""
    task, runs, prior = setting
    weight = 0.5
    mixed = make_simulator("hybrid", task=task, ridge=0.3, dtype="float64", prior_weight=weight).fit(runs)
    alone = make_simulator("hybrid", task=task, ridge=0.3, dtype="float64", prior_weight=0).fit(runs)
    np.testing.assert_array_equal(mixed.coefficients[1], alone.coefficients[1])
    seen = np.zeros(runs.num_train, dtype=bool)
    seen[runs.curricula[runs.curricula >= 0]] = True
    centred = prior.coefficients[1] - prior.coefficients[1][seen].mean(axis=0)

    def parts(curricula, initial):
        fit = alone.simulate(curricula, initial).astype(np.float64)
        expected = alone.simulate_expected(seen, curricula.shape[1], initial[0]).astype(np.float64)
        x = np.stack([dense_design(run, runs.num_train) for run in curricula])        # [R, T, N]
        deviation = np.concatenate([np.zeros((len(curricula), 1, runs.num_test)),
                                    np.cumsum(x @ centred, axis=1)], axis=1)
        return fit, expected, deviation

    fit, expected, deviation = parts(runs.curricula, runs.initial_losses)
    ratio = np.sqrt(((fit - expected) ** 2).sum(axis=(0, 1)) / (deviation ** 2).sum(axis=(0, 1)))
    sampler = UniformSampler(task.default_pool(), task.batch_size)
    fresh = np.stack([sampler.sample(11, seed=100 + r) for r in range(3)])
    initial = np.repeat(runs.initial_losses[:1], 3, axis=0)
    fit, expected, deviation = parts(fresh, initial)
    reference = (1 - weight) * fit + weight * (expected + ratio * deviation)
    np.testing.assert_allclose(mixed.simulate(fresh, initial), reference, rtol=1e-4, atol=1e-6)
    # A column subset rolls out the same numbers.
    columns = np.array([5, 1])
    np.testing.assert_allclose(mixed.column_rollout(columns)(fresh, initial), reference[:, :, columns],
                               rtol=1e-4, atol=1e-6)


def test_the_expected_trajectory_is_the_exact_average_over_every_curriculum(setting):
    task, runs, _ = setting
    hybrid = make_simulator("hybrid", task=task, ridge=0.3, dtype="float64", prior_weight=0.6).fit(runs)
    pools = np.zeros((2, runs.num_train), dtype=bool)
    pools[0, [1, 4, 7]] = True
    pools[1, [0, 2]] = True
    initial = runs.initial_losses[0]
    expected = hybrid.simulate_expected(pools, 3, initial, batch_size=2)
    for p, pool in enumerate(pools):
        # Where the clip at 0 binds on some curriculum the average of clipped rollouts is another number.
        unclipped = hybrid.simulate(every_curriculum(np.flatnonzero(pool), 3, 2),
                                    np.repeat(initial[None], 3 ** 6 if p == 0 else 2 ** 6, 0)).min(axis=(0, 1)) > 0
        assert unclipped.sum() >= runs.num_test - 2
        np.testing.assert_allclose(expected[p][:, unclipped], exact_average(hybrid, pool, 3, 2, initial)[:, unclipped],
                                   rtol=1e-4, atol=1e-6)


def test_the_weight_is_cross_validated_from_the_fitting_runs(setting):
    task, runs, _ = setting
    hybrid = make_simulator("hybrid", task=task, ridge=0.3).fit(runs)
    table = hybrid.fit_info["prior_weight_cv"]
    assert list(table) == [f"{w:g}" for w in WEIGHTS] and hybrid.prior_weight_ in WEIGHTS
    # The chosen weight is within one standard error of the ridge fit's on both errors, and no weight
    # that is ranks the held-out folds better.
    def allowed(row):
        return all(row[key] - table["0"][key] <= row[f"{key}_excess_se"] for key in ("mse", "final_mse"))

    chosen = table[f"{hybrid.prior_weight_:g}"]
    assert allowed(chosen)
    assert all(row["across_run_spearman"] <= chosen["across_run_spearman"] for row in table.values() if allowed(row))
    # Too few runs for folds of 3 held-out runs: the ridge fit alone.
    few = make_simulator("hybrid", task=task, ridge=0.3).fit(runs.select([0, 1, 2, 3, 4]))
    assert few.prior_weight_ == 0 and "prior_weight_cv" not in few.fit_info


def test_the_weight_rule_keeps_the_errors_within_one_standard_error_and_prefers_the_ranking():
    weights = (0.0, 0.5, 1.0)

    def folds(*excess):
        """[3 folds, 3 weights, 1 error]: the ridge fit's error 1 in every fold, each weight's excess per fold."""
        return np.array([[[1.0], [1.0 + e1], [1.0 + e2]] for e1, e2 in excess])

    spread = folds((0.1, 0.3), (-0.1, 0.3), (0.0, 0.3))           # weight 0.5: mean 0 +- 0.058; 1.0: 0.3 +- 0
    assert choose_prior_weight(weights, spread, [0.3, 0.5, 0.9]) == 1   # 1.0 ranks best but errs beyond the noise
    slightly = folds((0.05, 0.3), (0.15, 0.3), (0.1, 0.3))        # weight 0.5: mean 0.1 +- 0.029: worse
    assert choose_prior_weight(weights, slightly, [0.3, 0.5, 0.9]) == 0
    noisy = folds((0.3, -0.2), (-0.1, -0.2), (0.1, -0.2))         # weight 0.5: mean 0.1 +- 0.115: within the noise
    assert choose_prior_weight(weights, noisy, [0.3, 0.5, 0.4]) == 1
    assert choose_prior_weight(weights, noisy, [0.5, 0.5, 0.5]) == 0     # ties: the smaller weight
    assert choose_prior_weight(weights, noisy, [np.nan, np.nan, 0.1]) == 2
    # Several errors: each must pass.
    two = np.concatenate([spread, folds((0.2, -0.1), (0.3, -0.1), (0.25, -0.1))], axis=2)
    assert choose_prior_weight(weights, two, [0.3, 0.9, 0.5]) == 0
    with pytest.raises(ValueError):
        choose_prior_weight((0.5, 1.0), spread[:, :2], [0.1, 0.2])


@pytest.mark.parametrize("weight", [-0.1, 1.5, "half", True])
def test_a_bad_weight_is_refused_with_one_line(weight):
    with pytest.raises(UsageError, match="prior_weight"):
        make_simulator("hybrid", task="digits-mlp", prior_weight=weight)
