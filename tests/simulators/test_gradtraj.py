"""gradient-trajectory: a scaled prior plus a cross-validated residual; nesting, persistence, a real task."""

import numpy as np
import pytest
from small_tasks import digits_runs
from synthetic import trajectory_runs

from simfluence.evaluate import evaluate, split_runs
from simfluence.simulators import (
    AutoSimulator,
    GradientTrajectorySimulator,
    MeanTrajectorySimulator,
    Simulator,
    TrajectorySimulator,
)


def prior_runs(seed=0, num_train=30, num_test=8, num_runs=24, num_steps=40, batch=4, residual=0.0, noise=1e-3):
    """Runs whose true effects are ``b^m = -s_m P[:, m] + residual``, with warm-up/decay rates and momentum 0.9.

    Returns ``(runs, scores P, scales s, b)``.
    """
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 1, (num_train, num_test))
    scales = rng.uniform(0.01, 0.03, num_test)
    b = -scores * scales + residual * rng.normal(0, 0.02, (num_train, num_test))
    runs, _, _ = trajectory_runs(num_runs=num_runs, num_steps=num_steps, batch=batch, seed=seed + 1000, noise=noise,
                                 momentum=0.9, decay=1.0, effects=b)
    return runs, scores, scales, b


def test_recovers_a_scaled_prior_with_its_schedule():
    runs, scores, scales, b = prior_runs(seed=1, residual=0.05)
    fitting, heldout = split_runs(runs, 6, 0)
    model = GradientTrajectorySimulator(space="loss", decay=1.0).fit(fitting, prior=scores)
    assert model.momentum_ == 0.9
    np.testing.assert_allclose(model.prior_scale_[0], scales, rtol=0.1)
    assert np.corrcoef(model.coef_.ravel(), b.ravel())[0, 1] > 0.99
    result = evaluate(model, heldout).metrics
    baseline = evaluate(MeanTrajectorySimulator().fit(fitting), heldout).metrics
    free = evaluate(TrajectorySimulator(space="loss", decay=1.0).fit(fitting), heldout).metrics
    assert result.mse < 0.05 * baseline.mse and result.final_mse < 0.05 * baseline.final_mse
    assert result.mse < free.mse and result.across_run_spearman > 0.9
    unscheduled = GradientTrajectorySimulator(space="loss", decay=1.0, schedule=False).fit(fitting, prior=scores)
    assert result.mse < 0.5 * evaluate(unscheduled, heldout).metrics.mse
    info = model.fit_info
    assert info["prior"] == "given" and 0 <= info["prior_only"] <= runs.num_test


def test_an_exact_prior_is_chosen_alone_and_a_useless_one_is_corrected():
    runs, scores, _, _ = prior_runs(seed=2, residual=0.0, noise=1e-4)
    fitting, heldout = split_runs(runs, 6, 0)
    exact = GradientTrajectorySimulator(space="loss", decay=1.0, momentum=0.9).fit(fitting, prior=scores)
    assert exact.fit_info["prior_only"] >= runs.num_test // 2, exact.ridge_
    # Effects unrelated to the prior: the residual takes over, about as well as linear-trajectory's free fit.
    other, _, _ = trajectory_runs(seed=3)
    fitting, heldout = split_runs(other, 6, 0)
    noise = np.random.default_rng(0).normal(size=(other.num_train, other.num_test))
    corrected = GradientTrajectorySimulator(space="loss", decay=1.0, rank=0).fit(fitting, prior=noise)
    free = TrajectorySimulator(space="loss", decay=1.0, rank=0).fit(fitting)
    assert np.isfinite(corrected.ridge_).mean() > 0.5
    assert evaluate(corrected, heldout).metrics.mse < 1.5 * evaluate(free, heldout).metrics.mse


def test_two_priors_get_their_own_scales():
    """``b^m = -s1_m P1[:, m] - s2_m P2[:, m]``: two priors given as ``[2, N, M]`` recover both scales."""
    rng = np.random.default_rng(11)
    num_train, num_test = 30, 8
    first, second = rng.normal(0, 1, (2, num_train, num_test))
    s1, s2 = rng.uniform(0.01, 0.03, num_test), rng.uniform(-0.03, 0.03, num_test)
    b = -first * s1 - second * s2
    runs, _, _ = trajectory_runs(num_runs=24, num_steps=40, batch=4, seed=1011, noise=1e-4, momentum=0.9,
                                 decay=1.0, effects=b)
    fitting, heldout = split_runs(runs, 6, 0)
    both = GradientTrajectorySimulator(space="loss", decay=1.0).fit(fitting, prior=np.stack([first, second]))
    assert both.prior_.shape == (2, num_train, num_test) and both.prior_scale_.shape == (2, num_test)
    np.testing.assert_allclose(both.prior_scale_, np.stack([s1, s2]), atol=0.003)
    np.testing.assert_allclose(both.prior_, -np.stack([first, second]))
    one = GradientTrajectorySimulator(space="loss", decay=1.0).fit(fitting, prior=first)
    assert evaluate(both, heldout).metrics.mse < evaluate(one, heldout).metrics.mse
    assert both.fit_info["prior_only"] > one.fit_info["prior_only"], (both.ridge_, one.ridge_)   # one needs residuals


def test_a_zero_prior_alone_is_exactly_the_mean_trajectory():
    runs, _, _, _ = prior_runs(seed=4, num_runs=6)
    fitting, heldout = runs.select(np.arange(3)), runs.select(np.arange(3, 6))
    zero = np.zeros((runs.num_train, runs.num_test))
    model = GradientTrajectorySimulator().fit(fitting, prior=zero)   # too few runs to cross-validate: prior alone
    assert np.isinf(model.ridge_).all() and (model.coef_ == 0).all()
    np.testing.assert_allclose(model.simulate(heldout.curricula, heldout.initial_losses),
                               MeanTrajectorySimulator().fit(fitting).simulate(heldout.curricula,
                                                                                heldout.initial_losses),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_priors", [1, 2])
def test_save_load_round_trip(tmp_path, num_priors):
    runs, scores, _, _ = prior_runs(seed=5, num_runs=12, residual=0.05)
    priors = np.stack([scores, np.random.default_rng(5).normal(size=scores.shape)])[:num_priors]
    model = GradientTrajectorySimulator(decay=1.0).fit(runs, prior=priors)
    model.save(tmp_path / "m.npz")
    loaded = Simulator.load(tmp_path / "m.npz")
    assert isinstance(loaded, GradientTrajectorySimulator)
    np.testing.assert_array_equal(loaded.ridge_, model.ridge_)
    np.testing.assert_array_equal(loaded.prior_scale_, model.prior_scale_)
    np.testing.assert_array_equal(loaded.prior_, model.prior_)
    np.testing.assert_array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                                  model.simulate(runs.curricula, runs.initial_losses))


def test_bad_inputs_are_one_line_errors():
    runs, scores, _, _ = prior_runs(seed=6, num_runs=6)
    for params, message in (({"prior_checkpoint": "end"}, "prior_checkpoint"), ({"preconditioner": "kfac"},
                            "preconditioner"), ({"normalise": "yes"}, "normalise"), ({"memory_gb": 0}, "memory_gb")):
        with pytest.raises(ValueError, match=f"^{message}:"):
            GradientTrajectorySimulator(**params)
    with pytest.raises(ValueError, match="shape"):
        GradientTrajectorySimulator().fit(runs, prior=scores[:, :3])
    with pytest.raises(ValueError, match="task"):   # no prior, and the runs' task is not registered
        GradientTrajectorySimulator().fit(runs)


def test_auto_skips_it_for_runs_without_a_task():
    runs, _, _, _ = prior_runs(seed=7, num_runs=12)
    auto = AutoSimulator(candidates=("gradient-trajectory", "mean-trajectory")).fit(runs)
    assert auto.chosen_ == "mean-trajectory"
    row = auto.fit_info["cv_table"][0]
    assert row["method"] == "gradient-trajectory" and row["cv_mse"] is None and "task" in row["skipped"]


def test_priors_are_kept_on_disk_for_new_processes(tmp_path, monkeypatch):
    from simfluence.simulators import gradtraj

    monkeypatch.setenv("SIMFLUENCE_CACHE", str(tmp_path / "cache"))
    task, runs = digits_runs()
    monkeypatch.setattr(gradtraj, "_CACHE", type(gradtraj._CACHE)())        # a fresh process's memory
    first = GradientTrajectorySimulator(task=task).fit(runs)
    assert first.fit_info["prior_cached"] is False
    assert len(list((tmp_path / "cache").glob("gradient-prior-*.pt"))) == 1
    again = GradientTrajectorySimulator(task=task).fit(runs)
    assert again.fit_info["prior_cached"] == "memory"
    monkeypatch.setattr(gradtraj, "_CACHE", type(gradtraj._CACHE)())
    loaded = GradientTrajectorySimulator(task=task).fit(runs)
    assert loaded.fit_info["prior_cached"] == "disk"
    np.testing.assert_array_equal(loaded.prior_, first.prior_)
    np.testing.assert_array_equal(loaded.coef_, first.coef_)
    # Without the disk cache the prior is computed again, to the same numbers, and nothing is written.
    monkeypatch.setattr(gradtraj, "_CACHE", type(gradtraj._CACHE)())
    monkeypatch.setenv("SIMFLUENCE_CACHE", str(tmp_path / "other"))
    fresh = GradientTrajectorySimulator(task=task, disk_cache=False).fit(runs)
    assert fresh.fit_info["prior_cached"] is False and not (tmp_path / "other").exists()
    np.testing.assert_allclose(fresh.prior_, first.prior_, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="^disk_cache:"):
        GradientTrajectorySimulator(disk_cache="yes")


def test_end_to_end_on_digits_mlp(tmp_path, monkeypatch):
    import torch

    from simfluence.func.gradients import gradient_products, per_example_gradients, trainable_params

    monkeypatch.setenv("SIMFLUENCE_CACHE", str(tmp_path))   # a private disk cache: the first fits compute
    task, runs = digits_runs()
    fitting, heldout = split_runs(runs, 3, 0)
    start = GradientTrajectorySimulator(task=task, prior_checkpoint="start", normalise=False).fit(fitting)
    model = task.build_model().eval()
    raw = gradient_products(task, model, trainable_params(model)).numpy()
    np.testing.assert_allclose(start.prior_[0], -raw)
    info = start.fit_info
    assert (info["preconditioner"], info["normalise"], info["prior_step"]) == ("none", False, 0)   # SGD runs
    # Normalised rows (the default): each training row divided by its gradient's norm, computed here
    # from the per-example gradients themselves.
    grads = per_example_gradients(task, model, trainable_params(model), task.data.train_inputs,
                                  task.data.train_targets).to(torch.float64)
    normalised = GradientTrajectorySimulator(task=task, prior_checkpoint="start").fit(fitting)
    np.testing.assert_allclose(normalised.prior_[0], -raw / grads.norm(dim=1).numpy()[:, None], rtol=1e-5)
    middle = GradientTrajectorySimulator(task=task, prior_checkpoint="middle").fit(fitting)   # normalised rows
    assert (middle.fit_info["prior_step"], middle.fit_info["normalise"]) == (10, True)
    assert not middle.fit_info["prior_cached"]
    again = GradientTrajectorySimulator(task=task, prior_checkpoint="middle").fit(fitting)
    assert again.fit_info["prior_cached"] and np.array_equal(again.coef_, middle.coef_)
    # The replayed curriculum does not depend on which fitting runs are given (auto's folds share it).
    other = GradientTrajectorySimulator(task=task, prior_checkpoint="middle").fit(fitting.select([2, 0, 1]))
    assert other.fit_info["prior_cached"] and np.array_equal(other.prior_, middle.prior_)
    both = GradientTrajectorySimulator(task=task, prior_checkpoint="both").fit(fitting)   # both priors cached
    assert both.fit_info["prior_cached"] and both.fit_info["prior_step"] == [0, 10]
    np.testing.assert_array_equal(both.prior_, np.concatenate([normalised.prior_, middle.prior_]))
    assert both.prior_scale_.shape == (2, runs.num_test)
    predicted = middle.simulate(heldout.curricula, heldout.initial_losses)
    assert predicted.shape == heldout.losses.shape and np.isfinite(predicted).all()
    assert evaluate(middle, heldout).metrics.mse < evaluate(MeanTrajectorySimulator().fit(fitting), heldout).metrics.mse


def test_trak_of_the_fitting_runs_final_weights_is_one_more_prior(tmp_path, monkeypatch):
    pytest.importorskip("trak")
    from simfluence.collect import collect
    from simfluence.peers import get_peer
    from simfluence.runs.log import RunDataError
    from simfluence.tasks import get_task

    monkeypatch.setenv("SIMFLUENCE_CACHE", str(tmp_path / "cache"))
    task = get_task("digits-mlp", num_train=40, num_test=10)
    store = collect(task, tmp_path / "runs", 6, 10, 0, checkpoint_steps=(10,), progress=False)
    runs = store.load()
    fitting = runs.select([0, 2, 3, 5])
    plain = GradientTrajectorySimulator(task=task, prior_checkpoint="start").fit(fitting)
    hybrid = GradientTrajectorySimulator(task=task, prior_checkpoint="start", checkpoints=tmp_path / "runs").fit(fitting)
    assert hybrid.prior_.shape == (2, 40, 10) and hybrid.prior_scale_.shape == (2, 10)
    np.testing.assert_array_equal(hybrid.prior_[0], plain.prior_[0])
    # The second prior is TRAK's own output on the final weights of the fitting runs only (not runs 1, 4).
    states = [store.read_checkpoint(str(run_id), 10) for run_id in fitting.run_ids]
    np.testing.assert_allclose(hybrid.prior_[1], get_peer("trak").attribute(task, states).scores, rtol=1e-6)
    assert hybrid.fit_info["trak_cached"] is False and "TRAK of 4 fitting runs" in hybrid.fit_info["prior"]
    again = GradientTrajectorySimulator(task=task, prior_checkpoint="start", checkpoints=str(tmp_path / "runs"))
    assert again.fit(fitting).fit_info["trak_cached"] == "disk"
    np.testing.assert_array_equal(again.prior_, hybrid.prior_)
    path = tmp_path / "hybrid.npz"
    hybrid.save(path)
    loaded = Simulator.load(path)                   # the saved model holds its priors: no store, no task
    np.testing.assert_array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                                  hybrid.simulate(runs.curricula, runs.initial_losses))
    # A store without the runs' final weights: one line naming the store, the field and the fix.
    collect(task, tmp_path / "bare", 2, 10, 0, progress=False)
    with pytest.raises(RunDataError, match="checkpoints.*no final weights.*--checkpoint-steps 10"):
        GradientTrajectorySimulator(task=task, checkpoints=tmp_path / "bare").fit(fitting)
    # Another collection's runs under the same ids (another seed): refused, not read as these runs' weights.
    collect(task, tmp_path / "other", 6, 10, 1, checkpoint_steps=(10,), progress=False)
    with pytest.raises(RunDataError, match="run 'run-000000' there trained along another curriculum"):
        GradientTrajectorySimulator(task=task, checkpoints=tmp_path / "other").fit(fitting)
    with pytest.raises(ValueError, match="^checkpoints: expected a run store path"):
        GradientTrajectorySimulator(checkpoints=3)
