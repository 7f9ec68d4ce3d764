"""The featurized simulator: recovery of a known bilinear truth, unseen examples, persistence, errors."""

import json

import numpy as np
import pytest
import torch

from simfluence import RunDataError, RunSet
from simfluence.simulators import FeaturizedSimulator, LinearIdentitySimulator, Simulator, make_simulator
from simfluence.simulators.base import config_checksum
from simfluence.simulators.baselines import mean_trajectory
from synthetic import linear_trajectories

NUM_TRAIN, NUM_TEST, WIDTH = 60, 30, 5


def bilinear_truth(seed=0):
    """Features and coefficients ``a = F W_a G^T``, ``b = F W_b G^T - 0.01`` (``[N, M]`` each)."""
    rng = np.random.default_rng(seed)
    train, test = rng.normal(size=(NUM_TRAIN, WIDTH)), rng.normal(size=(NUM_TEST, WIDTH))
    w_a, w_b = rng.normal(0, 0.002, (WIDTH, WIDTH)), rng.normal(0, 0.004, (WIDTH, WIDTH))
    return train, test, train @ w_a @ test.T, train @ w_b @ test.T - 0.01


def runs_of(a, b, pool, num_runs, seed, num_steps=40, batch=4, noise=1e-4):
    """Identity-centred Simfluence-Linear runs whose curricula draw from ``pool`` only."""
    rng = np.random.default_rng(seed)
    curricula = rng.choice(pool, (num_runs, num_steps, batch))
    losses = linear_trajectories(a, b, curricula, 2.0 + rng.random((num_runs, a.shape[1])), rng, noise)
    return RunSet.create(curricula, losses, [f"train-{i}" for i in range(a.shape[0])],
                         [f"test-{m}" for m in range(a.shape[1])])


def select_columns(runs, columns):
    return RunSet(runs.curricula, runs.losses[:, :, columns], runs.eval_steps, runs.train_ids,
                  runs.test_ids[columns], runs.run_ids, runs.meta)


def mse(predicted, runs):
    return float(np.mean((predicted[:, 1:] - runs.losses[:, 1:]) ** 2))


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    train, test, a, b = bilinear_truth()
    hidden_train, hidden_test = np.arange(48, NUM_TRAIN), np.arange(24, NUM_TEST)
    seen_test = np.arange(24)
    fitting = select_columns(runs_of(a, b, np.arange(48), 24, seed=1), seen_test)
    heldout = runs_of(a, b, np.arange(NUM_TRAIN), 8, seed=2)
    simulator = FeaturizedSimulator(train_features=train, test_features=test[seen_test], dim=WIDTH,
                                    weight_decay=1e-7, fit_residuals=False, lbfgs_iterations=500).fit(fitting)
    return dict(simulator=simulator, fitting=fitting, heldout=heldout, train=train, test=test, a=a, b=b,
                hidden_train=hidden_train, hidden_test=hidden_test, seen_test=seen_test)


def test_recovers_bilinear_truth_for_unseen_examples(fitted):
    simulator, a, b = fitted["simulator"], fitted["a"], fitted["b"]
    other = simulator.for_test_examples([f"test-{m}" for m in range(NUM_TEST)], fitted["test"])
    a_hat, b_hat = other.coefficients
    hidden = fitted["hidden_train"]
    for truth, estimate in ((a, a_hat), (b, b_hat)):
        # Every pair, including training examples no fitting run trained on and new test examples.
        assert np.abs(estimate - truth).max() < 0.05 * np.abs(truth).max()
        assert np.abs(estimate[hidden] - truth[hidden]).max() < 0.05 * np.abs(truth).max()
        assert np.abs(estimate[:, fitted["hidden_test"]] - truth[:, fitted["hidden_test"]]).max() \
            < 0.05 * np.abs(truth).max()


def test_predicts_unseen_training_examples_where_linear_cannot(fitted):
    heldout, fitting = fitted["heldout"], fitted["fitting"]
    seen = select_columns(heldout, fitted["seen_test"])
    assert np.isin(seen.curricula, fitted["hidden_train"]).any(axis=(1, 2)).all()
    featurized = mse(fitted["simulator"].simulate(seen.curricula, seen.initial_losses), seen)
    linear = LinearIdentitySimulator(ridge=1e-3).fit(fitting)
    no_effect = mse(linear.simulate(seen.curricula, seen.initial_losses), seen)
    # Linear has no coefficients for the hidden examples ("no effect"); the features do.
    assert featurized < 0.02 * no_effect
    assert featurized < 1e-3


def test_predicts_unseen_test_examples_from_features(fitted):
    heldout, hidden = fitted["heldout"], fitted["hidden_test"]
    unseen = select_columns(heldout, hidden)
    other = fitted["simulator"].for_test_examples(unseen.test_ids, fitted["test"][hidden])
    predicted = other.simulate(unseen.curricula, unseen.initial_losses)
    baseline = mean_trajectory(other.mean_change, unseen.initial_losses, unseen.num_steps)
    assert mse(predicted, unseen) < 0.01 * mse(baseline, unseen)
    final = predicted[:, -1] - unseen.losses[:, -1]
    assert np.abs(final).max() < 0.05


def test_residuals_stay_zero_for_unseen_training_examples(fitted):
    simulator = FeaturizedSimulator(train_features=fitted["train"], test_features=fitted["test"][fitted["seen_test"]],
                                    dim=2, weight_decay=1e-4, residual_ridge_factor=0.1).fit(fitted["fitting"])
    assert simulator.residuals is not None
    assert torch.all(simulator.residuals[fitted["hidden_train"]] == 0)
    assert torch.any(simulator.residuals[:48] != 0)
    other = simulator.for_test_examples(["test-0", "test-29"], fitted["test"][[0, 29]])
    num = 2
    assert torch.equal(other.residuals[:, [0, num]], simulator.residuals[:, [0, simulator.test_ids.size]])
    assert torch.all(other.residuals[:, [1, num + 1]] == 0)
    assert simulator.offsets is not None and torch.any(simulator.offsets != 0)
    assert torch.equal(other.offsets[0, [0, num]], simulator.offsets[0, [0, simulator.test_ids.size]])
    assert torch.all(other.offsets[0, [1, num + 1]] == 0)


def test_save_load_round_trip(fitted, tmp_path):
    simulator, heldout = fitted["simulator"], select_columns(fitted["heldout"], fitted["seen_test"])
    path = simulator.save(tmp_path / "featurized.npz")
    with np.load(path, allow_pickle=False) as saved:
        assert {"state.train_features", "state.test_features", "state.w_a", "state.w_b"} <= set(saved.files)
    loaded = Simulator.load(path)
    assert isinstance(loaded, FeaturizedSimulator)
    expected = simulator.simulate(heldout.curricula, heldout.initial_losses)
    assert np.array_equal(loaded.simulate(heldout.curricula, heldout.initial_losses), expected)
    new = loaded.for_test_examples(["test-29"], fitted["test"][[29]])
    assert new.simulate(heldout.curricula, heldout.initial_losses[:, :1]).shape == (8, 41, 1)
    with np.load(path, allow_pickle=False) as saved:
        arrays = dict(saved)
    arrays["state.w_a"] = arrays["state.w_a"][:-1]
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    with pytest.raises(RunDataError, match="state.*featurized"):
        Simulator.load(broken)


def _with_params(path, out, **params):
    """A copy of the saved simulator ``path`` whose config holds ``params`` too, as an older version wrote it."""
    with np.load(path, allow_pickle=False) as saved:
        arrays = dict(saved)
    config = json.loads(str(arrays["config"]))
    config["params"].update(params)
    config["config_checksum"] = config_checksum(config)
    arrays["config"] = np.array(json.dumps(config))
    np.savez(out, **arrays)
    return out


def test_files_with_a_removed_setting_load_only_at_its_old_default(fitted, tmp_path):
    simulator, heldout = fitted["simulator"], select_columns(fitted["heldout"], fitted["seen_test"])
    path = simulator.save(tmp_path / "featurized.npz")
    old = Simulator.load(_with_params(path, tmp_path / "old.npz", rollout_iterations=0))
    assert "rollout_iterations" not in old.settings()
    assert np.array_equal(old.simulate(heldout.curricula, heldout.initial_losses),
                          simulator.simulate(heldout.curricula, heldout.initial_losses))
    with pytest.raises(RunDataError, match=r"config\.params.*rollout_iterations: this setting.*got 30") as error:
        Simulator.load(_with_params(path, tmp_path / "refined.npz", rollout_iterations=30))
    assert "\n" not in str(error.value)
    assert FeaturizedSimulator(rollout_iterations=0).settings() == FeaturizedSimulator().settings()
    with pytest.raises(ValueError, match="rollout_iterations: this setting was removed; only 0"):
        FeaturizedSimulator(rollout_iterations=30)


def test_bad_features_give_one_line_errors(fitted):
    fitting, train, test = fitted["fitting"], fitted["train"], fitted["test"]
    cases = [
        (dict(train_features=train[:-1], test_features=test[:24]), "train_features"),
        (dict(train_features=train, test_features=test), "test_features"),
        (dict(train_features=train[:, 0], test_features=test[:24]), "train_features"),
        (dict(train_features=train, test_features=None), "test_features"),
        (dict(train_features=np.where(train > 1, np.nan, train), test_features=test[:24]), "NaN"),
    ]
    for params, word in cases:
        with pytest.raises(RunDataError) as error:
            FeaturizedSimulator(**params, weight_decay=1e-3).fit(fitting)
        assert word in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(RunDataError, match="test_features.*3 feature columns.*fitted on 5"):
        fitted["simulator"].for_test_examples(["new"], np.zeros((1, 3)))
    with pytest.raises(RunDataError, match=r"expected \[2, D\]"):
        fitted["simulator"].for_test_examples(["new", "other"], np.zeros((1, WIDTH)))
    with pytest.raises(ValueError, match="features: expected one of"):
        FeaturizedSimulator(features="pixels")


def test_task_features_and_fit_from_collected_runs(tmp_path):
    from simfluence.collect import collect
    from simfluence.tasks import get_task

    torch.set_num_threads(1)
    task = get_task("digits-mlp", num_train=40, num_test=12)
    features = task.example_features("train")
    assert features.shape == (40, 64 + task.hidden + 10) and features.dtype == np.float32
    runs = collect(task, tmp_path / "runs", 6, 20, progress=False).load()
    simulator = make_simulator("featurized", features="task+gradients").fit(runs)  # task from the runs' meta
    assert simulator.fit_info["kernels"] == 2
    predicted = simulator.simulate(runs.curricula, runs.initial_losses)
    mean = mean_trajectory(simulator.mean_change, runs.initial_losses.astype(np.float64), runs.num_steps)
    assert mse(predicted, runs) < mse(mean, runs)
    unseen = simulator.for_test_examples(runs.test_ids[:3])  # features looked up in the task by id
    assert np.allclose(unseen.test_features, simulator.test_features[:3])


def test_gradient_features_at_checkpoints_of_a_replayed_fitting_run(tmp_path):
    from simfluence.collect import collect
    from simfluence.collect.train import train_states
    from simfluence.func.gradients import gradient_products, trainable_params
    from simfluence.tasks import get_task

    torch.set_num_threads(1)
    task = get_task("digits-mlp", num_train=40, num_test=12)
    runs = collect(task, tmp_path / "runs", 4, 20, progress=False).load()
    simulator = make_simulator("featurized", num_checkpoints=2).fit(runs)
    assert simulator.checkpoint_steps() == [0, 10]
    # The kernel adds the gradient inner products at both checkpoints (TracIn-CP's sum).
    expected = 0
    for state in train_states(task, runs.curricula[0], [0, 10]):
        model = task.build_model().eval()
        model.load_state_dict(state)
        expected = expected + gradient_products(task, model, trainable_params(model)).numpy()
    kernel = simulator._kernels()[0].numpy() * simulator.kernel_scales[0] * simulator.feature_scales[0] ** 2
    assert np.allclose(kernel, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    loaded = Simulator.load(simulator.save(tmp_path / "f.npz"))
    again = loaded.for_test_examples(runs.test_ids[:2])  # replays the stored fitting curriculum
    assert np.allclose(again.test_features, simulator.test_features[:2], atol=1e-6)


def test_cli_fit_featurized_without_task_or_features_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from simfluence.cli import main
    from simfluence.runs.interchange import write_interchange

    train, test, a, b = bilinear_truth()
    path = tmp_path / "synthetic.npz"
    write_interchange(runs_of(a, b, np.arange(NUM_TRAIN), 3, seed=3), path)
    result = CliRunner().invoke(main, ["fit", str(path), "--method", "featurized", "--out", str(tmp_path / "f.npz")])
    assert result.exit_code == 2
    assert "meta.task" in result.output and result.output.strip().count("\n") == 0


def test_weight_decay_chosen_by_cross_validation(fitted):
    params = dict(train_features=fitted["train"], test_features=fitted["test"][fitted["seen_test"]], dim=WIDTH,
                  fit_residuals=False, weight_decay=None, weight_decay_grid=(1e-1, 1e-7), lbfgs_iterations=300)
    simulator = FeaturizedSimulator(**params).fit(fitted["fitting"])
    scores = simulator.fit_info["cv_scores"]
    # The truth is exactly bilinear and nearly noise-free: the weak penalty must win, by far. It lies
    # on the grid's lower edge, so the grid is extended below it (x10 steps) while that edge wins.
    assert {"0.1", "1e-07", "1e-08"} <= set(scores) and len(scores) <= 5
    assert all(float(key) >= 1e-10 and (float(key) <= 1e-7 or key == "0.1") for key in scores)
    assert simulator.fit_info["weight_decay"] <= 1e-7 and scores["1e-07"] < 0.1 * scores["0.1"]
    assert simulator.fit_info["weight_decay"] == float(min(scores, key=scores.get))


def test_residual_ridge_chosen_by_cross_validation(fitted):
    params = dict(train_features=fitted["train"], test_features=fitted["test"][fitted["seen_test"]], dim=0,
                  weight_decay=1e-4, residual_ridge_factor=None, residual_ridge_grid=(1e-3, 1e3))
    simulator = FeaturizedSimulator(**params).fit(fitted["fitting"])
    scores = simulator.fit_info["residual_cv_scores"]
    # Without the bilinear part (dim=0) the residuals must carry the pairs: the weak ridge wins, and as it
    # lies on the grid's lower edge, the grid is extended below it (x10 steps, at most 3) while that edge wins.
    occurrences = 24 * 40 * 4 / NUM_TRAIN  # the mean over all training examples, hidden ones included
    grid = sorted(float(key) for key in scores)
    assert 3 <= len(grid) <= 5 and grid[-1] == pytest.approx(1e3 * occurrences)
    assert np.allclose(np.diff(np.log10(grid[:-1])), 1.0) and grid[-2] == pytest.approx(1e-3 * occurrences)
    assert simulator.fit_info["residual_ridge"] <= 1e-3 * occurrences * (1 + 1e-9)
    assert simulator.fit_info["residual_ridge"] == pytest.approx(float(min(scores, key=scores.get)))
    assert min(scores.values()) < 0.5 * max(scores.values())
