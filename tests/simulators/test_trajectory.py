"""linear-trajectory and auto: recovery of a known generating model, nesting, persistence, choices."""

import copy
import json

import numpy as np
import pytest
from synthetic import linear_runs, trajectory_runs

from simfluence.evaluate import evaluate, split_runs
from simfluence.simulators import AutoSimulator, MeanTrajectorySimulator, Simulator, TrajectorySimulator
from simfluence.simulators.base import arrays_checksum
from simfluence.simulators.trajectory import adam_momentum, trajectory_features


@pytest.mark.parametrize("per_rate,repeat", [(True, 1.0), (False, 1.0), (True, 0.5)])
def test_features_follow_the_recurrence_by_hand(per_rate, repeat):
    curricula = np.array([[[0, 1], [1, -1], [2, 2]]])
    rates = np.array([0.5, 1.0, 0.25])
    features = trajectory_features(curricula, 3, rates, momentum=0.5, decay=0.9, per_rate=per_rate,
                                   repeat_decay=repeat)
    u = np.zeros(3)
    f = np.zeros(3)
    # Example 1 comes back at step 1 (its second occurrence); example 2 twice in one batch (its first).
    batches = [np.array([0.5, 0.5, 0]), np.array([0, 1.0 * repeat, 0]), np.array([0, 0, 1.0])]
    for t, x in enumerate(batches):
        u = 0.5 * u + 0.5 * x
        f = (0.9 ** rates[t] if per_rate else 0.9) * f + rates[t] * u
        np.testing.assert_allclose(features[0, t + 1], f, rtol=1e-12)
    assert (features[0, 0] == 0).all()


def test_recovers_a_known_step_aware_model():
    runs, b, _ = trajectory_runs(seed=1)
    fitting, heldout = split_runs(runs, 6, 0)
    simulator = TrajectorySimulator(space="loss").fit(fitting)
    assert simulator.momentum_ == 0.9 and simulator.decay_ == 1.0   # chosen by cross-validation
    assert np.corrcoef(simulator.coef_.ravel(), b.ravel())[0, 1] > 0.95
    result = evaluate(simulator, heldout).metrics
    baseline = evaluate(MeanTrajectorySimulator().fit(fitting), heldout).metrics
    assert result.mse < 0.05 * baseline.mse and result.final_mse < 0.05 * baseline.final_mse
    assert result.across_run_spearman > 0.9


def test_forgetting_per_unit_learning_rate_is_recovered_under_a_schedule():
    runs, b, _ = trajectory_runs(seed=9, decay=0.8)
    fitting, heldout = split_runs(runs, 6, 0)
    simulator = TrajectorySimulator(space="loss", momentum=0.9).fit(fitting)
    assert simulator.decay_ == 0.8 and simulator.per_rate_   # chosen by cross-validation
    assert np.corrcoef(simulator.coef_.ravel(), b.ravel())[0, 1] > 0.95
    per_step = copy.deepcopy(simulator)
    per_step.per_rate_ = False   # the same coefficients, forgetting 0.8 at every step whatever its rate
    truth = heldout.losses[:, 1:]
    errors = [float(((model.simulate(heldout.curricula, heldout.initial_losses)[:, 1:] - truth) ** 2).mean())
              for model in (simulator, per_step)]
    assert errors[0] < 0.2 * errors[1], errors


def test_repeat_decay_is_recovered_and_matters():
    runs, b, _ = trajectory_runs(seed=11, repeat_decay=0.5, num_steps=40, num_train=20)
    fitting, heldout = split_runs(runs, 6, 0)
    model = TrajectorySimulator(space="loss", momentum=0.9, decay=1.0).fit(fitting)
    assert model.repeat_decay_ == 0.5 and model.fit_info["repeat_decay"] == 0.5   # chosen by cross-validation
    assert np.corrcoef(model.coef_.ravel(), b.ravel())[0, 1] > 0.95
    every = TrajectorySimulator(space="loss", momentum=0.9, decay=1.0, repeat_decay=1.0).fit(fitting)
    errors = [evaluate(m, heldout).metrics.mse for m in (model, every)]
    assert errors[0] < 0.2 * errors[1], errors
    # Runs where every occurrence teaches alike keep 1.
    plain, _, _ = trajectory_runs(seed=11, num_steps=40, num_train=20)
    assert TrajectorySimulator(space="loss", momentum=0.9, decay=1.0).fit(plain).repeat_decay_ == 1.0


def test_faster_forgetting_than_the_grid_is_found_by_extending_it():
    runs, _, _ = trajectory_runs(seed=10, decay=0.25)
    model = TrajectorySimulator(space="loss", momentum=0.9, rank=0).fit(runs)
    assert model.decay_ == 0.25
    assert [row["decay"] for row in model.fit_info["cv_table"]][-2:] == [0.25, 0.0625]   # tried, and worse


def test_schedule_and_momentum_matter_when_they_generated_the_runs():
    runs, _, _ = trajectory_runs(seed=2)
    fitting, heldout = split_runs(runs, 6, 0)
    errors = {}
    for name, params in {"full": {}, "no schedule": {"schedule": False}, "no momentum": {"momentum": 0.0}}.items():
        model = TrajectorySimulator(space="loss", decay=1.0, **params).fit(fitting)
        errors[name] = evaluate(model, heldout).metrics.mse
    assert errors["full"] < 0.5 * errors["no schedule"] and errors["full"] < 0.5 * errors["no momentum"], errors


def test_nests_the_mean_trajectory_exactly_when_effects_are_zero():
    runs, _ = linear_runs(num_runs=10, seed=3)[:2]
    fitting, heldout = split_runs(runs, 3, 0)
    shrunk = TrajectorySimulator(ridge=1e30, space="loss", momentum=0.0, decay=1.0).fit(fitting)
    mean = MeanTrajectorySimulator().fit(fitting)
    np.testing.assert_allclose(shrunk.simulate(heldout.curricula, heldout.initial_losses),
                               mean.simulate(heldout.curricula, heldout.initial_losses), rtol=1e-6, atol=1e-6)
    # In-sample it can never do worse than the mean trajectory: the per-step term is free.
    fitted = TrajectorySimulator(space="loss", momentum=0.0, decay=1.0, rank=0).fit(fitting)
    with pytest.warns(UserWarning, match="were also fitting runs"):
        assert evaluate(fitted, fitting).metrics.mse <= evaluate(mean, fitting).metrics.mse + 1e-12


def test_one_extreme_test_example_does_not_set_the_ridge_of_the_others():
    runs, _, _ = trajectory_runs(seed=4, num_test=6)
    fitting, heldout = split_runs(runs, 6, 0)
    clean = TrajectorySimulator(space="loss", momentum=0.9, decay=1.0, rank=0).fit(fitting)
    losses = fitting.losses.copy()
    losses[:, :, 0] *= 1e6
    spoiled_runs = type(fitting).create(fitting.curricula, losses, fitting.train_ids, fitting.test_ids,
                                        meta=fitting.meta)
    spoiled = TrajectorySimulator(space="loss", momentum=0.9, decay=1.0, rank=0).fit(spoiled_runs)
    np.testing.assert_allclose(spoiled.ridge_[1:], clean.ridge_[1:], rtol=1e-9)
    np.testing.assert_allclose(spoiled.coef_[:, 1:], clean.coef_[:, 1:], rtol=1e-6, atol=1e-12)


def test_log_space_predictions_stay_positive_and_are_chosen_for_proportional_effects():
    runs, _, _ = trajectory_runs(seed=5)
    proportional = type(runs).create(runs.curricula, np.exp(runs.losses - 3.0), runs.train_ids, runs.test_ids,
                                     meta=runs.meta)
    fitting, heldout = split_runs(proportional, 6, 0)
    model = TrajectorySimulator(momentum=0.9, decay=1.0).fit(fitting)
    assert model.space_ == "log"
    assert (model.simulate(heldout.curricula, heldout.initial_losses) > 0).all()


def test_save_load_round_trip(tmp_path):
    runs, _, _ = trajectory_runs(seed=6, num_runs=12)
    model = TrajectorySimulator().fit(runs)
    model.save(tmp_path / "m.npz")
    loaded = Simulator.load(tmp_path / "m.npz")
    assert isinstance(loaded, TrajectorySimulator)
    assert (loaded.space_, loaded.momentum_, loaded.decay_, loaded.repeat_decay_, loaded.rank_) == \
        (model.space_, model.momentum_, model.decay_, model.repeat_decay_, model.rank_)
    np.testing.assert_array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                                  model.simulate(runs.curricula, runs.initial_losses))


def test_files_saved_before_per_rate_forgetting_keep_their_predictions(tmp_path):
    runs, _, _ = trajectory_runs(seed=6, num_runs=12)
    model = TrajectorySimulator(decay=0.7, momentum=0.9, repeat_decay=1.0).fit(runs)
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as data:
        arrays = dict(data)
    arrays["state.choice"] = arrays["state.choice"][:6]        # the layout of files from before
    config = json.loads(str(arrays["config"]))
    config["checksum"] = arrays_checksum({key: value for key, value in arrays.items() if key != "config"})
    arrays["config"] = np.array(json.dumps(config))
    np.savez(tmp_path / "old.npz", **arrays)
    old = Simulator.load(tmp_path / "old.npz")
    assert model.per_rate_ and not old.per_rate_ and old.repeat_decay_ == 1.0
    model.per_rate_ = False
    np.testing.assert_array_equal(old.simulate(runs.curricula, runs.initial_losses),
                                  model.simulate(runs.curricula, runs.initial_losses))


def test_fit_twice_equals_two_fresh_fits():
    first, _, _ = trajectory_runs(seed=7, num_runs=10)
    second, _, _ = trajectory_runs(seed=8, num_runs=12)
    model = TrajectorySimulator()
    a = model.fit(first).simulate(second.curricula, second.initial_losses)
    b = model.fit(second).simulate(first.curricula, first.initial_losses)
    np.testing.assert_array_equal(a, TrajectorySimulator().fit(first).simulate(second.curricula,
                                                                                 second.initial_losses))
    np.testing.assert_array_equal(b, TrajectorySimulator().fit(second).simulate(first.curricula,
                                                                                  first.initial_losses))
    assert model.config.momentum == "auto" and model.config.rank == "auto"   # fit never changes the settings


def test_bad_settings_are_one_line_errors():
    for params, message in (({"ridge": float("inf")}, "ridge"), ({"space": "sqrt"}, "space"),
                            ({"momentum": 1.0}, "momentum"), ({"decay": 0}, "decay"),
                            ({"repeat_decay": 1.5}, "repeat_decay"), ({"rank": -1}, "rank"),
                            ({"cv_folds": 1}, "cv_folds")):
        with pytest.raises(ValueError, match=f"^{message}:"):
            TrajectorySimulator(**params)


def test_adam_momentum_read_from_meta():
    assert adam_momentum({"trainer": {"optim": "adamw_torch", "adam_beta1": 0.8}}) == 0.8
    assert adam_momentum({"optimizer": "adamw"}) == 0.9
    assert adam_momentum({"optimizer": "sgd"}) is None and adam_momentum({}) is None


def test_auto_chooses_the_generating_family_and_round_trips(tmp_path):
    linear, _, _ = linear_runs(num_runs=14, num_steps=30, seed=9, noise=1e-4)
    model = AutoSimulator().fit(linear)
    assert model.chosen_ == "linear-identity", model.fit_info["cv_table"]
    trajectory, _, _ = trajectory_runs(seed=10)
    auto = AutoSimulator().fit(trajectory)
    assert auto.chosen_ == "linear-trajectory", auto.fit_info["cv_table"]
    assert [row["method"] for row in auto.fit_info["cv_table"]] == list(auto.config.candidates)
    auto.save(tmp_path / "auto.npz")
    loaded = Simulator.load(tmp_path / "auto.npz")
    assert isinstance(loaded, AutoSimulator) and loaded.chosen_ == "linear-trajectory"
    np.testing.assert_array_equal(loaded.simulate(trajectory.curricula, trajectory.initial_losses),
                                  auto.simulate(trajectory.curricula, trajectory.initial_losses))
    with pytest.raises(ValueError, match="^candidates:"):
        AutoSimulator(candidates=("nope",))
