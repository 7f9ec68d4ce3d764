import numpy as np
import pytest
from scipy.stats import spearmanr

from simfluence.evaluate import evaluate, score, spearman, split_runs
from simfluence.simulators import ConstantSimulator, LinearIdentitySimulator, MeanTrajectorySimulator

from synthetic import linear_runs


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 9)), rng.normal(size=(7, 9))
    x[0, :3] = x[0, 3]  # ties
    for axis in (0, 1):
        ours = spearman(x, y, axis)
        theirs = [spearmanr(x.take(i, axis=1 - axis), y.take(i, axis=1 - axis)).statistic
                  for i in range(x.shape[1 - axis])]
        assert np.allclose(ours, theirs)
    assert np.isnan(spearman(np.ones((4, 2)), y[:4, :2], 0)).all()


def test_score_matches_definitions():
    runs, _, _ = linear_runs(num_runs=6, seed=1)
    rng = np.random.default_rng(2)
    predicted = runs.losses + rng.normal(0, 0.1, runs.losses.shape)
    metrics = score(predicted, runs)
    error = predicted[:, 1:] - runs.losses[:, 1:]
    assert np.isclose(metrics.mse, np.mean(error**2))
    assert np.isclose(metrics.mae, np.mean(np.abs(error)))
    assert np.isclose(metrics.final_mse, np.mean(error[:, -1] ** 2))
    final_p, final_t = predicted[:, -1], runs.losses[:, -1]
    assert np.isclose(metrics.final_spearman,
                      np.mean([spearmanr(final_p[r], final_t[r]).statistic for r in range(6)]))
    assert np.isclose(metrics.across_run_spearman,
                      np.mean([spearmanr(final_p[:, m], final_t[:, m]).statistic for m in range(runs.num_test)]))
    assert metrics.per_example["mse"].shape == (runs.num_test,)
    with pytest.raises(ValueError, match="do not match"):
        score(predicted[:, :-1], runs)


def test_evaluate_reports_baselines_consistent_with_baseline_simulators():
    runs, _, _ = linear_runs(num_runs=16, seed=3)
    fitting, heldout = split_runs(runs, 4, seed=0)
    result = evaluate(LinearIdentitySimulator(ridge=0.1).fit(fitting), heldout)
    mean = evaluate(MeanTrajectorySimulator().fit(fitting), heldout).metrics
    constant = evaluate(ConstantSimulator().fit(fitting), heldout).metrics
    assert np.isclose(result.baselines["mean-trajectory"].mse, mean.mse)
    assert np.isclose(result.baselines["constant"].mse, constant.mse)
    assert np.isnan(mean.across_run_spearman)  # same prediction in every run: no counterfactual signal
    record = result.as_dict()
    for key in ("mse", "mae", "final_mse", "final_spearman", "across_run_spearman", "baseline_mean_trajectory_mse"):
        assert key in record
    assert record["baseline_mean_trajectory_across_run_spearman"] is None
    assert "mean-trajectory (baseline)" in result.table()


def test_evaluate_rejects_runs_of_another_task():
    runs, _, _ = linear_runs(seed=4)
    other, _, _ = linear_runs(num_test=5, seed=4)
    simulator = MeanTrajectorySimulator().fit(runs)
    with pytest.raises(ValueError, match="test_ids"):
        evaluate(simulator, other)


def test_split_is_seeded_and_disjoint():
    runs, _, _ = linear_runs(seed=5)
    a, b = split_runs(runs, 3, seed=7)
    assert a.num_runs == 9 and b.num_runs == 3
    assert not set(a.run_ids) & set(b.run_ids)
    assert np.array_equal(split_runs(runs, 3, seed=7)[1].run_ids, b.run_ids)
    with pytest.raises(ValueError, match="num_heldout"):
        split_runs(runs, 12)


def test_evaluate_takes_the_callers_predictions_when_given():
    runs, _, _ = linear_runs(num_runs=12, seed=4)
    fitting, heldout = split_runs(runs, num_heldout=4)
    simulator = LinearIdentitySimulator(ridge=0.1).fit(fitting)
    predicted = simulator.simulate(heldout.curricula, heldout.initial_losses)
    assert evaluate(simulator, heldout, predicted=predicted).as_dict() == evaluate(simulator, heldout).as_dict()
    shifted = evaluate(simulator, heldout, predicted=predicted + 1.0)
    assert shifted.metrics.mse > evaluate(simulator, heldout).metrics.mse + 0.5
    with pytest.raises(ValueError, match="^predicted: shape"):
        evaluate(simulator, heldout, predicted=predicted[:, 1:])
