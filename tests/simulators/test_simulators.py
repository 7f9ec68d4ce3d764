import json

import numpy as np
import pytest
import torch
from dense import python_rollout, with_array, without_array
from synthetic import linear_runs

from simfluence import RunDataError
from simfluence.simulators import LinearIdentitySimulator, LinearSimulator, NotFittedError, Simulator, make_simulator

# Simulators that learn from runs alone (gradient methods need a real task: test_gradient.py).
RUN_ONLY = ("linear", "linear-identity", "additive", "mean-trajectory", "constant")


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
    scores, grid = simulator.fit_info["cv_scores"], simulator.fit_info["cv_grid"]
    # The grid given (times the mean occurrence count), extended below: the near noise-free truth
    # wants ever weaker ridges, so the lower edge is extended as far as allowed (3 values, x10 each).
    scale = 12 * 30 * 4 / 40
    assert np.allclose(grid, scale * np.array([1e-5, 1e-4, 1e-3, 1e-2, 1.0, 100.0]))
    assert np.allclose(sorted(float(key) for key in scores), grid, rtol=1e-5)
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


# --- the mean-trajectory blend (nest_mean) and the extended ridge grid ------------------------
def noise_runs(num_runs=30, num_steps=30, num_train=40, num_test=8, batch=4, noise=0.03, seed=0):
    """Losses that follow one decay curve per test example plus i.i.d. noise: no curriculum effect.

    ``L^r_t = L_0 - d_m (1 - exp(-t / 10)) + eps``, ``eps ~ N(0, noise^2)`` per (run, step, test
    example), whatever the batches hold; the mean trajectory is the best any simulator can do.
    """
    from simfluence.runs.log import RunSet

    rng = np.random.default_rng(seed)
    curricula = rng.integers(0, num_train, (num_runs, num_steps, batch))
    initial = 2.0 + rng.random(num_test)
    drop = 0.5 + rng.random(num_test)
    curve = initial - drop * (1 - np.exp(-np.arange(num_steps + 1) / 10))[:, None]
    losses = curve[None] + rng.normal(0, noise, (num_runs, num_steps + 1, num_test))
    losses[:, 0] = initial
    return RunSet.create(curricula, losses, [f"train-{i}" for i in range(num_train)],
                         [f"test-{m}" for m in range(num_test)])


def reference_mean(fitting, initial, num_steps):
    """``L_0 + mean_r (L^r_t - L^r_0)`` ``[R, T + 1, M]`` by a loop (every step recorded)."""
    change = np.mean([run[:num_steps + 1] - run[0] for run in fitting.losses.astype(np.float64)], axis=0)
    return np.stack([start + change for start in initial.astype(np.float64)])


@pytest.mark.parametrize("kind", ["linear", "linear-identity"])
def test_blend_stays_at_one_on_runs_of_an_exact_linear_model(kind):
    offset = {"linear": 0.0, "linear-identity": 1.0}[kind]
    runs, _, _ = linear_runs(num_runs=24, noise=1e-5, seed=11, alpha_offset=offset)
    fitting, heldout = runs.select(np.arange(18)), runs.select(np.arange(18, 24))
    nested = make_simulator(kind, dtype="float64").fit(fitting)
    plain = make_simulator(kind, dtype="float64", nest_mean=False).fit(fitting)
    assert nested.blend_.shape == (runs.num_test,) and nested.blend_.min() >= 0.99
    assert nested.fit_info["blend_median"] >= 0.99 and np.array_equal(plain.blend_, np.ones(runs.num_test))
    assert nested.chosen_ridge == plain.chosen_ridge
    got = nested.simulate(heldout.curricula, heldout.initial_losses)
    want = plain.simulate(heldout.curricula, heldout.initial_losses)
    kept = nested.blend_ == 1
    assert kept.any() and np.array_equal(got[:, :, kept], want[:, :, kept])   # weight 1: the plain rollout itself
    mse = {name: float(np.mean((x[:, 1:] - heldout.losses[:, 1:]) ** 2)) for name, x in (("got", got), ("want", want))}
    assert mse["got"] <= 1.05 * mse["want"]


@pytest.mark.parametrize("kind", ["linear", "linear-identity", "additive"])
def test_blend_falls_back_to_the_mean_trajectory_when_curricula_do_not_matter(kind):
    from simfluence.evaluate import score

    runs = noise_runs(seed=1)
    fitting, heldout = runs.select(np.arange(22)), runs.select(np.arange(22, 30))
    nested = make_simulator(kind).fit(fitting)
    plain = make_simulator(kind, nest_mean=False).fit(fitting)
    assert (nested.blend_ < 1).mean() >= 0.75 and nested.fit_info["blend_below_1"] == int((nested.blend_ < 1).sum())
    mean = reference_mean(fitting, heldout.initial_losses, heldout.num_steps)
    baseline = score(mean, heldout).mse
    nested_mse = score(nested.simulate(heldout.curricula, heldout.initial_losses), heldout).mse
    plain_mse = score(plain.simulate(heldout.curricula, heldout.initial_losses), heldout).mse
    assert nested_mse <= 1.01 * baseline and nested_mse < plain_mse


@pytest.mark.parametrize("kind", ["linear", "linear-identity", "additive"])
def test_blended_simulate_is_mean_plus_weighted_rollout_deviation(kind):
    runs = noise_runs(seed=2, noise=0.05)
    fitting, heldout = runs.select(np.arange(22)), runs.select(np.arange(22, 30))
    simulator = make_simulator(kind, dtype="float64", space="loss").fit(fitting)   # other spaces: test_linear_spaces
    weights = simulator.blend_
    assert (weights < 1).any() and ((weights >= 0) & (weights <= 1)).all()
    curricula = heldout.curricula.copy()
    curricula[0, 3, 1:] = -1   # a ragged step: batch-mean weights
    a, b = simulator.coefficients
    rolled = python_rollout(a, b, curricula, heldout.initial_losses, simulator.alpha_offset, runs.batch_size)
    mean = reference_mean(fitting, heldout.initial_losses, heldout.num_steps)
    expected = mean + weights * (rolled - mean)
    got = simulator._simulate(curricula, heldout.initial_losses.astype(np.float64))
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Past the fitting runs' last step the mean trajectory holds its last change.
    longer = np.concatenate([curricula, curricula[:, :5]], axis=1)
    extra = simulator._simulate(longer, heldout.initial_losses.astype(np.float64))
    rolled = python_rollout(a, b, longer, heldout.initial_losses, simulator.alpha_offset, runs.batch_size)
    mean = np.concatenate([mean, np.repeat(mean[:, -1:], 5, axis=1)], axis=1)
    assert np.allclose(extra, mean + weights * (rolled - mean), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "linear-identity", "additive"])
def test_column_rollout_equals_slicing_the_blended_simulation(kind):
    runs = noise_runs(seed=3, noise=0.05)
    simulator = make_simulator(kind).fit(runs)
    weights = simulator.blend_
    assert (weights < 1).any()
    columns = np.array([5, 0, 3])
    run = simulator.column_rollout(columns)
    curricula = runs.curricula[:4].copy()
    curricula[1, 2, :2] = -1
    initial = runs.initial_losses[:4].astype(np.float64)
    np.testing.assert_allclose(run(curricula, initial), simulator._simulate(curricula, initial)[:, :, columns],
                               rtol=1e-6, atol=1e-6)


def test_save_load_keeps_the_blend(tmp_path):
    runs = noise_runs(seed=4, noise=0.05)
    simulator = make_simulator("linear-identity").fit(runs)
    assert (simulator.blend_ < 1).any()
    path = simulator.save(tmp_path / "model.npz")
    loaded = Simulator.load(path)
    assert np.array_equal(loaded.blend_, simulator.blend_)
    assert np.array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                          simulator.simulate(runs.curricula, runs.initial_losses))
    # A file saved before the blend: the plain recurrence.
    old = Simulator.load(without_array(path, tmp_path / "old.npz", "state.blend"))
    assert np.array_equal(old.blend_, np.ones(runs.num_test))
    plain = old.table.cpu().numpy()
    a, b = plain[:, :runs.num_test], plain[:, runs.num_test:]
    expected = python_rollout(a, b, runs.curricula, runs.initial_losses, 1.0, runs.batch_size)
    assert np.allclose(old._simulate(runs.curricula, runs.initial_losses.astype(np.float64)), expected, atol=1e-5)


@pytest.mark.parametrize("blend", [np.full(3, 0.5), np.full(8, 1.5)])
def test_load_rejects_a_broken_blend(tmp_path, blend):
    runs = noise_runs(seed=4, noise=0.05)
    path = make_simulator("linear-identity", ridge=1.0).fit(runs).save(tmp_path / "model.npz")
    with_array(path, tmp_path / "bad.npz", "state.blend", blend)
    with pytest.raises(RunDataError, match="state.*blend"):
        Simulator.load(tmp_path / "bad.npz")


def test_ridge_grid_is_extended_past_the_edge_the_best_value_lies_on():
    runs = noise_runs(seed=5)
    scale = float(runs.num_runs * runs.num_steps * runs.batch_size / runs.num_train)
    simulator = make_simulator("linear-identity", ridge_grid=(1e-5,), nest_mean=False).fit(runs)
    grid = simulator.fit_info["cv_grid"]
    # No curriculum effect: a far stronger ridge than the single given value wins, reached by steps of x10.
    assert simulator.chosen_ridge >= 99e-5 * scale and np.isclose(grid[0], 1e-5 * scale)
    assert np.allclose(np.diff(np.log10(grid)), 1.0) and len(grid) <= 4
    scores = simulator.fit_info["cv_scores"]
    assert min(scores, key=scores.get) == f"{simulator.chosen_ridge:.6g}"


def test_cross_validate_extends_to_an_interior_minimum_and_stops_after_three_steps():
    """Tables of known error: B = (log10(value) - log10(target)) / T everywhere, on runs whose losses stay."""
    from simfluence.runs.log import RunSet
    from simfluence.simulators.linear import cross_validate

    rng = np.random.default_rng(0)
    num_train, num_test, steps = 5, 2, 4
    curricula = rng.integers(0, num_train, (6, steps, 1))
    runs = RunSet.create(curricula, np.ones((6, steps + 1, num_test)), [f"t{i}" for i in range(num_train)],
                         [f"e{m}" for m in range(num_test)])
    calls = []

    def tables_for(target):
        def tables(fitting, values):
            calls.append(list(values))
            for value in values:
                yield torch.full((num_train, num_test), float(np.log10(value / target)), dtype=torch.float64)
        return tables

    # Squared error of a rollout L_t = 1 + t b: mean over t of (t b)^2, least at b = 0 (value = target).
    chosen = cross_validate(runs, [1.0, 10.0], tables_for(1e3), 3, 0, fit_alpha=False)
    assert chosen.best == pytest.approx(1e3) and chosen.extended == (0, 3)
    assert np.allclose(chosen.grid, [1.0, 10.0, 100.0, 1e3, 1e4])
    assert calls[0] == [10.0, 1.0] and all(len(values) == 1 for values in calls[3:]) and len(calls) == 3 + 3 * 3
    expected = {f"{v:.6g}": np.mean([(t * np.log10(v / 1e3)) ** 2 for t in range(1, steps + 1)]) for v in chosen.grid}
    assert chosen.scores.keys() == expected.keys()
    assert all(chosen.scores[key] == pytest.approx(value) for key, value in expected.items())
    beyond = cross_validate(runs, [1.0, 10.0], tables_for(1e9), 3, 0, fit_alpha=False)
    assert beyond.best == pytest.approx(1e4) and beyond.extended == (0, 3)   # bounded: 3 values per side
    below = cross_validate(runs, [1.0], tables_for(1e-2), 3, 0, fit_alpha=False)
    assert below.best == pytest.approx(1e-2) and below.extended == (3, 1)
    fixed = cross_validate(runs, [1.0, 10.0], tables_for(1e3), 3, 0, fit_alpha=False, max_extensions=0)
    assert fixed.best == 10.0 and fixed.grid == [1.0, 10.0]


@pytest.mark.parametrize("kind", ["linear-identity", "additive"])
def test_nest_mean_off_is_the_plain_cross_validated_recurrence(kind):
    """Scores against explicit-ridge fits scored by hand; the prediction is the plain rollout."""
    from simfluence.simulators.linear import example_scales

    runs = noise_runs(seed=6, noise=0.05)
    grid = (1e-2, 1e-1, 1.0)
    simulator = make_simulator(kind, ridge_grid=grid, nest_mean=False, cv_folds=3, dtype="float64", tol=1e-10,
                               space="loss").fit(runs)   # the loss-space criterion (other spaces: test_linear_spaces)
    assert np.array_equal(simulator.blend_, np.ones(runs.num_test)) and simulator.fit_info["blend_below_1"] == 0
    scale = runs.num_runs * runs.num_steps * runs.batch_size / runs.num_train
    folds = np.array_split(np.random.default_rng(0).permutation(runs.num_runs), 3)
    scales = example_scales(runs)
    for key, score in simulator.fit_info["cv_scores"].items():
        errors = []
        for fold in folds:
            fitting, held = runs.select(np.setdiff1d(np.arange(runs.num_runs), fold)), runs.select(fold)
            fit = make_simulator(kind, ridge=float(key), dtype="float64", tol=1e-10).fit(fitting)
            predicted = fit._simulate(held.curricula, held.initial_losses.astype(np.float64))
            errors.append(np.mean(((predicted[:, 1:] - held.losses[:, 1:]) ** 2).mean(axis=(0, 1)) / scales))
        assert score == pytest.approx(np.mean(errors), rel=1e-4)
    assert any(np.isclose(float(key), scale * np.array(grid)).any() for key in simulator.fit_info["cv_scores"])
    a, b = simulator.coefficients
    expected = python_rollout(a, b, runs.curricula, runs.initial_losses, simulator.alpha_offset, runs.batch_size)
    assert np.allclose(simulator._simulate(runs.curricula, runs.initial_losses.astype(np.float64)), expected,
                       atol=1e-5)


def test_a_given_ridge_keeps_the_plain_recurrence():
    runs = noise_runs(seed=7, noise=0.05)
    simulator = make_simulator("linear-identity", ridge=0.5).fit(runs)
    assert np.array_equal(simulator.blend_, np.ones(runs.num_test)) and simulator.fit_info["cv_grid"] is None
