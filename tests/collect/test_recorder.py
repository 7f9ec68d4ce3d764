"""Recorder (plain PyTorch loop) and SimfluenceCallback (Hugging Face Trainer)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from simfluence.collect.recorder import (
    IndexedCollator,
    IndexedDataset,
    Recorder,
    causal_lm_example_loss,
    from_criterion,
)
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


def test_causal_lm_example_loss_matches_manual():
    torch.manual_seed(0)
    n, length, vocab = 4, 7, 11
    logits = torch.randn(n, length, vocab)
    labels = torch.randint(vocab, (n, length))
    labels[1, 5:] = -100
    mask = torch.ones(n, length, dtype=torch.long)
    mask[2, 4:] = 0
    got = causal_lm_example_loss(logits, labels, mask)
    for i in range(n):
        terms = [-torch.log_softmax(logits[i, j - 1], -1)[labels[i, j]] for j in range(1, length)
                 if labels[i, j] != -100 and mask[i, j] == 1]
        torch.testing.assert_close(got[i], torch.stack(terms).mean(), rtol=0, atol=1e-6)
    assert torch.isnan(causal_lm_example_loss(logits[:1], torch.full((1, length), -100))).all()


# --- Hugging Face Trainer --------------------------------------------------------------------
VOCAB, PAD_ID = 50, 0


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=1, eos_token_id=1, pad_token_id=PAD_ID)
    return transformers.GPT2LMHeadModel(config)


def token_examples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(2, VOCAB, size=int(rng.integers(3, 9))).tolist()} for _ in range(count)]


def pad_collate(examples: list[dict]) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), PAD_ID)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        ids[i, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[i, :len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class SpyCollator(IndexedCollator):
    """Records the indices of every micro-batch the dataloader produces."""

    def __init__(self, collator):
        super().__init__(collator)
        self.seen: list[list[int]] = []

    def __call__(self, features):
        batch = super().__call__(features)
        self.seen.append(batch["example_index"].tolist())
        return batch


def trainer_for(tmp_path, train, model, callbacks, **args):
    from transformers import Trainer, TrainingArguments

    defaults = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, learning_rate=5e-2, seed=0,
                    per_device_train_batch_size=4)
    return Trainer(model=model, args=TrainingArguments(**{**defaults, **args}), train_dataset=train,
                   callbacks=callbacks)


def manual_lm_losses(model, examples) -> np.ndarray:
    """Per-example mean token loss, one example at a time, by HF's own loss."""
    losses = []
    model.eval()
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return np.array(losses, dtype=np.float32)


def test_hf_callback_records_batches_and_losses(tmp_path):
    from transformers import TrainerCallback

    from simfluence.collect.recorder import SimfluenceCallback

    model = tiny_gpt2()
    train, test = token_examples(22, seed=1), token_examples(9, seed=2)
    snapshots = [copy.deepcopy(model.state_dict())]

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append(copy.deepcopy(model.state_dict()))

    callback = SimfluenceCallback(tmp_path / "store", test_inputs=test, test_collate=pad_collate,
                                  eval_batch_size=4, run_id="hf-0", meta={"note": "tiny"})
    assert isinstance(callback, TrainerCallback)
    spy = SpyCollator(pad_collate)
    trainer = trainer_for(tmp_path, IndexedDataset(train), model, [callback, Snapshot()],
                          gradient_accumulation_steps=2, num_train_epochs=2)
    trainer.data_collator = spy
    trainer.train()

    runs = RunStore(tmp_path / "store").load()
    assert runs.run_ids.tolist() == ["hf-0"] and runs.num_train == 22 and runs.num_test == 9
    # 22 examples in micro-batches of 4 (4,4,4,4,4,2) and optimizer steps of 2 micro-batches: 3 steps/epoch.
    assert runs.num_steps == trainer.state.global_step == 6
    micro = spy.seen
    assert [len(b) for b in micro] == [4, 4, 4, 4, 4, 2] * 2
    expected_rows = [micro[i] + micro[i + 1] for i in range(0, len(micro), 2)]
    for row, expected in zip(runs.curricula[0], expected_rows):
        assert row[row != PAD].tolist() == expected
    kept = runs.curricula[0][runs.curricula[0] != PAD]
    assert kept.size == 44 and np.bincount(kept, minlength=22).tolist() == [2] * 22
    for epoch in (kept[:22], kept[22:]):
        assert sorted(epoch.tolist()) == list(range(22))
    # Recorded losses equal HF's own loss of each test example, one at a time, at every step.
    assert len(snapshots) == 7
    for step, state in enumerate(snapshots):
        model.load_state_dict(state)
        np.testing.assert_allclose(runs.losses[0, step], manual_lm_losses(model, test), rtol=0, atol=1e-5)
    log = RunStore(tmp_path / "store").read("hf-0")
    assert log.meta["note"] == "tiny" and log.meta["trainer"]["gradient_accumulation_steps"] == 2
    assert callback.log is not None and callback.log.run_id == "hf-0"


def test_hf_callback_attach_max_steps_eval_every(tmp_path):
    from simfluence.collect.recorder import SimfluenceCallback

    model = tiny_gpt2()
    train, test = token_examples(30, seed=3), token_examples(5, seed=4)
    test_batch = pad_collate(test)
    train_with_text = [{**example, "text": "unused column"} for example in train]

    def strict_collate(examples):
        assert all(set(example) == {"input_ids"} for example in examples), "unused columns were not removed"
        return pad_collate(examples)

    callback = SimfluenceCallback(tmp_path / "store", test_inputs=test_batch, eval_every=2)
    trainer = trainer_for(tmp_path, train_with_text, model, [], max_steps=5, gradient_accumulation_steps=3,
                          per_device_train_batch_size=2)
    trainer.data_collator = strict_collate
    callback.attach(trainer)
    assert isinstance(trainer.train_dataset, IndexedDataset) and callback.train_ids == 30
    spy = SpyCollator(trainer.data_collator.collator)
    spy.columns = trainer.data_collator.columns
    trainer.data_collator = spy
    trainer.train()
    log = RunStore(tmp_path / "store").read("run-000000")
    assert log.eval_steps.tolist() == [0, 2, 4, 5]
    # The dataloader may prefetch beyond max_steps; only the 15 trained micro-batches count.
    assert len(spy.seen) >= 15
    assert log.curriculum.tolist() == [sum(spy.seen[3 * t:3 * t + 3], []) for t in range(5)]
    np.testing.assert_allclose(log.losses[-1], manual_lm_losses(model, test), rtol=0, atol=1e-5)


def test_hf_callback_without_index_fails_fast_and_writes_nothing(tmp_path):
    from simfluence.collect.recorder import SimfluenceCallback

    model = tiny_gpt2()
    train, test = token_examples(8, seed=5), token_examples(3, seed=6)
    callback = SimfluenceCallback(tmp_path / "store", test_inputs=pad_collate(test), train_ids=8)
    trainer = trainer_for(tmp_path, train, model, [callback], max_steps=2)
    trainer.data_collator = pad_collate
    with pytest.raises(RuntimeError, match="IndexedDataset"):
        trainer.train()
    assert not (tmp_path / "store").exists()


def test_hf_callback_with_dataloader_workers(tmp_path):
    """Collation in worker processes: the indices travel inside the batch."""
    from simfluence.collect.recorder import SimfluenceCallback

    model = tiny_gpt2()
    train, test = token_examples(20, seed=7), token_examples(4, seed=8)
    callback = SimfluenceCallback(tmp_path / "store", test_inputs=pad_collate(test))
    trainer = trainer_for(tmp_path, train, model, [], num_train_epochs=1, dataloader_num_workers=2,
                          gradient_accumulation_steps=2)
    trainer.data_collator = pad_collate
    callback.attach(trainer).train()
    log = RunStore(tmp_path / "store").read("run-000000")
    assert [int((row != PAD).sum()) for row in log.curriculum] == [8, 8, 4]
    assert sorted(log.curriculum[log.curriculum != PAD].tolist()) == list(range(20))
