"""benchmarks/splits.py: method specs and the ratios it prints, on a small synthetic store."""

import sys

import numpy as np
import pytest
from benchmark_scripts import load_benchmark
from synthetic import trajectory_runs

from simfluence import save_runs
from simfluence.evaluate import score, split_runs
from simfluence.simulators import make_simulator
from simfluence.simulators.baselines import mean_trajectory


def test_method_specs_parse_as_json():
    bench = load_benchmark("splits")
    assert bench.parse_method("linear") == ("linear", {})
    assert bench.parse_method('gradient-trajectory:prior_checkpoint="start";cv_folds=4') == (
        "gradient-trajectory", {"prior_checkpoint": "start", "cv_folds": 4})
    assert bench.parse_method("linear:nest_mean=false") == ("linear", {"nest_mean": False})
    with pytest.raises(ValueError):
        bench.parse_method("linear:ridge=oops")


def test_heldout_from_keeps_the_first_runs_fitting():
    runs, _, _ = trajectory_runs(num_runs=12, num_steps=5, seed=3)
    bench = load_benchmark("splits")
    fitting, heldout = bench.split(runs, 4, 1, heldout_from=6)
    held = [list(runs.run_ids).index(run_id) for run_id in heldout.run_ids]
    assert len(held) == 4 and min(held) >= 6
    assert sorted(set(fitting.run_ids) | set(heldout.run_ids)) == sorted(runs.run_ids)
    assert set(fitting.run_ids) >= set(runs.run_ids[:6])
    assert [r for r in bench.split(runs, 4, 1)[1].run_ids] == list(split_runs(runs, 4, 1)[1].run_ids)
    with pytest.raises(SystemExit, match="--heldout-from 10"):
        bench.split(runs, 4, 1, heldout_from=10)


def test_prints_the_ratios_computed_another_way(tmp_path, monkeypatch, capsys):
    runs, _, _ = trajectory_runs(num_runs=12, num_steps=20, seed=3)
    save_runs(runs, tmp_path / "runs.npz")
    bench = load_benchmark("splits")
    monkeypatch.setattr(sys, "argv", ["splits.py", str(tmp_path / "runs.npz"), "--heldout", "4", "--seeds", "0,1",
                                      "--methods", "mean-trajectory,linear-identity:ridge=1.0",
                                      "--json", str(tmp_path / "out.json")])
    bench.main()
    out = capsys.readouterr().out
    assert "| mean-trajectory | 1.000 | 1.000 |" in out
    expected = []
    for seed in (0, 1):
        fitting, heldout = split_runs(runs, 4, seed)
        simulator = make_simulator("linear-identity", ridge=1.0).fit(fitting)
        initial = heldout.initial_losses.astype(np.float64)
        base = score(mean_trajectory(simulator.mean_change, initial, heldout.num_steps), heldout).mse
        expected.append(score(simulator.simulate(heldout.curricula, initial), heldout).mse / base)
    assert f"| linear-identity:ridge=1.0 | {np.mean(expected):.3f} |" in out
    assert (tmp_path / "out.json").exists()


def test_fitting_keeps_the_first_runs_of_each_split_and_the_same_heldout(tmp_path, monkeypatch, capsys):
    runs, _, _ = trajectory_runs(num_runs=12, num_steps=20, seed=3)
    save_runs(runs, tmp_path / "runs.npz")
    bench = load_benchmark("splits")
    monkeypatch.setattr(sys, "argv", ["splits.py", str(tmp_path / "runs.npz"), "--heldout", "4", "--seeds", "0",
                                      "--fitting", "5", "--methods", "linear-identity:ridge=1.0"])
    bench.main()
    fitting, heldout = split_runs(runs, 4, 0)
    simulator = make_simulator("linear-identity", ridge=1.0).fit(fitting.select(np.arange(5)))
    initial = heldout.initial_losses.astype(np.float64)
    base = score(mean_trajectory(simulator.mean_change, initial, heldout.num_steps), heldout).mse
    ratio = score(simulator.simulate(heldout.curricula, initial), heldout).mse / base
    assert f"| linear-identity:ridge=1.0 | {ratio:.3f} |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["splits.py", str(tmp_path / "runs.npz"), "--heldout", "4", "--fitting", "9"])
    with pytest.raises(SystemExit, match="--fitting 9: a split has 8 fitting runs"):
        bench.main()


def test_in_sample_fits_and_scores_every_run(tmp_path, monkeypatch, capsys):
    runs, _, _ = trajectory_runs(num_runs=8, num_steps=20, seed=4)
    save_runs(runs, tmp_path / "runs.npz")
    bench = load_benchmark("splits")
    monkeypatch.setattr(sys, "argv", ["splits.py", str(tmp_path / "runs.npz"), "--in-sample",
                                      "--methods", "linear-identity:ridge=1.0"])
    bench.main()
    simulator = make_simulator("linear-identity", ridge=1.0).fit(runs)
    initial = runs.initial_losses.astype(np.float64)
    base = score(mean_trajectory(simulator.mean_change, initial, runs.num_steps), runs)
    metrics = score(simulator.simulate(runs.curricula, initial), runs)
    out = capsys.readouterr().out
    assert out.count("split -1 ") == 1
    assert f"| linear-identity:ridge=1.0 | {metrics.mse / base.mse:.3f} | {metrics.final_mse / base.final_mse:.3f} | " \
           f"{metrics.across_run_spearman:.3f} |" in out
