"""Recorder: recording a plain PyTorch loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from simfluence.recorder import Recorder, from_criterion
from simfluence.runs.log import PAD, RunDataError
from simfluence.runs.store import RunStore

N_TRAIN, N_TEST, DIM, CLASSES = 40, 23, 6, 3


def ce_loss(model, inputs, targets):
    return nn.functional.cross_entropy(model(inputs), targets, reduction="none")


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_train, x_test = torch.randn(N_TRAIN, DIM, generator=g), torch.randn(N_TEST, DIM, generator=g)
    y_train = torch.randint(CLASSES, (N_TRAIN,), generator=g)
    y_test = torch.randint(CLASSES, (N_TEST,), generator=g)
    return x_train, y_train, x_test, y_test


def make_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, CLASSES))


def curriculum(steps: int, batch: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(N_TRAIN, size=batch, replace=False) for _ in range(steps)]


def train(recorder, model, batches, data, snapshots=None, ids=None):
    """A plain training loop; snapshot[t] = the weights after step t."""
    x_train, y_train, _, _ = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    if snapshots is not None:
        snapshots.append(copy.deepcopy(model.state_dict()))
    for batch in batches:
        index = torch.as_tensor(batch)
        optimizer.zero_grad()
        ce_loss(model, x_train[index], y_train[index]).mean().backward()
        optimizer.step()
        if snapshots is not None:
            snapshots.append(copy.deepcopy(model.state_dict()))
        recorder.step(batch if ids is None else [ids[i] for i in batch])


def independent_losses(state, data) -> np.ndarray:
    """Re-evaluate a saved checkpoint in a fresh model, all test examples in one forward pass."""
    _, _, x_test, y_test = data
    model = make_model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return ce_loss(model, x_test, y_test).numpy()


def recorder_for(path, model, data, **kwargs) -> Recorder:
    _, _, x_test, y_test = data
    kwargs.setdefault("train_ids", [f"train-{i}" for i in range(N_TRAIN)])
    kwargs.setdefault("test_ids", [f"test-{i}" for i in range(N_TEST)])
    return Recorder(path, model=model, loss_fn=ce_loss, test_inputs=x_test, test_targets=y_test, **kwargs)


# --- plain PyTorch loop --------------------------------------------------------------------------
def test_losses_equal_independent_evaluation_and_batches_exact(tmp_path):
    data, model, batches, snapshots = make_data(), make_model(), curriculum(12, 5), []
    with recorder_for(tmp_path / "store", model, data, run_id="run-000000", eval_batch_size=7,
                      meta={"lr": 0.5}, seed=3) as rec:
        train(rec, model, batches, data, snapshots)
    runs = RunStore(tmp_path / "store").load()
    assert runs.run_ids.tolist() == ["run-000000"]
    np.testing.assert_array_equal(runs.curricula[0], np.stack(batches))
    np.testing.assert_array_equal(runs.eval_steps, np.arange(13))
    expected = np.stack([independent_losses(state, data) for state in snapshots])
    np.testing.assert_allclose(runs.losses[0], expected, rtol=0, atol=1e-6)
    log = RunStore(tmp_path / "store").read("run-000000")
    assert log.meta == {"lr": 0.5} and log.seed == 3
    assert rec.log is not None and rec.log.run_id == "run-000000"
    assert runs.train_ids[0] == "train-0" and runs.test_ids[-1] == f"test-{N_TEST - 1}"


@pytest.mark.parametrize("steps", [9, 10])
def test_eval_every(tmp_path, steps):
    data, model, batches, snapshots = make_data(), make_model(), curriculum(steps, 4), []
    with recorder_for(tmp_path, model, data, eval_every=3) as rec:
        train(rec, model, batches, data, snapshots)
    run = RunStore(tmp_path).read(rec.run_id)
    expected_steps = [0, 3, 6, 9] + ([10] if steps == 10 else [])
    assert run.eval_steps.tolist() == expected_steps
    expected = np.stack([independent_losses(snapshots[t], data) for t in expected_steps])
    np.testing.assert_allclose(run.losses, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(run.curriculum, np.stack(batches))


def test_forced_evaluation_and_finish_without_last_evaluation(tmp_path):
    data, model, batches, snapshots = make_data(), make_model(), curriculum(7, 3), []
    rec = recorder_for(tmp_path, model, data, eval_every=3).start()
    x_train, y_train, _, _ = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots.append(copy.deepcopy(model.state_dict()))
    for step, batch in enumerate(batches, start=1):
        optimizer.zero_grad()
        ce_loss(model, x_train[batch], y_train[batch]).mean().backward()
        optimizer.step()
        snapshots.append(copy.deepcopy(model.state_dict()))
        losses = rec.step(batch, evaluate={1: True, 3: False}.get(step))
        assert (losses is not None) == (step in (1, 6))
    log = rec.finish(evaluate_last=False)
    assert log.eval_steps.tolist() == [0, 1, 6] and log.num_steps == 7
    expected = np.stack([independent_losses(snapshots[t], data) for t in (0, 1, 6)])
    np.testing.assert_allclose(RunStore(tmp_path).read(log.run_id).losses, expected, rtol=0, atol=1e-6)


def test_str_ids_variable_batches_and_tensor_ids(tmp_path):
    data, model = make_data(), make_model()
    ids = [f"train-{i}" for i in range(N_TRAIN)]
    batches = [np.array([3, 1, 4]), np.array([1, 5]), np.array([9, 2, 6, 5])]
    with recorder_for(tmp_path, model, data, train_ids=ids) as rec:
        train(rec, model, batches[:2], data, ids=ids)                    # str ids
        train(rec, model, [torch.tensor(batches[2])], data)             # int tensor
    run = RunStore(tmp_path).read(rec.run_id)
    assert run.curriculum.tolist() == [[3, 1, 4, PAD], [1, 5, PAD, PAD], [9, 2, 6, 5]]


def test_interrupted_loop_writes_nothing(tmp_path):
    data, model = make_data(), make_model()
    with pytest.raises(KeyboardInterrupt):
        with recorder_for(tmp_path / "new", model, data) as rec:
            train(rec, model, curriculum(3, 4), data)
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()        # the store is created only when a run is written
    # An existing store keeps exactly its runs, with no temporary files left behind.
    with recorder_for(tmp_path / "old", model, data) as rec:
        train(rec, model, curriculum(2, 4), data)
    before = sorted(p.name for p in (tmp_path / "old").rglob("*"))
    with pytest.raises(RuntimeError, match="boom"):
        with recorder_for(tmp_path / "old", model, data) as rec:
            train(rec, model, curriculum(3, 4), data)
            raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "old").rglob("*")) == before
    assert RunStore(tmp_path / "old").run_ids() == ["run-000000"]
    with pytest.raises(RuntimeError, match="aborted"):
        rec.step([0])


def test_without_context_manager_and_auto_run_ids(tmp_path):
    data = make_data()
    for expected in ("run-000000", "run-000001"):
        model = make_model()
        rec = recorder_for(tmp_path, model, data, test_on_device=False).start()
        train(rec, model, curriculum(4, 3), data)
        log = rec.finish()
        assert log.run_id == expected == rec.run_id
    runs = RunStore(tmp_path).load()
    assert runs.num_runs == 2 and runs.losses.shape == (2, 5, N_TEST)
    with pytest.raises(RuntimeError, match="finished"):
        rec.finish()


def test_subset_of_test_examples(tmp_path):
    data, model, batches, snapshots = make_data(), make_model(), curriculum(5, 4), []
    subset = [20, 2, 7]
    with recorder_for(tmp_path, model, data, test_subset=subset, eval_batch_size=2) as rec:
        train(rec, model, batches, data, snapshots)
    runs = RunStore(tmp_path).load()
    assert runs.test_ids.tolist() == ["test-20", "test-2", "test-7"]
    expected = np.stack([independent_losses(state, data)[subset] for state in snapshots])
    np.testing.assert_allclose(runs.losses[0], expected, rtol=0, atol=1e-6)


def test_evaluation_mode_no_grad_and_modes_restored(tmp_path):
    data = make_data()
    model = make_model(dropout=0.5)
    model[0].eval()                        # a module the user keeps in eval mode
    seen = []

    def loss_fn(m, inputs, targets):
        seen.append((torch.is_grad_enabled(), [module.training for module in m.modules()]))
        return ce_loss(m, inputs, targets)

    _, _, x_test, y_test = data
    before = [module.training for module in model.modules()]
    with Recorder(tmp_path, model=model, loss_fn=loss_fn, test_inputs=x_test, test_targets=y_test,
                  train_ids=N_TRAIN) as rec:
        train(rec, model, curriculum(2, 4), data)
        assert [module.training for module in model.modules()] == before
    assert all(not grad and not any(flags) for grad, flags in seen)
    # Dropout is off in evaluation: two evaluations of the same weights agree exactly.
    model.train()
    rec2 = Recorder(tmp_path / "b", model=model, loss_fn=ce_loss, test_inputs=x_test, test_targets=y_test,
                    train_ids=N_TRAIN).start()
    torch.testing.assert_close(rec2.evaluate(), rec2.evaluate(), rtol=0, atol=0)
    assert model.training
    rec2.abort()


def test_dict_inputs_and_from_criterion(tmp_path):
    data, batches, snapshots = make_data(), curriculum(3, 4), []

    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, features, scale):
            return self.net(features * scale)

    model = DictModel()
    _, _, x_test, y_test = data
    inputs = {"features": x_test, "scale": torch.ones(N_TEST, 1)}
    with Recorder(tmp_path, model=model, loss_fn=from_criterion(nn.CrossEntropyLoss(reduction="none")),
                  test_inputs=inputs, test_targets=y_test, train_ids=N_TRAIN, eval_batch_size=5) as rec:
        train(rec, model.net, batches, data, snapshots)
    run = RunStore(tmp_path).read(rec.run_id)
    expected = np.stack([independent_losses(state, data) for state in snapshots])
    np.testing.assert_allclose(run.losses, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="reduction='none'"):
        from_criterion(nn.CrossEntropyLoss())


def test_errors_are_early_and_write_nothing(tmp_path):
    data, model = make_data(), make_model()
    _, _, x_test, y_test = data
    rec = recorder_for(tmp_path, model, data)
    with pytest.raises(RuntimeError, match="start"):
        rec.step([0])
    rec.start()
    with pytest.raises(ValueError, match="out of range"):
        rec.step([0, N_TRAIN])
    with pytest.raises(ValueError, match="unknown training id"):
        rec.step(["nope"])
    with pytest.raises(ValueError, match="empty"):
        rec.step([])
    with pytest.raises(RuntimeError, match="no step"):
        rec.finish()
    assert not tmp_path.joinpath("simfluence-store.json").exists()

    with pytest.raises(ValueError, match="one loss per example"):
        Recorder(tmp_path, model=model, loss_fn=lambda m, x, y: ce_loss(m, x, y).mean(), test_inputs=x_test,
                 test_targets=y_test, train_ids=N_TRAIN).start()
    with pytest.raises(ValueError, match="NaN"):
        Recorder(tmp_path, model=model, loss_fn=lambda m, x, y: ce_loss(m, x, y) * torch.nan,
                 test_inputs=x_test, test_targets=y_test, train_ids=N_TRAIN).start()
    with pytest.raises(ValueError, match="test_ids"):
        recorder_for(tmp_path, model, data, test_ids=["a", "b"])
    with pytest.raises(RunDataError, match="duplicate"):
        recorder_for(tmp_path, model, data, train_ids=["x"] * N_TRAIN)

    # An existing store: other ids, or an existing run id, are refused before training.
    with recorder_for(tmp_path, model, data, run_id="a") as rec:
        rec.step([0])
    with pytest.raises(RunDataError, match="ids"):
        recorder_for(tmp_path, model, data, train_ids=N_TRAIN).start()
    with pytest.raises(RunDataError, match="already exists"):
        recorder_for(tmp_path, model, data, run_id="a").start()
    with pytest.raises(RunDataError, match="safe file name"):
        recorder_for(tmp_path, model, data, run_id="../x").start()
    with recorder_for(tmp_path, model, data, run_id="a", overwrite=True) as rec:
        rec.step([1])
        rec.step([2])
    assert RunStore(tmp_path).read("a").num_steps == 2


def test_length_sorted_test_chunks_give_the_same_losses_with_less_padding(tmp_path):
    pytest.importorskip("transformers")
    import hf_tiny

    from simfluence.recorder import auto_loss

    model = hf_tiny.tiny_model().eval()
    results = {}
    for sort in (True, False):
        recorder = Recorder(tmp_path / f"s{sort}", model=model, loss_fn=auto_loss, train_ids=hf_tiny.NUM_TRAIN,
                            test_inputs=hf_tiny.TEST, test_collate=hf_tiny.collate, eval_batch_size=2,
                            sort_by_length=sort)
        recorder.start()
        widths = [inputs["input_ids"].shape[1] for inputs, _ in recorder._chunks]
        results[sort] = (recorder.evaluate().numpy(), sum(widths))
        recorder.abort()
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert results[True][1] < results[False][1]   # fewer padded positions
