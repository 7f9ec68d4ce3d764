"""Curriculum search: the known optimum of an additive simulator, and beating random curricula."""

import numpy as np
import pytest

from simfluence.query import epoch_curricula, optimize, simulate_curricula


def test_optimize_finds_known_optimum_of_additive_simulator(fitted, runs):
    simulator = fitted["additive"]
    _, b = simulator.coefficients
    targets = np.array([0, 3])
    initial = runs.initial_losses[0]
    result = optimize(simulator, initial, targets, budget=4, num_steps=10, batch_size=2, beam_width=2,
                      num_random=50)
    # T * B = 20 slots, 5 each for K = 4 examples: L_T = L_0 + 5 sum_{i in S} B_i, minimised by
    # the 4 examples with the most negative mean B over the targets, in any order.
    best = np.argsort(b[:, targets].mean(axis=1))[:4]
    assert set(result.order.tolist()) == set(best.tolist())
    expected = initial[targets].mean() + 5 * b[best][:, targets].sum(axis=0).mean()
    assert result.objective == pytest.approx(expected, abs=1e-6)
    assert result.objective < result.random_best
    assert result.random_curricula.shape == (50, 10, 2)
    np.testing.assert_array_equal(result.curriculum, epoch_curricula(result.order[None], 10, 2)[0])


def test_optimize_linear_beats_random_and_matches_simulate(fitted, runs):
    simulator = fitted["linear-identity"]
    initial = runs.initial_losses[0]
    result = optimize(simulator, initial, [1, 2], budget=6, num_steps=12, batch_size=3, num_random=100, seed=1)
    simulated = simulator.simulate(result.curriculum, initial)[-1, [1, 2]].mean()
    assert result.objective == pytest.approx(simulated, abs=1e-6)
    assert result.objective < result.random_best < result.random_median
    assert result.history[-1] == result.objective
    randoms = simulate_curricula(simulator, result.random_curricula, initial, [1, 2])[:, -1].mean(axis=1)
    np.testing.assert_allclose(result.random_objectives, randoms, atol=1e-6)
    with pytest.raises(ValueError, match="budget: 40 distinct examples do not fit"):
        optimize(simulator, initial, [1], budget=40, num_steps=12, batch_size=3)
