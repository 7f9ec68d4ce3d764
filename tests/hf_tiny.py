"""A tiny Hugging Face Trainer setup built from a config (no weights to load), for collection tests.

Module-level, so worker processes and Ray tasks can import :func:`make_tiny_trainer`.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

VOCAB, NUM_TRAIN, NUM_TEST, NUM_LABELS = 40, 12, 6, 3


def _examples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(3, 9))
        ids = [1] + rng.integers(4, VOCAB, length).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": int(ids[1] % NUM_LABELS)})
    return out


TRAIN = _examples(NUM_TRAIN, 0)
TEST = _examples(NUM_TEST, 1)


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(example["input_ids"]) for example in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, :len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([example["labels"] for example in examples])}


def tiny_model():
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=NUM_LABELS,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config)


def training_arguments(num_steps: int, learning_rate: float = 1e-2, warmup_steps: int = 1):
    import transformers

    return transformers.TrainingArguments(
        output_dir=os.path.join(tempfile.gettempdir(), "simfluence-tests-trainer"), max_steps=num_steps,
        per_device_train_batch_size=2, learning_rate=learning_rate, warmup_steps=warmup_steps,
        lr_scheduler_type="linear", report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0,
    )


def make_tiny_trainer(run_index: int, curriculum: np.ndarray):
    """The same tiny classifier and AdamW settings for every run; the collector applies the curriculum."""
    import transformers

    return transformers.Trainer(model=tiny_model(), args=training_arguments(len(curriculum)), train_dataset=TRAIN,
                                data_collator=collate)
