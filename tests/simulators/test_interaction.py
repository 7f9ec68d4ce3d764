"""``linear-pairwise``: features, inner solver, chunking, nesting, round choice, recovery, persistence.

Pair features against a brute-force loop, the inner solver against a dense solve, chunked against
unchunked fits, nesting of linear-identity, the round choice that protects the across-run ranking,
recovery of a known supermodular interaction that Linear cannot express, the real-training two-key
case, persistence, errors.
"""

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark
from dense import dense_design

from simfluence import RunDataError, RunSet
from simfluence.simulators import LinearIdentitySimulator, Simulator, interaction, make_simulator
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.interaction import PairwiseSimulator, pair_features, solve_pair_ridge, symmetric_basis

GROUP_A, GROUP_B = (0, 1), (2, 3)
INTERACTING = 3  # test examples 0..2 gain from (A, B) pairs


def brute_force_pairs(curricula: np.ndarray, pair: np.ndarray, window: int | None) -> np.ndarray:
    """``[R, T, M]``: sum of ``pair[i, j]`` over the pairs each step completes, by explicit loops."""
    runs, steps, _ = curricula.shape
    out = np.zeros((runs, steps, pair.shape[2]))
    for r in range(runs):
        for t in range(steps):
            first = 0 if window is None else max(0, t - window)
            earlier = [j for s in range(first, t) for j in curricula[r, s] if j >= 0]
            batch = [i for i in curricula[r, t] if i >= 0]
            for slot, i in enumerate(batch):
                for j in earlier + batch[slot + 1:]:
                    out[r, t] += pair[i, j]
    return out


def supermodular_runs(num_runs=60, num_steps=30, num_train=30, num_test=6, noise=1e-3, seed=0, strength=-0.02):
    """Linear-identity runs plus ``strength`` on test examples 0..2 for every (A, B) co-occurrence in a run.

    Each run drops group A and/or group B from its pool at random. Returns (runs, a, b, pair).
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.003, (num_train, num_test))
    b = rng.normal(-0.01, 0.005, (num_train, num_test))
    pair = np.zeros((num_train, num_train, num_test))
    for i in GROUP_A:
        for j in GROUP_B:
            pair[i, j, :INTERACTING] = pair[j, i, :INTERACTING] = strength
    keep = rng.random((num_runs, 2)) < 0.5
    curricula = np.stack([rng.choice([i for i in range(num_train) if not (i in GROUP_A and not keep[r, 0])
                                      and not (i in GROUP_B and not keep[r, 1])], (num_steps, 3))
                          for r in range(num_runs)])
    losses = true_rollout(a, b, pair, curricula, np.full((num_runs, num_test), 2.0))
    losses[:, 1:] += np.cumsum(rng.normal(0, noise, losses[:, 1:].shape), axis=1)
    runs = RunSet.create(curricula, losses, [f"train-{i}" for i in range(num_train)],
                         [f"test-{m}" for m in range(num_test)])
    return runs, a, b, pair


def true_rollout(a, b, pair, curricula, initial):
    """``[R, T + 1, M]`` losses of the generating model: Linear-identity plus the pair terms ``pair``."""
    gamma = brute_force_pairs(curricula, pair, None)
    losses = np.zeros((curricula.shape[0], curricula.shape[1] + 1, initial.shape[1]))
    losses[:, 0] = initial
    for t in range(curricula.shape[1]):
        batch = curricula[:, t]
        alpha = 1 + np.where(batch[..., None] >= 0, a[batch], 0).sum(1)
        beta = np.where(batch[..., None] >= 0, b[batch], 0).sum(1)
        losses[:, t + 1] = alpha * losses[:, t] + beta + gamma[:, t]
    return losses


def without(curricula: np.ndarray, groups) -> np.ndarray:
    """``curricula`` with the examples of ``groups`` padded out."""
    out = curricula.copy()
    for group in groups:
        out[np.isin(out, group)] = -1
    return out


@pytest.mark.parametrize("window", [None, 0, 3])
def test_pair_features_match_brute_force_pairs(window):
    """``<V, F_t>`` equals the sum of ``u_i^T V u_j`` over the pairs each step completes."""
    rng = np.random.default_rng(1)
    curricula = rng.integers(0, 12, (3, 9, 4))
    curricula[0, 2, 1:] = -1
    embeddings = torch.randn(12, 3, dtype=torch.float64)
    interactions = torch.randn(3, 3, 5, dtype=torch.float64)
    interactions = interactions + interactions.transpose(0, 1)
    pair = np.einsum("ik,klm,jl->ijm", embeddings.numpy(), interactions.numpy(), embeddings.numpy())
    got = (pair_features(embeddings, curricula, window) @ interactions.reshape(9, 5)).numpy()
    assert np.allclose(got, brute_force_pairs(curricula, pair, window), atol=1e-10)


def test_symmetric_basis_keeps_the_pair_term_and_its_penalty():
    """``g = F E``, ``V = E w``: ``<V, F> = g . w`` and ``|V|^2 = |w|^2`` for symmetric ``F`` and ``V``."""
    rng = np.random.default_rng(2)
    basis = symmetric_basis(3)
    assert basis.shape == (9, 6)
    features = torch.as_tensor(rng.normal(size=(5, 3, 3)))
    features = (features + features.transpose(1, 2)).reshape(5, 9)
    weights = torch.as_tensor(rng.normal(size=(6, 2)))
    interactions = basis @ weights
    assert torch.allclose(interactions.reshape(3, 3, 2), interactions.reshape(3, 3, 2).transpose(0, 1))
    assert torch.allclose(features @ interactions, (features @ basis) @ weights)
    assert torch.allclose(interactions.square().sum(0), weights.square().sum(0))


@pytest.mark.parametrize("warm", [False, True])
def test_solve_pair_ridge_matches_a_dense_solve(warm):
    """The conjugate-gradient inner solve equals one dense ridge solve per test example."""
    rng = np.random.default_rng(3)
    num_steps, num_train, num_test, width, ridge, pair_ridge = 200, 12, 4, 3, 0.5, 0.2
    batches = rng.integers(0, num_train, (num_steps, 3))
    batches[5, 1:] = -1
    design = BatchDesign(batches, num_train)
    features = torch.as_tensor(rng.normal(size=(num_steps, width)))
    previous = torch.as_tensor(rng.uniform(0.5, 2.0, (num_steps, num_test)))
    target = torch.as_tensor(rng.normal(size=(num_steps, num_test)))
    initial = torch.as_tensor(rng.normal(size=(num_train, 2 * num_test))) if warm else None
    solution = solve_pair_ridge(design, features, previous, target, ridge, pair_ridge, tol=1e-12, max_iter=2000,
                                initial=initial)
    dense = dense_design(batches, num_train)
    for m in range(num_test):
        z = np.hstack([previous[:, m:m + 1].numpy() * dense, dense, features.numpy()])
        penalty = np.diag(np.r_[np.full(2 * num_train, ridge), np.full(width, pair_ridge)])
        expected = np.linalg.solve(z.T @ z + penalty, z.T @ target[:, m].numpy())
        got = np.r_[solution.table[:, m].numpy(), solution.table[:, num_test + m].numpy(),
                    solution.interactions[:, m].numpy()]
        assert np.allclose(got, expected, atol=1e-8)
        assert np.allclose(solution.residual[:, m].numpy(), target[:, m].numpy() - z @ expected, atol=1e-8)


@pytest.fixture(scope="module")
def supermodular():
    """Supermodular runs split 45 / 15 and a pairwise fit (validated) on the 45."""
    runs, a, b, pair = supermodular_runs()
    fitting, heldout = runs.select(np.arange(45)), runs.select(np.arange(45, 60))
    return runs, fitting, heldout, (a, b, pair), PairwiseSimulator(rank=2, rounds=5).fit(fitting)


def test_recovers_a_supermodular_pair_that_linear_cannot(supermodular):
    """Held-out error and the leave-group-out interaction of the final loss: pairwise right, Linear not."""
    _, fitting, heldout, (a, b, pair), pairwise = supermodular
    linear = LinearIdentitySimulator().fit(fitting)
    errors = {}
    for name, simulator in (("linear", linear), ("pairwise", pairwise)):
        predicted = simulator.simulate(heldout.curricula, heldout.initial_losses)
        errors[name] = float(np.mean((predicted[:, 1:, :INTERACTING] - heldout.losses[:, 1:, :INTERACTING]) ** 2))
    assert errors["pairwise"] < 0.1 * errors["linear"]

    # Leave-group-out interaction of the final loss on fresh curricula holding both groups.
    rng = np.random.default_rng(7)
    curricula = rng.integers(0, fitting.num_train, (10, fitting.num_steps, 3))
    variants = np.stack([without(curricula, groups) for groups in ((), (GROUP_A,), (GROUP_B,), (GROUP_A, GROUP_B))])
    variants[(variants < 0).all(-1)] = 5  # never leave a step empty (5 is in neither group)

    def interaction(simulate):
        final = np.stack([simulate(v)[:, -1] for v in variants])
        return (final[0] - final[1] - final[2] + final[3])[:, :INTERACTING]

    initial = np.full((10, fitting.num_test), 2.0)
    truth = interaction(lambda c: true_rollout(a, b, pair, c, initial))
    assert truth.mean() < -0.1
    pairwise_interaction = interaction(lambda c: pairwise.simulate(c, initial))
    linear_interaction = interaction(lambda c: linear.simulate(c, initial))
    assert np.abs(pairwise_interaction - truth).mean() < 0.25 * np.abs(truth).mean()
    assert np.abs(linear_interaction - truth).mean() > 0.7 * np.abs(truth).mean()


def test_simulate_is_the_recurrence_with_the_pair_term(supermodular):
    """The rollout is the documented recurrence with ``gamma_t`` added, padding included."""
    _, _, heldout, _, simulator = supermodular
    curricula = heldout.curricula[:3].copy()
    curricula[1, 4, 1:] = -1
    a, b = (x.cpu().numpy() for x in (simulator.table[:, :6], simulator.table[:, 6:]))
    gamma = simulator.pair_terms(curricula)
    expected = np.zeros((3, curricula.shape[1] + 1, 6))
    expected[:, 0] = heldout.initial_losses[:3]
    for t in range(curricula.shape[1]):
        batch = curricula[:, t]
        alpha = 1 + np.where(batch[..., None] >= 0, a[batch], 0).sum(1)
        beta = np.where(batch[..., None] >= 0, b[batch], 0).sum(1)
        expected[:, t + 1] = alpha * expected[:, t] + beta + gamma[:, t]
    assert np.allclose(simulator.simulate(curricula, heldout.initial_losses[:3]), expected, atol=1e-5)


def test_chunked_fit_equals_unchunked_fit(monkeypatch):
    """Fitting the test examples in column chunks (bounded memory) gives the same model."""
    runs, _, _, _ = supermodular_runs(num_runs=16, num_steps=20)
    settings = {"rank": 2, "rounds": 2, "validate": False, "dtype": "float64", "inner_tol": 1e-10}
    whole = PairwiseSimulator(**settings).fit(runs)
    monkeypatch.setattr(interaction, "_WORKING_BYTES", 1)  # one test example per chunk
    chunked = PairwiseSimulator(**settings).fit(runs)
    assert whole.fit_info["column_chunk"] == runs.num_test and chunked.fit_info["column_chunk"] == 1
    assert bool(whole.interactions.abs().max() > 1e-3)  # the pair terms are on
    for name in ("table", "embeddings", "interactions"):
        assert torch.allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-7), name


def test_nests_linear_identity():
    """Round 0 is linear-identity's fit; pair terms held at zero by their penalty leave linear-identity.

    Linear-identity's plain recurrence: linear-pairwise never blends with the mean trajectory (nest_mean).
    """
    runs, _, _, _ = supermodular_runs(num_runs=24, num_steps=20, strength=0.0)
    linear = LinearIdentitySimulator(nest_mean=False).fit(runs)
    predicted = linear.simulate(runs.curricula, runs.initial_losses)
    chosen = PairwiseSimulator(rank=2).fit(runs)   # no interaction to find: the validation keeps round 0
    assert chosen.fit_info["rounds_used"] == 0 and chosen.config.dtype == linear.config.dtype
    assert torch.equal(chosen.table, linear.table) and not bool(chosen.interactions.any())
    assert np.array_equal(chosen.blend_, np.ones(runs.num_test))
    assert np.array_equal(chosen.simulate(runs.curricula, runs.initial_losses), predicted)
    held = PairwiseSimulator(rank=2, rounds=2, validate=False, pair_ridge=1e9).fit(runs)
    assert float(held.interactions.abs().max()) < 1e-6
    assert torch.allclose(held.table, linear.table, atol=1e-5)
    assert np.allclose(held.simulate(runs.curricula, runs.initial_losses), predicted, atol=1e-4)


def _scores(*rounds):
    """Validation scores: ``(mean MSE, Spearman, spread)`` per round -> per-run errors of 20 runs and the Spearman."""
    noise = np.random.default_rng(0).normal(size=20)
    return [(mse + spread * noise, rho) for mse, rho, spread in rounds]


@pytest.mark.parametrize("rounds, expected", [
    ([(1.0, 0.70, 0.01), (0.80, 0.69, 0.01), (0.90, 0.71, 0.01)], 2),   # round 1 errs least, ranks curricula worse
    ([(1.0, 0.70, 0.01), (0.80, 0.698, 0.01), (0.90, 0.71, 0.01)], 1),  # within spearman_tolerance (0.005)
    ([(1.0, 0.70, 0.01), (0.995, 0.75, 0.0)], 0),                       # a gain under 1 % is noise
    ([(1.0, 0.70, 0.01), (0.90, 0.75, 0.5)], 0),                        # so is one under two standard errors
    ([(1.0, 0.70, 0.01), (0.50, 0.60, 0.01), (0.40, 0.55, 0.01)], 0),   # the pair terms only trade ranking for error
    ([(1.0, np.nan, 0.01), (0.80, np.nan, 0.01)], 1),                   # fewer than 3 validation runs: errors alone
])
def test_round_choice_protects_the_across_run_ranking(rounds, expected):
    """Pair terms are kept only for a clear error gain that does not cost across-run Spearman."""
    assert PairwiseSimulator()._choose_rounds(_scores(*rounds), significant=True) == expected


def test_fold_paths_stop_on_any_lower_eligible_error():
    """Without ``significant`` (the early stop of a validation fold), any lower eligible error counts."""
    assert PairwiseSimulator()._choose_rounds(_scores((1.0, 0.70, 0.01), (0.90, 0.75, 0.5))) == 1


def test_validation_records_every_round_it_scored(supermodular):
    """The fit records the pooled validation scores; where the interaction is real it keeps rounds."""
    info = supermodular[4].fit_info
    mse, rho = info["validation_mse_per_round"], info["validation_spearman_per_round"]
    assert len(mse) == len(rho) >= info["rounds_used"] + 1
    assert info["rounds_used"] > 0 and mse[info["rounds_used"]] < 0.99 * mse[0]


def test_save_load_round_trip(tmp_path, supermodular):
    """Saved and loaded models simulate identically; arrays of the wrong shape are named."""
    _, _, heldout, _, simulator = supermodular
    path = simulator.save(tmp_path / "pairwise.npz")
    loaded = Simulator.load(path)
    assert isinstance(loaded, PairwiseSimulator) and loaded.config.rank == 2 and loaded.config.window is None
    assert np.array_equal(loaded.simulate(heldout.curricula, heldout.initial_losses),
                          simulator.simulate(heldout.curricula, heldout.initial_losses))
    arrays = dict(np.load(path, allow_pickle=False))
    arrays["state.embeddings"] = arrays["state.embeddings"][:, :1]
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(RunDataError, match=r"field 'state'.*embeddings has shape"):
        Simulator.load(tmp_path / "broken.npz")


def test_settings_of_earlier_versions_still_load():
    """Files saved before the U-only fit carry ``learning_rate`` and none of the new settings."""
    old = {"rank": 4, "window": None, "pair_ridge": None, "rounds": 8, "steps": 50, "learning_rate": 1.0,
           "init_scale": 0.1, "validate": True, "dtype": "float64"}
    with pytest.warns(DeprecationWarning, match="'steps' is now called 'lbfgs_iterations'"):
        simulator = make_simulator("linear-pairwise", **old)
    assert simulator.config.rounds == 8 and simulator.config.dtype == "float64"
    assert simulator.config.lbfgs_iterations == 50 and "learning_rate" not in simulator._params()


@pytest.mark.parametrize("params, message", [
    ({"rank": 0}, "rank: expected an integer >= 1"),
    ({"window": -1}, "window: expected an integer >= 0"),
    ({"pair_ridge": 0.0}, "pair_ridge: expected a finite number > 0"),
    ({"spearman_tolerance": -0.1}, "spearman_tolerance: expected a finite number >= 0"),
    ({"patience": 0}, "patience: expected an integer >= 1"),
    ({"inner_tol": 0.0}, "inner_tol: expected a finite number > 0"),
])
def test_bad_parameters_are_named(params, message):
    """Each invalid setting fails with a message that names it."""
    with pytest.raises(ValueError, match=message):
        make_simulator("linear-pairwise", **params)


def test_short_window_misses_pairs_far_apart():
    """Pairs only count within the window: with window 0 the (A, B) pairs of different steps vanish."""
    curricula = np.array([[[0, 5], [2, 6], [7, 8]]])
    pair = np.zeros((10, 10, 1))
    pair[0, 2] = pair[2, 0] = 1.0
    assert brute_force_pairs(curricula, pair, None).sum() == 1.0
    embeddings = torch.eye(10, dtype=torch.float64)[:, :3]
    interactions = torch.zeros(3, 3, 1, dtype=torch.float64)
    interactions[0, 2] = interactions[2, 0] = 1.0
    for window, expected in ((None, 1.0), (1, 1.0), (0, 0.0)):
        got = (pair_features(embeddings, curricula, window) @ interactions.reshape(9, 1)).sum()
        assert float(got) == pytest.approx(expected)


def test_two_key_real_training_interaction_is_captured():
    """Real SGD on the two-key MLP: only the pairwise simulator sees that A and B help together."""
    torch.set_num_threads(1)
    bench = load_benchmark("interactions")
    result = bench.two_key_experiment(num_runs=48, num_steps=30, num_heldout=12, num_probes=8,
                                      pairwise={"rank": 4, "rounds": 4})
    measured = result["measured_interaction"]["mean_needs_both"]
    assert measured < -0.1  # the constructed case really is supermodular
    linear, pairwise = result["simulators"]["linear-identity"], result["simulators"]["linear-pairwise"]
    assert abs(linear["simulated_interaction_mean_needs_both"]) < 0.25 * abs(measured)
    assert abs(pairwise["simulated_interaction_mean_needs_both"] - measured) < 0.5 * abs(measured)
    assert pairwise["interaction_abs_error_needs_both"] < 0.6 * linear["interaction_abs_error_needs_both"]
    assert pairwise["heldout_mse"] < linear["heldout_mse"]


def test_cli_fits_pairwise(tmp_path):
    """``simfluence fit --method linear-pairwise`` writes a loadable float32 model."""
    from click.testing import CliRunner

    from simfluence.cli import main
    from simfluence.runs import save_runs

    runs, _, _, _ = supermodular_runs(num_runs=8, num_steps=10)
    save_runs(runs, tmp_path / "runs.npz")
    result = CliRunner().invoke(main, ["fit", str(tmp_path / "runs.npz"), "--method", "linear-pairwise",
                                       "--out", str(tmp_path / "pairwise.npz")])
    assert result.exit_code == 0, result.output
    loaded = Simulator.load(tmp_path / "pairwise.npz")
    assert loaded.kind == "linear-pairwise" and loaded.config.dtype == "float32"


def test_pair_rollouts_are_never_blended_with_the_mean_trajectory():
    from simfluence.errors import UsageError

    assert PairwiseSimulator().config.nest_mean is False
    with pytest.raises(UsageError, match="nest_mean.*only False"):
        PairwiseSimulator(nest_mean=True)
