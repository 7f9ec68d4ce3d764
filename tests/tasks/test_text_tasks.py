"""The text tasks: text-minilm (frozen MiniLM + head) and tiny-lm (GPT-2 language model).

Fast tests use small settings of the real tasks (real WordNet data, the real MiniLM
weights, a real GPT-2) with a fresh cache folder and the network blocked; tests with
the default settings are marked slow.
"""

import os
import socket
import time

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from simfluence.cache import cached_tensors
from simfluence.collect.curricula import UniformSampler
from simfluence.collect.train import train_run, train_runs_vmap
from simfluence.tasks import get_task, list_tasks
from simfluence.tasks import glosses as glosses_module
from simfluence.tasks import lm as lm_module
from simfluence.tasks import text as text_module
from simfluence.tasks.glosses import DATA_DIR, load_glosses

SMALL_TEXT = dict(classes=("noun.animal", "noun.food", "verb.motion"), train_per_class=4, test_per_class=2,
                  pretrain_per_class=(3, 1, 0), pretrain_steps=20)
SMALL_LM = dict(train_per_lexname=3, test_per_lexname=2, vocab_size=600, n_embd=32, n_head=2, pretrain_steps=3,
                pretrain_batch=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh, private SIMFLUENCE_CACHE (and offline Hugging Face) for the whole module."""
    folder = tmp_path_factory.mktemp("simfluence-cache")
    saved = {name: os.environ.get(name) for name in ("SIMFLUENCE_CACHE", "HF_HUB_OFFLINE")}
    os.environ["SIMFLUENCE_CACHE"] = str(folder)
    os.environ["HF_HUB_OFFLINE"] = "1"
    _clear_memory_caches()
    yield folder
    _clear_memory_caches()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _clear_memory_caches():
    """Forget everything computed in this process (as a fresh worker process would)."""
    for function in (text_module._features, text_module._pretrained_head, lm_module._split, lm_module._tokenizer,
                     lm_module._pretrained_state):
        function.cache_clear()


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)


def _short_run(task, steps=12, seed=0):
    curriculum = UniformSampler(task.default_pool(), task.batch_size).sample(steps, seed)
    return curriculum, train_run(task, curriculum)


# --- shipped data --------------------------------------------------------------------
def test_tasks_are_registered():
    names = [info.name for info in list_tasks()]
    assert "text-minilm" in names and "tiny-lm" in names


def test_shipped_wordnet_sample_is_whole_and_licensed():
    glosses = load_glosses()
    assert glosses.ids.size == 7200 and np.unique(glosses.ids).size == 7200
    names, counts = np.unique(glosses.lexnames, return_counts=True)
    assert names.size == 36 and (counts == 200).all()
    assert all(definition.strip() for definition in glosses.definitions)
    assert all(identifier.startswith(("wn-n-", "wn-v-")) for identifier in glosses.ids)
    notice = (DATA_DIR / "WORDNET_LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in notice
    assert (DATA_DIR / "README.md").exists()
    assert (DATA_DIR / "wordnet_glosses.tsv").stat().st_size < 1_000_000


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="pretrain_per_class"):
        get_task("text-minilm", pretrain_per_class=(1, 2))
    with pytest.raises(ValueError, match="not in the shipped WordNet sample"):
        get_task("text-minilm", classes=("noun.animal", "noun.nonsense"), pretrain_per_class=(1, 1)).data
    with pytest.raises(ValueError, match="requested over all splits"):
        get_task("text-minilm", train_per_class=200, test_per_class=30).data
    with pytest.raises(ValueError, match="multiple of n_head"):
        get_task("tiny-lm", n_embd=30, n_head=4)


# --- disk cache ----------------------------------------------------------------------
def test_cache_computes_once_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMFLUENCE_CACHE", str(tmp_path / "cache"))
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(5.0)}

    first = cached_tensors("thing", {"a": 1}, compute)
    second = cached_tensors("thing", {"a": 1}, compute)
    third = cached_tensors("thing", {"a": 2}, compute)
    assert len(calls) == 2 and torch.equal(first["x"], second["x"]) and torch.equal(first["x"], third["x"])
    assert sorted(path.suffix for path in (tmp_path / "cache").iterdir()) == [".lock", ".lock", ".pt", ".pt"]


# --- text-minilm -----------------------------------------------------------------------
def test_text_minilm_loads_offline_with_disjoint_real_splits(cache, no_network):
    task = get_task("text-minilm", **SMALL_TEXT)
    data = task.data
    assert (task.num_train, task.num_test) == (12, 6)
    assert data.train_inputs.shape == (12, 384) and data.train_inputs.dtype == torch.float32
    assert torch.isfinite(data.train_inputs).all() and data.train_inputs.abs().sum(dim=1).min() > 0
    assert data.train_targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    split = task._split()
    groups = [set(split[name].tolist()) for name in ("train", "test", "pretrain")]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:])
    glosses = load_glosses()
    assert list(data.test_ids) == list(glosses.ids[split["test"]])
    assert [glosses.lexnames[row] for row in split["train"]] == [name for name in task.classes for _ in range(4)]
    assert any(path.name.startswith("minilm-embeddings-") for path in cache.iterdir())


def test_minilm_embeddings_follow_the_sentence_transformers_recipe(cache):
    texts = ("a domestic animal", "a dog kept as a pet", "to run fast", "a domestic animal")
    embeddings = text_module.minilm_embeddings(texts)
    assert embeddings.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)  # normalised
    np.testing.assert_array_equal(embeddings[0], embeddings[3])
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.4 > 0.2 > similarity[0, 2]  # a real sentence encoder, not noise


def test_text_minilm_checkpoint_identical_across_builds_and_fresh_processes(cache):
    task = get_task("text-minilm", **SMALL_TEXT)
    first = task.build_model()
    assert _states_equal(first, task.build_model())
    _clear_memory_caches()  # what a new worker process starts with (embeddings come from the disk cache)
    again = get_task("text-minilm", **SMALL_TEXT)
    assert _states_equal(first, again.build_model())
    assert torch.equal(task.data.train_inputs, again.data.train_inputs)


def test_text_minilm_short_run_changes_losses_and_vmap_agrees(cache):
    task = get_task("text-minilm", **SMALL_TEXT)
    curriculum, log = _short_run(task)
    assert log.losses.shape == (13, 6) and np.isfinite(log.losses).all()
    assert np.abs(log.losses[-1] - log.losses[0]).max() > 1e-3
    vectorised = train_runs_vmap(task, curriculum[None])[0]
    np.testing.assert_allclose(vectorised.losses, log.losses, atol=1e-5)


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers(cache):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = list(load_glosses().definitions[:16])
    model = sentence_transformers.SentenceTransformer(str(glosses_module.minilm_dir()), device="cpu")
    expected = model.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(text_module._encode(texts).numpy(), expected, atol=1e-5)


# --- tiny-lm ---------------------------------------------------------------------------
def test_tiny_lm_loads_offline_with_real_definitions(cache, no_network):
    task = get_task("tiny-lm", **SMALL_LM)
    data = task.data
    assert (task.num_train, task.num_test) == (12, 8)
    ids, mask = data.train_inputs["input_ids"], data.train_inputs["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[1] <= task.max_length
    assert (ids[:, 0] == lm_module.BOS_ID).all()
    lengths = mask.sum(dim=1)
    assert (ids[torch.arange(ids.shape[0]), lengths - 1] == lm_module.EOS_ID).all()  # nothing was cut
    assert torch.equal(data.train_targets, ids.masked_fill(mask == 0, -100))
    assert int(ids.max()) < task.vocab_size
    tokenizer = task.tokenizer()
    assert tokenizer.get_vocab_size() == task.vocab_size
    glosses = load_glosses()
    row = task._split()["test"][0]
    assert glosses.lexnames[row] in task.finetune_lexnames
    text = tokenizer.decode(data.test_inputs["input_ids"][0].tolist())
    assert text.replace(" ", "") == glosses.definitions[row].lower().replace(" ", "")
    corpus = task.pretraining_texts()
    assert glosses.definitions[row] not in corpus and len(corpus) > 6000


def test_tiny_lm_example_loss_is_the_mean_token_loss(cache):
    task = get_task("tiny-lm", **SMALL_LM)
    model, data = task.build_model(), task.data
    with torch.no_grad():
        losses = task.example_losses(model, data.test_inputs, data.test_targets)
        for i in range(task.num_test):
            length = int(data.test_inputs["attention_mask"][i].sum())
            tokens = data.test_inputs["input_ids"][i, :length]
            logits = model(input_ids=tokens[None]).logits[0]  # no padding at all
            manual = -torch.log_softmax(logits[:-1], dim=-1)[torch.arange(length - 1), tokens[1:]].mean()
            torch.testing.assert_close(losses[i], manual, rtol=1e-5, atol=1e-5)
        logits = model(**data.test_inputs).logits
        reference = F.cross_entropy(logits[:, :-1].transpose(1, 2), data.test_targets[:, 1:], reduction="none")
        counts = (data.test_targets[:, 1:] != -100).sum(dim=1)
        torch.testing.assert_close(losses, reference.sum(dim=1) / counts, rtol=1e-5, atol=1e-5)


def test_tiny_lm_checkpoint_identical_across_builds_processes_and_recomputation(cache):
    task = get_task("tiny-lm", **SMALL_LM)
    first = task.build_model()
    assert _states_equal(first, task.build_model())
    _clear_memory_caches()  # a fresh process: loads the checkpoint from the disk cache
    assert _states_equal(first, get_task("tiny-lm", **SMALL_LM).build_model())
    for path in cache.glob("tiny-lm-checkpoint-*.pt"):
        path.unlink()
    _clear_memory_caches()  # no cache at all: pretraining again gives the same bits
    torch.manual_seed(987)
    assert _states_equal(first, get_task("tiny-lm", **SMALL_LM).build_model())


def test_tiny_lm_short_run_changes_losses_and_vmap_agrees(cache):
    task = get_task("tiny-lm", **SMALL_LM)
    curriculum, log = _short_run(task, steps=8)
    assert log.losses.shape == (9, 8) and np.isfinite(log.losses).all()
    assert np.abs(log.losses[-1] - log.losses[0]).max() > 1e-3
    vectorised = train_runs_vmap(task, curriculum[None])[0]
    np.testing.assert_allclose(vectorised.losses, log.losses, atol=1e-4)


# --- default settings ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name, limit", [("text-minilm", 10.0), ("tiny-lm", 30.0)])
def test_default_task_runs_100_steps_in_seconds(cache, name, limit):
    task = get_task(name)
    assert 150 <= task.num_train <= 250 and 48 <= task.num_test <= 100
    task.build_model()
    _short_run(task, steps=2)  # warm-up
    start = time.perf_counter()
    _, log = _short_run(task, steps=100)
    assert time.perf_counter() - start < limit
    assert np.isfinite(log.losses).all() and log.losses[-1].mean() < log.losses[0].mean()


def test_text_minilm_linear_beats_mean_trajectory(cache):
    """The acceptance check, on the default task (about 5 s, embeddings included)."""
    from simfluence.evaluate import evaluate, split_runs
    from simfluence.runs.log import RunSet
    from simfluence.simulators import LinearIdentitySimulator

    task = get_task("text-minilm")
    curricula = UniformSampler(task.default_pool(), task.batch_size).sample_many(100, range(32))
    runs = RunSet.from_logs(train_runs_vmap(task, curricula), task.train_ids, task.test_ids)
    fit, heldout = split_runs(runs, 8)
    evaluation = evaluate(LinearIdentitySimulator().fit(fit), heldout)
    assert evaluation.metrics.mse < 0.5 * evaluation.baselines["mean-trajectory"].mse


@pytest.mark.slow
def test_tiny_lm_linear_beats_mean_trajectory(cache):
    """About 2-3 minutes: 32 runs of the default tiny-lm (pretraining included)."""
    from simfluence.evaluate import evaluate, split_runs
    from simfluence.runs.log import RunSet
    from simfluence.simulators import LinearSimulator

    task = get_task("tiny-lm")
    curricula = UniformSampler(task.default_pool(), task.batch_size).sample_many(100, range(32))
    logs = [train_run(task, curriculum, run_id=f"run-{r:06d}") for r, curriculum in enumerate(curricula)]
    runs = RunSet.from_logs(logs, task.train_ids, task.test_ids)
    fit, heldout = split_runs(runs, 8)
    evaluation = evaluate(LinearSimulator().fit(fit), heldout)
    assert evaluation.metrics.mse < 0.8 * evaluation.baselines["mean-trajectory"].mse
