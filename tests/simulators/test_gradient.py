"""Gradient-based simulators on the real digits-mlp task."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from simfluence import RunSet
from simfluence.collect import UniformSampler, train_runs_vmap
from simfluence.func import per_example_gradients, trainable_params
from simfluence.simulators import GradDotSimulator, InfluenceSimulator, Simulator, TracInCPSimulator, make_simulator
from simfluence.tasks import get_task


@pytest.fixture(scope="module")
def task():
    return get_task("digits-mlp")


def collect_runs(task, num_runs, num_steps, seed=0):
    sampler = UniformSampler(task.default_pool(), task.batch_size)
    curricula = np.stack([sampler.sample(num_steps, seed=seed + r) for r in range(num_runs)])
    logs = train_runs_vmap(task, curricula)
    return RunSet.from_logs(logs, task.train_ids, task.test_ids, task.meta())


def test_per_example_gradients_match_autograd(task):
    model = task.build_model()
    params = trainable_params(model)
    data = task.data
    grads = per_example_gradients(task, model, params, data.train_inputs[:5], data.train_targets[:5], chunk_size=2)
    for j in range(5):
        model.zero_grad()
        task.example_losses(model, data.train_inputs[j:j + 1], data.train_targets[j:j + 1]).sum().backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(grads[j], expected, atol=1e-6)


def test_grad_dot_predicts_the_real_first_step(task):
    """Acceptance: correlation > 0.9 between predicted and real step-1 loss changes."""
    runs = collect_runs(task, num_runs=40, num_steps=1)
    simulator = GradDotSimulator(task=task).fit(runs)
    predicted = simulator.simulate(runs.curricula, runs.initial_losses)[:, 1] - runs.initial_losses
    real = runs.losses[:, 1] - runs.losses[:, 0]
    correlation = np.corrcoef(predicted.ravel(), real.ravel())[0, 1]
    assert correlation > 0.9, correlation


def test_tracin_agrees_with_captum(task, tmp_path):
    """Our TracIn-CP scores against Captum's TracInCP on the same checkpoints and examples.

    Captum returns sum_k lr_k * g_test . g_train over checkpoints k; our B is
    -(lr / batch) * mean_k g_test . g_train, so B = -captum.T / (batch * K).
    """
    captum_tracin = pytest.importorskip("captum.influence")
    runs = collect_runs(task, num_runs=2, num_steps=3)
    model = task.build_model()
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    optimizer = torch.optim.SGD(model.parameters(), lr=task.learning_rate)
    data = task.data
    for batch in runs.curricula[0]:
        optimizer.zero_grad()
        index = torch.as_tensor(batch, dtype=torch.long)
        task.example_losses(model, data.train_inputs[index], data.train_targets[index]).mean().backward()
        optimizer.step()
    states.append({k: v.clone() for k, v in model.state_dict().items()})

    ours = TracInCPSimulator(task=task, checkpoints=states).fit(runs).coefficients[1]

    paths = []
    for k, state in enumerate(states):
        paths.append(str(tmp_path / f"checkpoint-{k}.pt"))
        torch.save(state, paths[-1])

    def load(net, path):
        net.load_state_dict(torch.load(path))
        return task.learning_rate

    dataset = torch.utils.data.TensorDataset(data.train_inputs, data.train_targets)
    tracin = captum_tracin.TracInCP(task.build_model(), dataset, paths, checkpoints_load_func=load,
                                    loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=64)
    theirs = tracin.influence((data.test_inputs, data.test_targets), show_progress=False).numpy()
    expected = -theirs.T / (runs.batch_size * len(states))
    assert spearmanr(ours.ravel(), expected.ravel()).statistic > 0.99
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())


def test_scaled_forms_fit_one_scale_and_round_trip(task, tmp_path):
    runs = collect_runs(task, num_runs=6, num_steps=20)
    raw = make_simulator("grad-dot", task=task).fit(runs)
    scaled = make_simulator("grad-dot-scaled", task=task).fit(runs)
    assert raw.scale == 1.0 and scaled.scale != 1.0
    np.testing.assert_allclose(scaled.coefficients[1], scaled.scale * raw.coefficients[1], rtol=1e-5, atol=1e-9)
    loaded = Simulator.load(scaled.save(tmp_path / "g.npz"))
    assert loaded.kind == "grad-dot-scaled" and loaded.scale == pytest.approx(scaled.scale)
    np.testing.assert_array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                                  scaled.simulate(runs.curricula, runs.initial_losses))


def test_lanczos_path_agrees_with_exact_solve(task):
    runs = collect_runs(task, num_runs=3, num_steps=5)
    exact = InfluenceSimulator(task=task, damping=0.1).fit(runs).coefficients[1]
    lanczos = InfluenceSimulator(task=task, damping=0.1, exact_max_params=0, lanczos_rank=128).fit(runs).coefficients[1]
    assert spearmanr(exact.ravel(), lanczos.ravel()).statistic > 0.95
    np.testing.assert_allclose(lanczos, exact, atol=0.05 * np.abs(exact).max())


def test_lanczos_finds_the_extreme_eigenvalues():
    from simfluence.simulators.gradient import _lanczos

    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(200, 200)))
    spectrum = np.concatenate([[50.0, 20.0, 10.0, -3.0], rng.uniform(0, 0.1, 196)])
    matrix = torch.tensor(basis @ np.diag(spectrum) @ basis.T)
    values, vectors = _lanczos(lambda v: v @ matrix, 200, 40)
    assert values.max() == pytest.approx(50.0, rel=1e-8) and values.min() == pytest.approx(-3.0, rel=1e-8)
    top = vectors[:, values.argmax()].numpy()
    assert abs(top @ basis[:, 0]) == pytest.approx(1.0, abs=1e-8)


def test_influence_files_from_before_the_cg_solver_was_removed(task, tmp_path):
    """Files that recorded ``solver``/``cg_iterations`` load when they used Lanczos; ``"cg"`` is refused."""
    import json

    from simfluence.runs.log import RunDataError
    from simfluence.simulators.base import config_checksum

    runs = collect_runs(task, num_runs=2, num_steps=3)
    simulator = InfluenceSimulator(task=task, damping=0.1).fit(runs)
    with np.load(simulator.save(tmp_path / "influence.npz"), allow_pickle=False) as saved:
        arrays = dict(saved)

    def old_file(name, **params):
        config = json.loads(str(arrays["config"]))
        config["params"].update(params)
        config["config_checksum"] = config_checksum(config)
        np.savez(tmp_path / name, **{**arrays, "config": np.array(json.dumps(config))})
        return tmp_path / name

    loaded = Simulator.load(old_file("lanczos.npz", solver="lanczos", cg_iterations=50))
    np.testing.assert_array_equal(loaded.coefficients[1], simulator.coefficients[1])
    with pytest.raises(RunDataError, match=r"config\.params.*solver: this setting was removed; only 'lanczos'.*got 'cg'"):
        Simulator.load(old_file("cg.npz", solver="cg", cg_iterations=100))


def test_default_tracin_reads_the_checkpoints_the_tracin_peer_reads(task):
    """Replayed TracIn-CP = the captum peer on the same run: segment centres, nearest-step learning-rate weights.

    The peer's scores are the run's expected effect, ``-(1 / N) sum_k w_k g_i . g_m`` (``w_k``: the
    summed learning rate of the steps checkpoint ``k`` stands for); our ``B`` is one occurrence's
    effect in a batch of ``n``, ``-(1 / (T n)) sum_k w_k g_i . g_m``.
    """
    pytest.importorskip("captum.influence")
    from simfluence.peers import get_peer, trajectory_checkpoints

    runs = collect_runs(task, num_runs=2, num_steps=12)
    ours = TracInCPSimulator(task=task).fit(runs)
    assert ours.fit_info["checkpoint_steps"] == [1, 4, 7, 10]
    checkpoints = trajectory_checkpoints(task, runs.curricula[0], 4)
    theirs = get_peer("tracin").attribute(task, checkpoints).scores
    expected = theirs * task.num_train / (runs.num_steps * runs.batch_size)
    np.testing.assert_allclose(ours.coefficients[1], expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())
