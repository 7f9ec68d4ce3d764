"""The Linear family's loss spaces (``space``): the recurrence on z = log L or log(e^L - 1), scored in loss units."""


import numpy as np
import pytest
from dense import exact_average, python_rollout, with_array, without_array

from simfluence import RunDataError
from simfluence.errors import UsageError
from simfluence.func.spaces import SPACES, from_space, from_space_slope, inverse, loss_bounds, to_space
from simfluence.runs.log import RunSet
from simfluence.runs.synthetic import linear_trajectories
from simfluence.simulators import Simulator, make_simulator

KINDS = ("linear", "linear-identity", "additive")


def space_runs(space, num_runs=30, seed=0, noise=1e-4, num_train=24, num_test=5, num_steps=30, batch=4):
    """Runs of an identity-centred Simfluence-Linear recurrence on z in ``space``, recorded as losses.

    z starts near 1 and drifts down past 0, so softplus / exp bend the losses well away from a line.
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 0.004, (num_train, num_test))
    b = rng.normal(-0.02, 0.02, (num_train, num_test))
    curricula = rng.integers(0, num_train, (num_runs, num_steps, batch))
    z = linear_trajectories(a, b, curricula, rng.normal(1.0, 0.3, num_test), rng, noise)
    losses = inverse(z, space)
    runs = RunSet.create(curricula, losses, [f"train-{i}" for i in range(num_train)],
                         [f"test-{m}" for m in range(num_test)], meta={"task": "synthetic-linear"})
    return runs, a, b


def heldout_mse(simulator, heldout):
    predicted = simulator.simulate(heldout.curricula, heldout.initial_losses)
    return float(np.mean((predicted[:, 1:] - heldout.losses[:, 1:]) ** 2))


@pytest.mark.parametrize("space", ["margin", "log"])
def test_auto_finds_the_space_the_runs_were_generated_in_and_predicts_far_better(space):
    runs, _, b = space_runs(space)
    fitting, heldout = runs.select(np.arange(24)), runs.select(np.arange(24, 30))
    auto = make_simulator("linear-identity").fit(fitting)
    plain = make_simulator("linear-identity", space="loss").fit(fitting)
    assert auto.space_ == space and auto.fit_info["space"] == space
    scores = auto.fit_info["cv_space_scores"]
    assert set(scores) == {"loss", "log", "margin"} and min(scores, key=scores.get) == space
    assert plain.space_ == "loss" and plain.fit_info["cv_space_scores"] == {"loss": pytest.approx(scores["loss"])}
    assert heldout_mse(auto, heldout) < 0.2 * heldout_mse(plain, heldout)
    _, fitted_b = auto.coefficients     # in z units: the generating model
    assert np.corrcoef(fitted_b.ravel(), b.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("space", ["margin", "log"])
def test_rollout_in_a_space_is_the_recurrence_on_z_mapped_back_and_blended(kind, space):
    runs, _, _ = space_runs(space, num_runs=16, seed=1, noise=0.02)
    fitting, heldout = runs.select(np.arange(12)), runs.select(np.arange(12, 16))
    simulator = make_simulator(kind, space=space, dtype="float64").fit(fitting)
    a, b = simulator.coefficients
    curricula = heldout.curricula.copy()
    curricula[0, 3, 1:] = -1   # a ragged step: batch-mean weights
    initial = heldout.initial_losses.astype(np.float64)
    z = python_rollout(a, b, curricula, to_space(initial, space), simulator.alpha_offset, runs.batch_size)
    rolled = from_space(z, space, *loss_bounds(fitting.losses))
    mean = initial[:, None, :] + simulator.mean_change[None]
    expected = mean + simulator.blend_ * (rolled - mean)
    np.testing.assert_allclose(simulator.simulate(curricula, initial), expected, rtol=1e-5, atol=1e-5)
    columns = np.array([3, 0])
    np.testing.assert_allclose(simulator.column_rollout(columns)(curricula, initial), expected[:, :, columns],
                               rtol=1e-5, atol=1e-5)
    assert simulator.expected_estimator == "control variate" and not simulator.expected_in_closed_form
    pools = np.zeros((1, runs.num_train), dtype=bool)
    pools[0, :6] = True
    sampled = simulator.simulate_expected(pools, 5, initial[0], draws=4, seed=2)
    assert sampled.shape == (1, 6, runs.num_test) and np.isfinite(sampled).all()


TABLE = {"dtype": "float64"}
TRAJECTORY = {"momentum": 0.5, "decay": 0.9}


@pytest.mark.parametrize("kind,space,settings", [
    ("linear-identity", "margin", TABLE), ("linear", "log", TABLE), ("additive", "margin", TABLE),
    ("linear-trajectory", "margin", TRAJECTORY), ("linear-trajectory", "log", {**TRAJECTORY, "repeat_decay": 0.5}),
])
def test_expected_losses_in_a_space_are_unbiased_and_far_less_noisy_than_the_plain_mean(kind, space, settings):
    # E[f(z)] (f = softplus / exp) by the control variate around the closed-form E[z], against the
    # exact average over every curriculum of a 3-example pool, and against the plain mean of the
    # same sampled curricula (the base class's estimator).
    runs, _, _ = space_runs(space, num_runs=16, seed=1, noise=0.02)
    simulator = make_simulator(kind, space=space, **settings).fit(runs)
    assert simulator.expected_estimator == "control variate"
    pool = np.zeros(runs.num_train, dtype=bool)
    pool[[2, 9, 17]] = True
    initial = runs.initial_losses[0].astype(np.float64)
    exact = exact_average(simulator, pool, 4, 2, initial)                              # [T + 1, M]
    seeds = range(24)
    control = np.stack([simulator.simulate_expected(pool, 4, initial, batch_size=2, draws=6, seed=seed)
                        for seed in seeds]).astype(np.float64)
    plain = np.stack([Simulator._sampled_expected(simulator, pool[None], 4, 2, initial[None], 6, seed, "<test>")[0]
                      for seed in seeds]).astype(np.float64)
    np.testing.assert_allclose(control[:, 0], np.broadcast_to(initial, control[:, 0].shape), rtol=1e-6)
    control_error = np.sqrt(np.mean((control - exact) ** 2))
    plain_error = np.sqrt(np.mean((plain - exact) ** 2))
    assert plain_error > 1e-3                        # the draws do spread: there is noise to remove
    assert control_error < 0.2 * plain_error
    if kind == "linear-trajectory":   # its closed form is the loss at E[z]: biased, the control variate is not
        at_mean = simulator._expected(pool[None] / pool.sum(), 4, 2, initial[None])[0]
        assert control_error < 0.7 * np.sqrt(np.mean((at_mean - exact) ** 2))
    # Unbiased: over the seeds the estimates centre on the exact average.
    spread = control.std(axis=0, ddof=1) / np.sqrt(len(seeds))
    assert (np.abs(control.mean(axis=0) - exact) <= 4 * spread + 1e-6).all()


def test_save_load_keeps_the_space_and_older_files_load_in_loss_space(tmp_path):
    runs, _, _ = space_runs("margin", num_runs=16, seed=3)
    simulator = make_simulator("linear-identity").fit(runs)
    assert simulator.space_ == "margin"
    path = simulator.save(tmp_path / "model.npz")
    loaded = Simulator.load(path)
    assert (loaded.space_, loaded.floor_, loaded.ceiling_) == (simulator.space_, simulator.floor_, simulator.ceiling_)
    assert np.array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                          simulator.simulate(runs.curricula, runs.initial_losses))
    old = Simulator.load(without_array(path, tmp_path / "old.npz", "state.space"))   # saved before the spaces
    assert old.space_ == "loss"
    a, b = old.coefficients
    initial = runs.initial_losses.astype(np.float64)
    rolled = python_rollout(a, b, runs.curricula, initial, 1.0, runs.batch_size)
    mean = initial[:, None, :] + old.mean_change[None]
    np.testing.assert_allclose(old._simulate(runs.curricula, initial), mean + old.blend_ * (rolled - mean),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", [np.array([7.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0]), np.array([1.0, 0.0])])
def test_load_rejects_a_broken_space(tmp_path, value):
    runs, _, _ = space_runs("margin", num_runs=8, seed=4)
    path = make_simulator("linear-identity", space="margin", ridge=1.0).fit(runs).save(tmp_path / "model.npz")
    with_array(path, tmp_path / "broken.npz", "state.space", value)
    with pytest.raises(Exception, match="space"):
        Simulator.load(tmp_path / "broken.npz")


def test_spaces_need_positive_losses_and_a_known_name():
    runs, _, _ = space_runs("loss", num_runs=8, seed=5)     # z drifts below 0: some losses are negative
    assert (runs.losses <= 0).any()
    with pytest.raises(RunDataError, match="losses.*space='log'.*> 0"):
        make_simulator("linear-identity", space="log").fit(runs)
    auto = make_simulator("linear-identity").fit(runs)   # auto: loss space only
    assert auto.space_ == "loss" and auto.fit_info["cv_space_scores"].keys() == {"loss"}
    with pytest.raises(UsageError, match="space"):
        make_simulator("linear", space="probit")
    margin = make_simulator("linear-identity", space="margin").fit(space_runs("margin", num_runs=8)[0])
    initial = np.ones((1, margin.test_ids.size))
    initial[0, 2] = 0.0
    with pytest.raises(RunDataError, match="initial_losses.*'margin' space"):
        margin.simulate(np.zeros((1, 3, 4), dtype=int), initial)
    trajectory = make_simulator("linear-trajectory", space="margin").fit(space_runs("margin", num_runs=8)[0])
    with pytest.raises(RunDataError, match="initial_losses.*'margin' space"):   # the trajectory kinds: the same check
        trajectory.simulate(np.zeros((1, 3, 4), dtype=int), initial)
    given = make_simulator("linear-identity", ridge=1.0).fit(space_runs("margin", num_runs=8)[0])
    assert given.space_ == "loss" and given.fit_info["cv_space_scores"] is None   # nothing cross-validated


def test_kinds_built_on_linear_identity_stay_in_loss_space():
    runs, _, _ = space_runs("margin", num_runs=8, seed=6)
    with pytest.raises(UsageError, match="space"):
        make_simulator("linear-bootstrap", space="margin")
    assert make_simulator("linear-bootstrap", replicas=4).fit(runs).space_ == "loss"


@pytest.mark.parametrize("space", SPACES)
def test_the_slope_of_from_space_is_its_derivative_and_zero_where_clipped(space):
    z = np.linspace(-4.0, 3.0, 57)
    floor, ceiling = 0.05, 8.0
    step = 1e-6
    numeric = (from_space(z + step, space, floor, ceiling) - from_space(z - step, space, floor, ceiling)) / (2 * step)
    losses = inverse(z, space)
    inside = (losses > floor * 1.01) & (losses < ceiling * 0.99)
    clipped = (losses < floor * 0.99) | (losses > ceiling * 1.01)
    assert inside.sum() > 10 and clipped.sum() > 3
    slope = from_space_slope(z, space, floor, ceiling)
    np.testing.assert_allclose(slope[inside], numeric[inside], rtol=1e-5, atol=1e-8)
    assert (slope[clipped] == 0).all()


def test_auto_passes_its_candidates_control_variate_on():
    runs, _, _ = space_runs("margin", num_runs=16, seed=1, noise=0.02)
    auto = make_simulator("auto", candidates=["linear-identity"]).fit(runs)
    assert auto.model_.space_ == "margin" and auto.expected_estimator == "control variate"
    pools = np.zeros((2, runs.num_train), dtype=bool)
    pools[0, :5], pools[1, 7:15] = True, True
    initial = runs.initial_losses[0]
    np.testing.assert_array_equal(auto.simulate_expected(pools, 6, initial, draws=5, seed=1),
                                  auto.model_.simulate_expected(pools, 6, initial, draws=5, seed=1))
