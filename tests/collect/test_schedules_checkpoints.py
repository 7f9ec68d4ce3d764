"""Learning-rate schedules in both trainers, checkpoints kept by collection, and TracIn-CP reading them."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from simfluence.cli import main
from simfluence.collect import UniformSampler, collect
from simfluence.collect.train import train_run, train_runs_vmap, train_states
from simfluence.func import trainable_params
from simfluence.func.gradients import gradient_products
from simfluence.runs import RunDataError, RunStore
from simfluence.simulators import GradDotSimulator, TracInCPSimulator
from simfluence.tasks import get_task
from simfluence.tasks.schedules import learning_rates


def test_schedules_follow_their_formulas():
    np.testing.assert_allclose(learning_rates(0.1, 4), [0.1] * 4)
    np.testing.assert_allclose(learning_rates(0.1, 4, "linear"), [0.1, 0.075, 0.05, 0.025])
    np.testing.assert_allclose(learning_rates(1.0, 4, "cosine"), (1 + np.cos(np.pi * np.arange(4) / 4)) / 2)
    np.testing.assert_allclose(learning_rates(1.0, 6, "linear", warmup_steps=2), [0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="^lr_schedule: unknown schedule 'step'"):
        learning_rates(0.1, 4, "step")


def test_both_trainers_apply_the_schedule_like_a_hand_written_loop():
    task = get_task("digits-mlp", lr_schedule="cosine", warmup_steps=2)
    curriculum = UniformSampler(task.default_pool(), 3).sample(6, seed=1)
    model = task.build_model().eval()
    data = task.data
    for rate, batch in zip(learning_rates(task.learning_rate, 6, "cosine", 2), curriculum):
        model.zero_grad()
        index = torch.as_tensor(batch, dtype=torch.long)
        task.example_losses(model, data.train_inputs[index], data.train_targets[index]).mean().backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= rate * parameter.grad
    with torch.no_grad():
        expected = task.example_losses(model, data.test_inputs, data.test_targets).numpy()
    looped = train_run(task, curriculum).losses[-1]
    vectorised = train_runs_vmap(task, curriculum[None])[0].losses[-1]
    constant = train_run(get_task("digits-mlp"), curriculum).losses[-1]
    np.testing.assert_allclose(looped, expected, atol=1e-5)
    np.testing.assert_allclose(vectorised, expected, atol=1e-5)
    assert np.abs(constant - expected).max() > 1e-3  # the schedule made a difference


@pytest.mark.parametrize("vectorize", [True, False])
def test_collection_keeps_checkpoints_that_equal_a_replay(tmp_path, vectorize):
    task = get_task("digits-mlp", lr_schedule="linear")
    store = collect(task, tmp_path / "store", 2, 8, checkpoint_steps=[0, 4, 8], vectorize=vectorize, progress=False)
    assert store.meta["checkpoint_steps"] == [0, 4, 8] and store.meta["task_config"]["lr_schedule"] == "linear"
    runs = store.load()
    for r, run_id in enumerate(runs.run_ids):
        assert store.checkpoint_steps(run_id) == [0, 4, 8]
        for step, state in zip([0, 4, 8], train_states(task, runs.curricula[r], [0, 4, 8])):
            stored = store.read_checkpoint(run_id, step)
            assert stored.keys() == state.keys()
            for key in state:
                torch.testing.assert_close(stored[key], state[key], atol=1e-6, rtol=1e-5)
    # Resuming with the same settings trains nothing; other checkpoint steps are other settings.
    assert len(collect(task, tmp_path / "store", 2, 8, checkpoint_steps=[0, 4, 8], progress=False)) == 2
    with pytest.raises(RunDataError, match="meta"):
        collect(task, tmp_path / "store", 2, 8, checkpoint_steps=[0, 8], progress=False)
    with pytest.raises(RunDataError, match="has no checkpoint at step 3"):
        store.read_checkpoint(runs.run_ids[0], 3)


def test_tracin_from_stored_checkpoints_weights_them_by_the_schedule(tmp_path):
    task = get_task("digits-mlp", lr_schedule="linear")
    store = collect(task, tmp_path / "store", 3, 8, checkpoint_steps=[0, 4], progress=False)
    runs = store.load()
    stored = TracInCPSimulator(checkpoints=str(store.root)).fit(runs)
    replayed = TracInCPSimulator(checkpoint_steps=[0, 4]).fit(runs)
    assert stored.task_.lr_schedule == "linear"  # the task and its options came from the runs' meta
    assert stored.task_spec is None               # ... as fitted state: the setting stays as given
    np.testing.assert_allclose(stored.coefficients[1], replayed.coefficients[1], rtol=1e-4, atol=1e-9)

    # Reference: each step goes to the checkpoint nearest to the weights its gradient is taken at
    # (step t at step t - 1's; a tie to the earlier): checkpoint 0 stands for steps 1-3, checkpoint 4 for 4-8.
    rates = learning_rates(task.learning_rate, 8, "linear")
    expected = 0
    for weight, step in ((rates[:3].sum() / 8, 0), (rates[3:].sum() / 8, 4)):
        model = task.build_model().eval()
        model.load_state_dict(store.read_checkpoint(runs.run_ids[0], step))
        expected = expected - weight / runs.batch_size * gradient_products(task, model, trainable_params(model)).numpy()
    np.testing.assert_allclose(stored.coefficients[1], expected, rtol=1e-4, atol=1e-9)

    # One checkpoint at the start: TracIn-CP is Grad-Dot, both with the run's mean rate.
    np.testing.assert_allclose(TracInCPSimulator(checkpoint_steps=[0]).fit(runs).coefficients[1],
                               GradDotSimulator().fit(runs).coefficients[1], rtol=1e-5, atol=1e-9)


def test_cli_collects_checkpoints_and_fits_tracin_from_them(tmp_path):
    runner = CliRunner()
    store = tmp_path / "store"
    result = runner.invoke(main, ["collect", "digits-mlp", "--runs", "2", "--steps", "6", "--out", str(store),
                                  "--checkpoint-steps", "0,3", "--option", "lr_schedule=cosine"])
    assert result.exit_code == 0, result.output
    assert RunStore(store).checkpoint_steps("run-000000") == [0, 3]
    result = runner.invoke(main, ["fit", str(store), "--method", "tracin-cp", "--checkpoints", str(store),
                                  "--out", str(tmp_path / "t.npz")])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(main, ["collect", "digits-mlp", "--runs", "1", "--steps", "2", "--out", str(tmp_path / "b"),
                               "--option", "lr_schedule=step"])
    assert bad.exit_code == 2 and "lr_schedule: unknown schedule 'step'" in bad.output
