import json

import numpy as np
import pytest
import torch

from simfluence import RunDataError
from simfluence.simulators import (LinearIdentitySimulator, LinearSimulator, NotFittedError, Simulator,
                                   make_simulator)

from synthetic import linear_runs

# Simulators that learn from runs alone (gradient methods need a real task: test_gradient.py).
RUN_ONLY = ("linear", "linear-identity", "additive", "mean-trajectory", "constant")


def python_rollout(a, b, curricula, initial, alpha_offset, batch_size=None):
    """Plain loop over runs, steps and batch slots: the reference for the vectorised rollout.

    With ``batch_size`` n, a step of k examples weighs each n / k (a batch-mean loss).
    """
    runs, steps, _ = curricula.shape
    out = np.zeros((runs, steps + 1, initial.shape[1]))
    for r in range(runs):
        loss = initial[r].astype(np.float64)
        out[r, 0] = loss
        for t in range(steps):
            alpha = np.full(loss.shape, alpha_offset) if a is not None else np.ones_like(loss)
            beta = np.zeros_like(loss)
            present = int((curricula[r, t] >= 0).sum())
            weight = 1.0 if batch_size is None or present == 0 else batch_size / present
            for i in curricula[r, t]:
                if i < 0:
                    continue
                if a is not None:
                    alpha = alpha + weight * a[i]
                beta = beta + weight * b[i]
            loss = alpha * loss + beta
            out[r, t + 1] = loss
    return out


@pytest.mark.parametrize("batch_mean", [True, False])
@pytest.mark.parametrize("kind", ["linear", "linear-identity", "additive"])
def test_rollout_matches_python_loop(kind, batch_mean):
    runs, _, _ = linear_runs(seed=1)
    simulator = make_simulator(kind, ridge=0.1, dtype="float64", batch_mean=batch_mean).fit(runs)
    a, b = simulator.coefficients
    curricula = runs.curricula.copy()
    curricula[0, 5, 1:] = -1       # a step that lost 3 of its 4 examples
    curricula[1, 2, 2] = -1        # and one that lost 1
    expected = python_rollout(a, b, curricula, runs.initial_losses, simulator.alpha_offset,
                              runs.batch_size if batch_mean else None)
    raw = simulator._simulate(curricula, runs.initial_losses.astype(np.float64))   # the recurrence itself
    assert raw.shape == expected.shape and raw.dtype == np.float32
    assert np.allclose(raw, expected, rtol=1e-5, atol=1e-5)
    got = simulator.simulate(curricula, runs.initial_losses)   # the fitting losses are >= 0: floored at 0
    assert got.dtype == np.float32 and np.array_equal(got, np.maximum(raw, 0))
    single = simulator.simulate(curricula[0], runs.initial_losses[0])
    assert np.allclose(single, got[0])


def test_linear_recovers_known_model_and_beats_baselines():
    runs, a, b = linear_runs(num_runs=40, num_steps=60, noise=1e-4, seed=2)
    fitting, heldout = runs.select(np.arange(32)), runs.select(np.arange(32, 40))
    errors = {}
    for kind in RUN_ONLY:
        predicted = make_simulator(kind).fit(fitting).simulate(heldout.curricula, heldout.initial_losses)
        errors[kind] = float(np.mean((predicted[:, 1:] - heldout.losses[:, 1:]) ** 2))
    assert errors["linear-identity"] < errors["additive"] < errors["mean-trajectory"] < errors["constant"]
    assert errors["mean-trajectory"] > 20 * errors["linear-identity"]
    assert errors["linear"] < errors["mean-trajectory"] / 5


def test_cross_validation_chooses_from_grid_on_fitting_runs_only():
    runs, _, _ = linear_runs(seed=3)
    simulator = LinearIdentitySimulator(ridge_grid=(0.01, 1.0, 100.0)).fit(runs)
    scores = simulator.fit_info["cv_scores"]
    assert len(scores) == 3
    best = min(scores, key=scores.get)
    assert np.isclose(float(best), simulator.chosen_ridge, rtol=1e-5)
    with pytest.raises(RunDataError, match="at least 2"):
        LinearSimulator().fit(runs.select([0]))
    LinearSimulator(ridge=1.0).fit(runs.select([0]))  # an explicit ridge needs no folds


@pytest.mark.parametrize("kind", RUN_ONLY)
def test_save_load_round_trip_without_pickle(tmp_path, kind):
    runs, _, _ = linear_runs(seed=4)
    simulator = make_simulator(kind, **({"ridge": 0.3} if kind not in ("constant", "mean-trajectory") else {}))
    simulator.fit(runs)
    path = simulator.save(tmp_path / "model.npz")
    with np.load(path, allow_pickle=False) as archive:
        assert all(archive[name].dtype != object for name in archive.files)
    loaded = Simulator.load(path)
    assert type(loaded) is type(simulator) and loaded.fit_info == json.loads(json.dumps(simulator.fit_info))
    assert np.array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                          simulator.simulate(runs.curricula, runs.initial_losses))


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", config=np.array(json.dumps({"format": "simfluence-simulator", "version": 1,
                                                              "kind": "nope"})),
             train_ids=np.array(["a"]), test_ids=np.array(["b"]), mean_change=np.zeros((2, 1)))
    with pytest.raises(RunDataError, match="unknown simulator 'nope'"):
        Simulator.load(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", config=np.array(json.dumps({"format": "simfluence-simulator", "version": 1,
                                                              "kind": "linear"})),
             train_ids=np.array(["a"]), test_ids=np.array(["b"]), mean_change=np.zeros((2, 1)),
             **{"state.table": np.zeros((3, 3))})
    with pytest.raises(RunDataError, match="state"):
        Simulator.load(tmp_path / "y.npz")
    np.savez(tmp_path / "z.npz", curricula=np.zeros(3))
    with pytest.raises(RunDataError, match="config.*missing"):
        Simulator.load(tmp_path / "z.npz")


def _old_file(path, out, edit):
    """A copy of the saved simulator ``path`` with its config changed by ``edit``, checksums still valid."""
    from simfluence.simulators.base import config_checksum

    with np.load(path, allow_pickle=False) as saved:
        arrays = dict(saved)
    config = json.loads(str(arrays["config"]))
    edit(config)
    config["config_checksum"] = config_checksum(config)
    np.savez(out, **{**arrays, "config": np.array(json.dumps(config))})
    return out


@pytest.mark.parametrize("kind", ["linear-identity", "auto"])
def test_a_retired_setting_loads_only_at_its_old_value(tmp_path, monkeypatch, kind):
    """SimulatorConfig.retired: also for the model an ``auto`` file holds."""
    from simfluence.simulators.linear import LinearConfig

    monkeypatch.setattr(LinearConfig, "retired", {"old": 0, "ignored": None})
    runs, _, _ = linear_runs(seed=4)
    params = {"candidates": ["linear-identity"]} if kind == "auto" else {"ridge": 0.3}
    simulator = make_simulator(kind, **params).fit(runs)
    path = simulator.save(tmp_path / "model.npz")

    def holding(**old):
        def edit(config):
            (config["fitted"]["chosen_params"] if kind == "auto" else config["params"]).update(old)
        return edit

    loaded = Simulator.load(_old_file(path, tmp_path / "old.npz", holding(old=0, ignored="x")))
    assert np.array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                          simulator.simulate(runs.curricula, runs.initial_losses))
    with pytest.raises(RunDataError, match=r"config\.params.*old: this setting was removed; only 0 .*got 3"):
        Simulator.load(_old_file(path, tmp_path / "new.npz", holding(old=3)))


def test_simulate_validates_inputs():
    runs, _, _ = linear_runs(seed=5)
    with pytest.raises(NotFittedError):
        LinearSimulator().simulate(runs.curricula, runs.initial_losses)
    simulator = LinearSimulator(ridge=1.0).fit(runs)
    with pytest.raises(RunDataError, match="curricula.*out of range"):
        simulator.simulate(runs.curricula + runs.num_train, runs.initial_losses)
    with pytest.raises(RunDataError, match="initial_losses.*shape"):
        simulator.simulate(runs.curricula, runs.initial_losses[:, :2])
    bad = runs.initial_losses.copy()
    bad[0, 0] = np.nan
    with pytest.raises(RunDataError, match="initial_losses.*NaN"):
        simulator.simulate(runs.curricula, bad)
    with pytest.raises(ValueError, match="ridge"):
        LinearSimulator(ridge=-1.0)
    with pytest.raises(ValueError, match="unknown simulator"):
        make_simulator("magic")


def test_fit_on_sparse_evaluations_uses_consecutive_pairs_only():
    runs, _, _ = linear_runs(num_steps=30, seed=6)
    keep = np.array([0, 1, 2, 10, 11, 20, 30])
    sparse = type(runs).create(runs.curricula, runs.losses[:, keep], runs.train_ids, runs.test_ids, eval_steps=keep)
    simulator = LinearIdentitySimulator(ridge=0.1).fit(sparse)
    assert simulator.simulate(sparse.curricula, sparse.initial_losses).shape == (runs.num_runs, 31, runs.num_test)
    none = type(runs).create(runs.curricula, runs.losses[:, [0, 10, 30]], runs.train_ids, runs.test_ids,
                             eval_steps=[0, 10, 30])
    with pytest.raises(RunDataError, match="eval_steps.*consecutive"):
        LinearIdentitySimulator(ridge=0.1).fit(none)


def test_batch_mean_changes_nothing_on_full_batches_and_fits_ragged_runs_as_a_batch_mean_loss():
    """Full batches: the same fit either way. Ragged steps: fitted with weights n / k (dense reference)."""
    from dense import dense_design

    from simfluence.simulators.design import BatchDesign

    runs, _, _ = linear_runs(seed=6)
    kwargs = dict(ridge=0.2, dtype="float64", tol=1e-12)
    on = make_simulator("linear-identity", batch_mean=True, **kwargs).fit(runs)
    off = make_simulator("linear-identity", batch_mean=False, **kwargs).fit(runs)
    np.testing.assert_allclose(on.table.numpy(), off.table.numpy(), rtol=1e-9, atol=1e-12)

    batches = np.array([[0, 1, 2, 3], [4, 5, -1, -1], [6, -1, -1, 6]])
    weights = np.array([[1.0], [2.0], [2.0]])   # n / k: 4/4, 4/2, 4/2
    design = BatchDesign(batches, 8, batch_size=4)
    table = np.arange(16.0).reshape(8, 2)
    np.testing.assert_allclose(design.matmul(torch.as_tensor(table)).numpy(),
                               (weights * dense_design(batches, 8)) @ table)
    np.testing.assert_allclose(design.occurrences.numpy(), (weights * dense_design(batches, 8)).sum(axis=0))
