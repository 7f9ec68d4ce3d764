"""Bad input and damaged files are refused with one line; nothing silently wrong."""

import json

import numpy as np
import torch
import pytest
from click.testing import CliRunner

from simfluence.cli import main
from simfluence.runs import RunDataError, save_runs
from simfluence.simulators import LinearIdentitySimulator, Simulator, TrajectorySimulator
from synthetic import linear_runs


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_non_finite_or_negative_ridge_is_a_one_line_error(tmp_path, value):
    runs, _, _ = linear_runs(num_runs=4)
    save_runs(runs, tmp_path / "runs.npz")
    for method in ("linear-identity", "linear-trajectory"):
        result = CliRunner().invoke(main, ["fit", str(tmp_path / "runs.npz"), "--method", method, "--ridge", value,
                                           "--out", str(tmp_path / "m.npz")])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "ridge" in result.output, result.output
        assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("make", [lambda: LinearIdentitySimulator(ridge=1e-3), lambda: TrajectorySimulator()])
def test_loading_a_model_with_nan_arrays_is_refused(tmp_path, make):
    runs, _, _ = linear_runs(num_runs=6)
    path = make().fit(runs).save(tmp_path / "m.npz")
    arrays = dict(np.load(path, allow_pickle=False))
    name = next(key for key, value in arrays.items() if key.startswith("state.") and value.dtype.kind == "f")
    arrays[name] = np.full_like(arrays[name], np.nan)
    # A consistent file (checksum matching its NaN arrays), as a buggy fit would write it.
    from simfluence.simulators.base import arrays_checksum

    config = json.loads(str(arrays["config"]))
    config["checksum"] = arrays_checksum({key: value for key, value in arrays.items() if key != "config"})
    arrays["config"] = np.array(json.dumps(config))
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(RunDataError, match=rf"field '{name}': holds NaN or inf values"):
        Simulator.load(tmp_path / "broken.npz")


@pytest.mark.parametrize("args, option", [(["attribute", "m.npz", "--top", "-5"], "--top"),
                                          (["optimize", "m.npz", "--test-set", "0", "--budget", "3", "--steps", "4",
                                            "--batch-size", "0"], "--batch-size"),
                                          (["split", "runs.npz", "--heldout", "0"], "--heldout"),
                                          (["fit", "runs.npz", "--out", "m.npz", "--cv-folds", "1"], "--cv-folds"),
                                          (["collect", "digits-mlp", "--runs", "0", "--steps", "3", "--out", "s"],
                                           "--runs")])
def test_out_of_range_options_are_one_line_errors(tmp_path, monkeypatch, args, option):
    monkeypatch.chdir(tmp_path)
    runs, _, _ = linear_runs(num_runs=4)
    save_runs(runs, tmp_path / "runs.npz")
    LinearIdentitySimulator(ridge=1e-3).fit(runs).save(tmp_path / "m.npz")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: Invalid value for '{option}'"), \
        result.output


def test_empty_runs_nested_meta_and_bad_devices_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs, _, _ = linear_runs(num_runs=4)
    save_runs(runs, "runs.npz")
    LinearIdentitySimulator(ridge=1e-3).fit(runs).save("m.npz")
    np.savez("empty.npz", curricula=np.zeros((0, 30, 4), np.int32), losses=np.zeros((0, 31, 6), np.float32),
             train_ids=runs.train_ids, test_ids=runs.test_ids, meta=np.array("{}"))
    np.savez("nested.npz", curricula=runs.curricula, losses=runs.losses, train_ids=runs.train_ids,
             test_ids=runs.test_ids, meta=np.array("[" * 100000 + "]" * 100000))
    cases = [(["evaluate", "m.npz", "empty.npz"], "field 'curricula': holds no runs"),
             (["simulate", "m.npz", "empty.npz", "--out", "t.npz"], "empty.npz: field 'curricula': holds no runs"),
             (["fit", "nested.npz", "--out", "x.npz"], "nested.npz: field 'meta': is nested too deeply"),
             (["fit", "runs.npz", "--out", "x.npz", "--device", "bogus"], "--device: 'bogus' is not a torch device")]
    if not torch.cuda.is_available():
        cases.append((["fit", "runs.npz", "--out", "x.npz", "--device", "cuda"], "no CUDA GPU is available"))
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output


def test_no_progress_output_when_not_a_terminal(tmp_path):
    import io
    import subprocess
    import sys
    from contextlib import redirect_stderr

    from simfluence.progress import progress_bar

    captured = io.StringIO()
    with redirect_stderr(captured):
        assert sum(progress_bar(range(5), desc="work")) == 10
    assert captured.getvalue() == ""
    result = subprocess.run([sys.executable, "-m", "simfluence.cli", "collect", "digits-mlp", "--runs", "2", "--steps",
                             "3", "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_simulating_past_the_fitting_runs_warns_and_is_flagged(tmp_path, monkeypatch):
    from simfluence.evaluate import evaluate
    from simfluence.runs import RunSet
    from simfluence.simulators.base import ExtrapolationWarning

    runs, _, _ = linear_runs(num_runs=6, num_steps=30, batch=4)
    model = LinearIdentitySimulator(ridge=1e-3).fit(runs)
    with warnings_recorded() as caught:
        model.simulate(runs.curricula, runs.initial_losses)
    assert not caught
    longer = np.concatenate([runs.curricula] * 3, axis=1)
    wider = np.concatenate([runs.curricula] * 2, axis=2)
    for curricula, initial, message in ((longer, runs.initial_losses, "90 steps, the fitting runs had 30"),
                                        (wider, runs.initial_losses, "batches of up to 8 examples"),
                                        (runs.curricula, runs.initial_losses * 100, "losses before training")):
        with pytest.warns(ExtrapolationWarning, match=message):
            model.simulate(curricula, initial)
    far = RunSet.create(longer, np.concatenate([runs.losses, runs.losses[:, 1:], runs.losses[:, 1:]], axis=1),
                        runs.train_ids, runs.test_ids)
    with pytest.warns(ExtrapolationWarning):
        result = evaluate(model, far)
    assert result.as_dict()["extrapolation"] and "WARNING: extrapolating: 90 steps" in result.table()
    monkeypatch.chdir(tmp_path)
    model.save("m.npz")
    save_runs(far, "far.npz")
    out = CliRunner().invoke(main, ["evaluate", "m.npz", "far.npz"])
    assert out.exit_code == 0, out.output
    assert "warning: far.npz: extrapolating: 90 steps, the fitting runs had 30" in out.output


def warnings_recorded():
    import warnings

    return warnings.catch_warnings(record=True)


def test_a_saved_model_whose_arrays_were_altered_is_refused(tmp_path):
    runs, _, _ = linear_runs(num_runs=6)
    path = LinearIdentitySimulator(ridge=1e-3).fit(runs).save(tmp_path / "m.npz")
    arrays = dict(np.load(path, allow_pickle=False))
    name = next(key for key in arrays if key.startswith("state.") and arrays[key].dtype.kind == "f")
    arrays[name] = arrays[name] * 1.001   # plausible, finite numbers: only the checksum can tell
    np.savez(tmp_path / "altered.npz", **arrays)
    with pytest.raises(RunDataError, match="field 'checksum': the arrays do not match"):
        Simulator.load(tmp_path / "altered.npz")
    assert isinstance(Simulator.load(path), LinearIdentitySimulator)


@pytest.mark.parametrize("factor", [1e3, 1e6])
def test_one_extreme_test_example_does_not_set_the_ridge_of_the_linear_family(factor):
    from simfluence.evaluate import split_runs
    from simfluence.runs import RunSet

    runs, _, _ = linear_runs(num_test=8, num_runs=16, seed=5, noise=1e-2)
    fitting, heldout = split_runs(runs, 4, 0)
    clean = LinearIdentitySimulator().fit(fitting)
    losses = fitting.losses.copy()
    losses[:, :, 0] *= factor
    spoiled = LinearIdentitySimulator().fit(RunSet.create(fitting.curricula, losses, fitting.train_ids,
                                                          fitting.test_ids, meta=fitting.meta))
    assert spoiled.chosen_ridge == clean.chosen_ridge
    others = slice(1, None)
    error = {name: float(np.mean((model.simulate(heldout.curricula, heldout.initial_losses)[:, 1:, others]
                                  - heldout.losses[:, 1:, others]) ** 2))
             for name, model in (("clean", clean), ("spoiled", spoiled))}
    assert error["spoiled"] <= 1.05 * error["clean"], error


def test_non_negative_losses_are_never_simulated_below_zero():
    from simfluence.simulators import AdditiveSimulator

    runs, _, _ = linear_runs(num_runs=8, num_steps=30)
    model = AdditiveSimulator(ridge=1e-3).fit(runs)
    long = np.tile(runs.curricula[:1], (1, 20, 1))   # 600 steps of mostly helpful examples
    raw = model._simulate(long, runs.initial_losses[:1].astype(np.float64))
    assert raw.min() < 0   # what the recurrence itself extrapolates to
    with pytest.warns(UserWarning, match="extrapolating"):
        clipped = model.simulate(long, runs.initial_losses[:1])
    assert clipped.min() == 0 and np.array_equal(clipped, np.maximum(raw, 0))
