"""The GPTfluence peer: recovery of a known Markov truth, its formula, persistence, refits, a real task."""

import numpy as np
import pytest
import torch

from simfluence import RunDataError, RunSet
from simfluence.simulators import GPTfluenceSimulator, Simulator, make_simulator
from simfluence.simulators.baselines import mean_trajectory

NUM_TRAIN, NUM_TEST, WIDTH, RANK = 50, 16, 6, 3


def markov_truth(seed=0):
    """Features and pair terms ``a_1, a_2, b`` ``[N, M]`` of a known second-order model.

    Each pair term is bilinear (rank ``RANK``) in the features.
    """
    rng = np.random.default_rng(seed)
    train, test = rng.normal(size=(NUM_TRAIN, WIDTH)), rng.normal(size=(NUM_TEST, WIDTH))
    terms = [(train @ rng.normal(size=(WIDTH, RANK))) @ (test @ rng.normal(size=(WIDTH, RANK))).T / (RANK * WIDTH)
             for _ in range(3)]
    return train, test, 0.02 * terms[0], 0.01 * terms[1], 0.02 * terms[2] - 0.02


def markov_runs(a_1, a_2, b, num_runs, seed, num_steps=30, batch=4, noise=1e-4):
    """``L_t = (1 + mean a_1) L_{t-1} + (mean a_2) L_{t-2} + mean b`` over each batch (``L_{-1} = L_0``)."""
    rng = np.random.default_rng(seed)
    curricula = rng.integers(0, a_1.shape[0], (num_runs, num_steps, batch))
    losses = np.zeros((num_runs, num_steps + 1, a_1.shape[1]))
    losses[:, 0] = 2.0 + rng.random((num_runs, a_1.shape[1]))
    for t in range(num_steps):
        batch_of = curricula[:, t]
        before = losses[:, max(t - 1, 0)]
        losses[:, t + 1] = ((1 + a_1[batch_of].mean(1)) * losses[:, t] + a_2[batch_of].mean(1) * before
                            + b[batch_of].mean(1) + rng.normal(0, noise, losses[:, t].shape))
    return RunSet.create(curricula, losses, [f"train-{i}" for i in range(a_1.shape[0])],
                         [f"test-{m}" for m in range(a_1.shape[1])])


def mse(predicted, runs):
    return float(np.mean((predicted[:, 1:] - runs.losses[:, 1:]) ** 2))


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    train, test, a_1, a_2, b = markov_truth()
    fitting, heldout = markov_runs(a_1, a_2, b, 16, seed=1), markov_runs(a_1, a_2, b, 8, seed=2)
    simulator = GPTfluenceSimulator(train_features=train, test_features=test, epochs=600).fit(fitting)
    return dict(simulator=simulator, fitting=fitting, heldout=heldout, train=train, test=test)


def test_recovers_a_known_markov_model(fitted):
    simulator, heldout = fitted["simulator"], fitted["heldout"]
    predicted = simulator.simulate(heldout.curricula, heldout.initial_losses)
    baseline = mean_trajectory(simulator.mean_change, heldout.initial_losses, heldout.num_steps)
    assert predicted.shape == heldout.losses.shape and predicted.dtype == np.float32
    assert np.array_equal(predicted[:, 0], heldout.initial_losses)
    assert mse(predicted, heldout) < 0.01 * mse(baseline, heldout)
    info = simulator.fit_info
    assert info["validation_runs"] == 3 and info["refit"] and 0 < info["best_epoch"] <= 600
    assert info["transition_relative_mse"] < 0.01


def test_simulation_follows_the_documented_recurrence(fitted):
    """The rollout is the module's recurrence with the pair terms ``A_h`` of :meth:`pair_terms`.

    ``alpha_j = [j = 1] + s_a mean A_j``, ``beta = s_b mean A_beta - c s_a sum_j mean A_j``, batch means
    over the non-padding slots.
    """
    simulator, heldout = fitted["simulator"], fitted["heldout"]
    curricula = heldout.curricula[:2].copy()
    curricula[0, 3, 2:] = -1
    curricula[1, 5, 1:] = -1
    predicted = simulator.simulate(curricula, heldout.initial_losses[:2])
    terms = simulator.pair_terms()
    assert terms.shape == (3, NUM_TRAIN, NUM_TEST)
    scale_alpha, scale_beta, center = simulator.units_
    for r in range(2):
        history = [heldout.initial_losses[r].astype(np.float64)] * 2
        for t in range(curricula.shape[1]):
            batch = curricula[r, t][curricula[r, t] >= 0]
            means = terms[:, batch].mean(axis=1)
            alpha = [1 + scale_alpha * means[0], scale_alpha * means[1]]
            beta = scale_beta * means[2] - center * scale_alpha * (means[0] + means[1])
            loss = alpha[0] * history[0] + alpha[1] * history[1] + beta
            history = [loss, history[0]]
            assert np.allclose(predicted[r, t + 1], loss, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(fitted, tmp_path):
    simulator, heldout = fitted["simulator"], fitted["heldout"]
    path = simulator.save(tmp_path / "gptfluence.npz")
    with np.load(path, allow_pickle=False) as saved:
        arrays = dict(saved)
    assert {"state.train_maps", "state.test_maps", "state.offsets", "state.units"} <= set(arrays)
    loaded = Simulator.load(path)
    assert isinstance(loaded, GPTfluenceSimulator) and loaded._params() == simulator._params()
    expected = simulator.simulate(heldout.curricula, heldout.initial_losses)
    assert np.array_equal(loaded.simulate(heldout.curricula, heldout.initial_losses), expected)
    arrays["state.test_maps"] = arrays["state.test_maps"][:, :-1]
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(RunDataError, match=r"state.*gptfluence"):
        Simulator.load(tmp_path / "broken.npz")


def test_fitting_twice_equals_fresh_fits_and_keeps_the_settings(fitted):
    train, test, a_1, a_2, b = markov_truth(seed=3)
    first, second = markov_runs(a_1, a_2, b, 6, seed=4), markov_runs(a_1, a_2, b, 5, seed=5, num_steps=20)
    settings = dict(train_features=train, test_features=test, epochs=150, order=3, rank=2)
    reused = GPTfluenceSimulator(**settings)
    params = reused._params()
    for runs in (first, second):
        reused.fit(runs)
        fresh = GPTfluenceSimulator(**settings).fit(runs)
        assert reused._params() == params
        for name in ("train_embeddings_", "test_embeddings_", "train_maps_", "test_maps_", "offsets_", "units_"):
            assert np.array_equal(getattr(reused, name), getattr(fresh, name)), name
        assert reused.fit_info == fresh.fit_info
        curricula, initial = fitted["heldout"].curricula[:, :20], fitted["heldout"].initial_losses
        assert np.array_equal(reused.simulate(curricula, initial), fresh.simulate(curricula, initial))


def test_bad_settings_and_inputs_give_one_line_errors(fitted):
    fitting, train, test = fitted["fitting"], fitted["train"], fitted["test"]
    for params in (dict(order=0), dict(rank=1.5), dict(learning_rate=0), dict(validation_fraction=1.0),
                   dict(weight_decay=-1)):
        with pytest.raises(ValueError):
            GPTfluenceSimulator(**params)
    cases = [(dict(train_features=train, test_features=None), "test_features"),
             (dict(train_features=train[:-1], test_features=test), "train_features"),
             (dict(train_features=train, test_features=np.where(test > 1, np.nan, test)), "NaN")]
    for params, word in cases:
        with pytest.raises(RunDataError) as error:
            GPTfluenceSimulator(**params, epochs=1).fit(fitting)
        assert word in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(RunDataError, match=r"meta\.task"):
        GPTfluenceSimulator(epochs=1).fit(fitting)  # no task in the meta, no features given
    sparse = RunSet.create(fitting.curricula, fitting.losses[:, ::2], fitting.train_ids, fitting.test_ids,
                           eval_steps=np.arange(0, fitting.num_steps + 1, 2))
    with pytest.raises(RunDataError, match="eval_steps"):
        GPTfluenceSimulator(train_features=train, test_features=test, epochs=1).fit(sparse)


def test_fits_collected_digits_runs_from_the_task_features(tmp_path):
    from simfluence.collect import collect
    from simfluence.evaluate import split_runs
    from simfluence.tasks import get_task

    torch.set_num_threads(1)
    task = get_task("digits-mlp", num_train=40, num_test=12)
    runs = collect(task, tmp_path / "runs", 12, 30, progress=False).load()
    fitting, heldout = split_runs(runs, 3)
    simulator = make_simulator("gptfluence").fit(fitting)  # task (and its features) from the runs' meta
    assert simulator.fit_info["feature_dims"] == [64 + task.hidden + 10] * 2
    predicted = simulator.simulate(heldout.curricula, heldout.initial_losses)
    assert np.isfinite(predicted).all()
    constant = np.repeat(heldout.initial_losses[:, None], heldout.num_steps + 1, axis=1)
    assert mse(predicted, heldout) < 0.2 * mse(constant, heldout)
    assert mse(predicted, heldout) < mse(mean_trajectory(simulator.mean_change, heldout.initial_losses,
                                                         heldout.num_steps), heldout)
