"""simulate_expected: the closed forms against the exact average over every curriculum of a tiny pool."""

import numpy as np
import pytest
from dense import every_curriculum, exact_average
from synthetic import linear_runs, trajectory_runs

from simfluence.runs.log import RunDataError
from simfluence.simulators import Simulator, capabilities, make_simulator, simulator_class, simulator_kinds
from simfluence.simulators.base import EXPECTED_ESTIMATORS

POOLS = np.zeros((2, 10), dtype=bool)
POOLS[0, [1, 4, 7]] = True
POOLS[1, [0, 2]] = True


@pytest.fixture(scope="module")
def runs():
    return linear_runs(num_train=10, num_test=3, num_runs=8, num_steps=12, batch=2, seed=0)[0]


LOSS = {"space": "loss"}   # the closed form is the loss-space recurrence's (a cross-validated space may differ)


@pytest.mark.parametrize("kind,settings,batch", [
    ("linear", LOSS, 2), ("linear-identity", LOSS, 2), ("additive", LOSS, 2), ("linear-bootstrap", {"replicas": 4}, 2),
    ("linear-identity", {**LOSS, "batch_mean": True}, 1),   # one slot of a batch-mean fit weighs the fitted size
    ("linear-identity", {"ridge": 1e-3}, 2),             # unblended; a given ridge keeps space "auto" in loss space
])
def test_table_kinds_equal_the_exact_average(runs, kind, settings, batch):
    simulator = make_simulator(kind, **settings).fit(runs)
    initial = runs.initial_losses[0]
    expected = simulator.simulate_expected(POOLS, 3, initial, batch_size=batch)
    assert expected.shape == (2, 4, 3) and expected.dtype == np.float32
    for p, pool in enumerate(POOLS):
        np.testing.assert_allclose(expected[p], exact_average(simulator, pool, 3, batch, initial), rtol=2e-5)
    # One pool in, one trajectory out; the default batch size is the fitting runs'.
    np.testing.assert_allclose(simulator.simulate_expected(POOLS[0], 3, initial), expected[0] if batch == 2
                               else simulator.simulate_expected(POOLS, 3, initial, batch_size=2)[0])


def test_trajectory_kind_is_exact_in_loss_space_and_close_in_margin_space():
    runs = trajectory_runs(num_train=10, num_test=4, num_runs=12, num_steps=20, batch=2, seed=3)[0]
    initial = runs.initial_losses[0]
    for space, tolerance, repeat in (("loss", 1e-9, 1.0), ("loss", 1e-9, 0.5), ("margin", 2e-2, 1.0)):
        simulator = make_simulator("linear-trajectory", space=space, momentum=0.9, decay=0.9,
                                   repeat_decay=repeat).fit(runs)
        expected = simulator.simulate_expected(POOLS, 3, initial, batch_size=2)
        for p, pool in enumerate(POOLS):
            exact = exact_average(simulator, pool, 3, 2, initial)
            np.testing.assert_allclose(expected[p], exact, rtol=tolerance + 2e-6)


def test_kinds_without_a_closed_form_average_sampled_curricula(runs):
    simulator = make_simulator("linear-pairwise", ridge=1e-2, pair_ridge=1e-2).fit(runs)
    assert not capabilities("linear-pairwise").expected_rollout
    initial = runs.initial_losses[0]
    draws = 3000
    sampled = simulator.simulate_expected(POOLS[:1], 3, initial, batch_size=2, draws=draws, seed=4)[0]
    again = simulator.simulate_expected(POOLS[:1], 3, initial, batch_size=2, draws=draws, seed=4)[0]
    np.testing.assert_array_equal(sampled, again)                 # seeded
    curricula = every_curriculum(np.flatnonzero(POOLS[0]), 3, 2)
    trajectories = simulator.simulate(curricula, np.repeat(initial[None], len(curricula), 0)).astype(np.float64)
    spread = trajectories.std(axis=0) / np.sqrt(draws)
    assert (np.abs(sampled - trajectories.mean(axis=0)) <= 5 * spread + 5e-5).all()   # float32 sums


def test_every_kind_declaring_a_closed_form_has_one(runs):
    for kind in simulator_kinds():
        if capabilities(kind).expected_rollout:
            assert simulator_class(kind)._expected is not Simulator._expected, kind
    for kind, estimator in (("linear-identity", "closed form"), ("linear-pairwise", "sampled")):
        fitted = make_simulator(kind, **({"space": "loss"} if kind == "linear-identity" else {})).fit(runs)
        assert fitted.expected_estimator == estimator and estimator in EXPECTED_ESTIMATORS


@pytest.mark.parametrize("pools,steps,initial,field", [
    (POOLS.astype(int), 3, None, "pools"),
    (np.zeros((1, 10), dtype=bool), 3, None, "pools"),
    (np.ones((1, 9), dtype=bool), 3, None, "pools"),
    (POOLS, 0, None, "num_steps"),
    (POOLS, 3, np.ones(2), "initial_losses"),
    (POOLS, 3, np.full(3, np.nan), "initial_losses"),
])
def test_bad_input_names_the_field(runs, pools, steps, initial, field):
    simulator = make_simulator("linear-identity").fit(runs)
    with pytest.raises(RunDataError, match=field):
        simulator.simulate_expected(pools, steps, runs.initial_losses[0] if initial is None else initial)


def test_auto_and_the_baselines_have_closed_forms(runs):
    initial = runs.initial_losses[0]
    auto = make_simulator("auto", candidates=("linear-identity", "mean-trajectory")).fit(runs)
    assert auto.expected_in_closed_form
    np.testing.assert_allclose(auto.simulate_expected(POOLS, 3, initial),
                               auto.model_.simulate_expected(POOLS, 3, initial))
    for kind in ("mean-trajectory", "constant"):        # whatever the pool: the curriculum does not matter
        baseline = make_simulator(kind).fit(runs)
        curriculum = np.zeros((1, 3, 2), dtype=int)
        np.testing.assert_allclose(baseline.simulate_expected(POOLS, 3, initial),
                                   np.repeat(baseline.simulate(curriculum, initial[None]), 2, axis=0))


def test_where_the_clip_at_zero_binds_the_test_example_is_sampled_instead(runs):
    simulator = make_simulator("additive", ridge=1e-3).fit(runs)
    initial = runs.initial_losses[0].astype(np.float64)
    initial[1] = 0.01                     # the expected loss of test example 1 goes below 0; the clip binds
    closed = simulator.simulate_expected(POOLS, 3, initial, batch_size=2)
    sampled = simulator._sampled_expected(POOLS, 3, 2, np.repeat(initial[None], 2, 0), 16, 0, "<test>")
    np.testing.assert_array_equal(closed[:, :, 1], sampled[:, :, 1])
    for p, pool in enumerate(POOLS):      # the others stay exact
        exact = exact_average(simulator, pool, 3, 2, initial)
        np.testing.assert_allclose(closed[p][:, [0, 2]], exact[:, [0, 2]], rtol=2e-5)
    assert (closed >= 0).all()


def test_only_the_pools_where_the_clip_binds_are_sampled(runs):
    simulator = make_simulator("additive", ridge=1e-3).fit(runs)
    initial = np.repeat(runs.initial_losses[:1].astype(np.float64), 2, axis=0)    # one row per pool
    initial[0, 1] = 0.01                  # pool 0's expected loss of test example 1 dips below 0; pool 1's does not
    closed = simulator.simulate_expected(POOLS, 3, initial, batch_size=2)
    sampled = simulator._sampled_expected(POOLS, 3, 2, initial, 16, 0, "<test>")
    np.testing.assert_array_equal(closed[0, :, 1], sampled[0, :, 1])
    exact = exact_average(simulator, POOLS[1], 3, 2, initial[1])
    assert exact[:, 1].min() > 0
    np.testing.assert_allclose(closed[1], exact, rtol=2e-5)        # pool 1 keeps its closed form everywhere


def test_extrapolation_warns_once_and_bad_draws_are_refused(runs):
    import warnings

    from simfluence.simulators.base import ExtrapolationWarning

    simulator = make_simulator("linear-pairwise", ridge=1e-2, pair_ridge=1e-2).fit(runs)   # the sampled path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simulator.simulate_expected(POOLS, 20, runs.initial_losses[0], draws=4)       # 20 steps > the fitted 12
    assert [str(w.message).count("20 steps") for w in caught if w.category is ExtrapolationWarning] == [1]
    with pytest.raises(RunDataError, match="draws"):
        simulator.simulate_expected(POOLS, 3, runs.initial_losses[0], draws=0)
