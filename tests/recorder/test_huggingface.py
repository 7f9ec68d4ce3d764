"""SimfluenceCallback, IndexedDataset and IndexedCollator: recording a Hugging Face Trainer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from simfluence.recorder import IndexedCollator, IndexedDataset
from simfluence.runs.log import PAD
from simfluence.runs.store import RunStore

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

    from simfluence.recorder import SimfluenceCallback

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
    from simfluence.recorder import SimfluenceCallback

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
    from simfluence.recorder import SimfluenceCallback

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
    from simfluence.recorder import SimfluenceCallback

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
