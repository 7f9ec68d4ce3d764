"""Prediction intervals of ``linear-bootstrap``: coverage against a known model, persistence, errors."""

import numpy as np
import pytest

from simfluence import RunDataError
from simfluence.simulators import LinearIdentitySimulator, Simulator, make_simulator
from simfluence.simulators.uncertainty import BootstrapLinearSimulator, interval_coverage

from synthetic import linear_runs


@pytest.fixture(scope="module")
def known_model():
    """Fitted on 30 runs of a known Simfluence-Linear model; 150 fresh runs of the same model held out."""
    runs, _, _ = linear_runs(num_runs=180, num_steps=30, noise=1e-2, seed=3)
    fitting, heldout = runs.select(np.arange(30)), runs.select(np.arange(30, 180))
    return BootstrapLinearSimulator(replicas=16).fit(fitting), fitting, heldout


def test_90_percent_interval_covers_fresh_runs_of_the_true_model(known_model):
    simulator, _, heldout = known_model
    lower, prediction, upper = simulator.simulate_interval(heldout.curricula, heldout.initial_losses, level=0.9)
    coverage = interval_coverage(lower, upper, heldout)
    assert 0.85 <= coverage["coverage"] <= 0.95
    assert 0.8 <= coverage["final_coverage"] <= 0.97
    assert np.all(lower <= prediction) and np.all(prediction <= upper)
    # A narrower level must cover less and a wider one more: the band is not a fixed width.
    narrow = interval_coverage(*simulator.simulate_interval(heldout.curricula, heldout.initial_losses, 0.5)[::2],
                               heldout)
    assert 0.4 <= narrow["coverage"] <= 0.6 and narrow["width"] < coverage["width"]


def blended(plain, fitting, initial, weights):
    """``mu + w (plain - mu)``, ``mu`` the mean trajectory of ``fitting`` from ``initial`` (a loop)."""
    change = np.mean([run - run[0] for run in fitting.losses.astype(np.float64)], axis=0)
    mean = np.stack([start + change for start in initial.astype(np.float64)])
    return mean + weights * (plain - mean)


def test_prediction_is_the_full_data_linear_identity_fit(known_model):
    """The same fit and blend with the mean trajectory (nest_mean) as linear-identity's."""
    simulator, fitting, heldout = known_model
    linear = LinearIdentitySimulator().fit(fitting)
    assert linear.chosen_ridge == simulator.chosen_ridge and np.array_equal(linear.blend_, simulator.blend_)
    reference = LinearIdentitySimulator(ridge=simulator.chosen_ridge).fit(fitting)
    plain = reference.simulate(heldout.curricula, heldout.initial_losses)
    expected = blended(plain, fitting, heldout.initial_losses, simulator.blend_)
    assert np.allclose(simulator.simulate(heldout.curricula, heldout.initial_losses), expected, atol=1e-5)


def test_replicas_are_ridge_fits_on_resampled_runs(known_model):
    simulator, fitting, heldout = known_model
    draws = np.random.default_rng(simulator.config.seed).integers(0, fitting.num_runs, (simulator.config.replicas, fitting.num_runs))
    refit = LinearIdentitySimulator(ridge=simulator.chosen_ridge, tol=1e-7).fit(fitting.select(draws[3]))
    replicas = simulator.simulate_replicas(heldout.curricula[:5], heldout.initial_losses[:5])
    assert replicas.shape == (simulator.config.replicas, 5, heldout.num_steps + 1, heldout.num_test)
    plain = refit.simulate(heldout.curricula[:5], heldout.initial_losses[:5])
    # Blended as the point prediction is: the full fit's weights and mean trajectory, not the resample's.
    expected = blended(plain, fitting, heldout.initial_losses[:5], simulator.blend_)
    assert np.allclose(replicas[3], expected, atol=1e-4)
    assert replicas.std(axis=0)[:, 1:].min() > 0  # replicas differ: the epistemic part is not zero


def test_noise_term_tracks_the_true_noise_level():
    """Residual noise dominates when the per-step noise is large; the band widens with it."""
    widths = {}
    for noise in (1e-3, 3e-2):
        runs, _, _ = linear_runs(num_runs=40, num_steps=30, noise=noise, seed=4)
        fitting, heldout = runs.select(np.arange(30)), runs.select(np.arange(30, 40))
        simulator = BootstrapLinearSimulator(replicas=8).fit(fitting)
        lower, _, upper = simulator.simulate_interval(heldout.curricula, heldout.initial_losses)
        widths[noise] = interval_coverage(lower, upper, heldout)["width"]
        # A random walk of T steps with per-step std noise spreads by about noise * sqrt(T).
        assert simulator.noise_variance[-1].mean() == pytest.approx(noise**2 * 30, rel=0.5)
    assert widths[3e-2] > 5 * widths[1e-3]


def test_save_load_round_trip_keeps_every_replica(tmp_path, known_model):
    simulator, _, heldout = known_model
    path = simulator.save(tmp_path / "bootstrap.npz")
    with np.load(path, allow_pickle=False) as stored:
        assert stored["state.replica_tables"].shape == (16, heldout.num_train, 2 * heldout.num_test)
    loaded = Simulator.load(path)
    assert isinstance(loaded, BootstrapLinearSimulator) and loaded.config.replicas == 16
    before = simulator.simulate_interval(heldout.curricula[:3], heldout.initial_losses[:3], 0.8)
    after = loaded.simulate_interval(heldout.curricula[:3], heldout.initial_losses[:3], 0.8)
    for x, y in zip(before, after):
        assert np.array_equal(x, y)
    single = loaded.simulate_interval(heldout.curricula[0], heldout.initial_losses[0], 0.8)
    assert all(np.allclose(s, b[0]) for s, b in zip(single, before))


def test_errors_name_the_argument_and_the_fix(tmp_path, known_model):
    simulator, _, heldout = known_model
    with pytest.raises(ValueError, match="level must lie strictly between 0 and 1"):
        simulator.simulate_interval(heldout.curricula, heldout.initial_losses, level=90)
    with pytest.raises(RunDataError, match="initial_losses"):
        simulator.simulate_interval(heldout.curricula, heldout.initial_losses[:, :2])
    with pytest.raises(ValueError, match="replicas: expected an integer >= 4"):
        make_simulator("linear-bootstrap", replicas=2)
    few, _, _ = linear_runs(num_runs=3, num_steps=10)
    with pytest.raises(RunDataError, match="at least 4 fitting runs"):
        BootstrapLinearSimulator(ridge=0.1).fit(few)
    path = simulator.save(tmp_path / "model.npz")
    arrays = dict(np.load(path, allow_pickle=False))
    arrays["state.noise_variance"] = arrays["state.noise_variance"][:, :2]
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(RunDataError, match="field 'state'.*noise_variance"):
        Simulator.load(tmp_path / "broken.npz")


def test_cli_fits_bootstrap_and_writes_intervals(tmp_path):
    from click.testing import CliRunner

    from simfluence.cli import main
    from simfluence.runs import save_runs

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    runs, _, _ = linear_runs(num_runs=14, seed=1)
    save_runs(runs.select(np.arange(10)), tmp_path / "fit.npz")
    save_runs(runs.select(np.arange(10, 14)), tmp_path / "heldout.npz")
    result = invoke("fit", tmp_path / "fit.npz", "--method", "linear-bootstrap", "--out", tmp_path / "boot.npz")
    assert result.exit_code == 0, result.output
    result = invoke("simulate", tmp_path / "boot.npz", tmp_path / "heldout.npz", "--interval", 0.9,
                    "--out", tmp_path / "t.npz")
    assert result.exit_code == 0, result.output
    expected = Simulator.load(tmp_path / "boot.npz").simulate_interval(runs.curricula[10:], runs.initial_losses[10:])
    with np.load(tmp_path / "t.npz") as out:
        for name, array in zip(("lower", "trajectories", "upper"), expected):
            assert np.array_equal(out[name], array)
    result = invoke("simulate", tmp_path / "boot.npz", tmp_path / "heldout.npz", "--interval", 1.5,
                    "--out", tmp_path / "t.npz")
    assert result.exit_code == 2 and "level must lie strictly between 0 and 1" in result.output
    invoke("fit", tmp_path / "fit.npz", "--method", "linear-identity", "--out", tmp_path / "plain.npz")
    result = invoke("simulate", tmp_path / "plain.npz", tmp_path / "heldout.npz", "--interval", 0.9,
                    "--out", tmp_path / "t.npz")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--interval" in result.output and "linear-bootstrap" in result.output
