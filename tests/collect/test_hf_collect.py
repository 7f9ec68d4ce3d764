"""Runs through the real Hugging Face Trainer: minilm-finetune and a user's own Trainer (locally, in worker
processes, on a real `ray start --head` cluster, resumed after kill -9)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402
from workers import create_store  # noqa: E402
from simfluence.collect import UniformSampler, collect, derive_seed  # noqa: E402
from simfluence.collect.hf import CurriculumBatchSampler, collect_trainer, use_curriculum  # noqa: E402
from simfluence.runs import RunDataError, RunStore  # noqa: E402
from simfluence.tasks.finetune import MiniLMFinetune, PadCollator  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]


# --- minilm-finetune through the real Trainer -------------------------------------------------------------
def _eval_one_by_one(model, examples) -> np.ndarray:
    """Each test example's loss from its own unpadded eval-mode forward pass (no batching, no recorder)."""
    model.eval()
    losses = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            losses.append(float(F.cross_entropy(logits, torch.tensor([example["labels"]]))))
    return np.asarray(losses, dtype=np.float32)


def test_minilm_finetune_two_runs_match_a_replay_and_manual_evaluation(tmp_path):
    task = MiniLMFinetune(warmup_steps=1)
    store = collect(task, tmp_path / "store", num_runs=2, num_steps=3, seed=0, progress=False)
    runs = store.load()
    assert runs.losses.shape == (2, 4, 48) and runs.curricula.shape == (2, 3, 4)
    assert store.meta["task"] == "minilm-finetune" and store.meta["optimizer"] == "adamw"

    # The recorded curriculum is the one our sampler drew for each run.
    sampler = UniformSampler(task.default_pool(), task.batch_size)
    for r in range(2):
        np.testing.assert_array_equal(runs.curricula[r], sampler.sample(3, derive_seed(0, r)))

    # The run's meta records what decided it, including the rate the scheduler gave each step.
    meta = RunStore(tmp_path / "store").read("run-000000").meta
    trainer = meta["trainer"]
    assert trainer["optim"] == "adamw_torch" and trainer["effective_steps"] == 3 and trainer["data_seed"] == 0
    assert "num_train_epochs" not in trainer   # max_steps decides the length
    np.testing.assert_allclose(meta["learning_rates"], task.learning_rates(3), rtol=1e-12)
    assert meta["learning_rates"][0] == 0.0    # HF's warm-up: the first step has rate 0

    # Replay run 0 by hand: plain AdamW + the same rates + gradient clipping, each test loss from its own forward.
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.learning_rate, weight_decay=0.0)
    train = task.examples("train")
    expected = [_eval_one_by_one(model, task.examples("test"))]
    for rate, row in zip(task.learning_rates(3), runs.curricula[0]):
        model.train()
        batch = PadCollator()([train[i] for i in row])
        labels = batch.pop("labels")
        for group in optimizer.param_groups:
            group["lr"] = float(rate)
        F.cross_entropy(model(**batch).logits, labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(_eval_one_by_one(model, task.examples("test")))
    np.testing.assert_allclose(runs.losses[0], np.stack(expected), rtol=2e-4, atol=2e-5)
    assert np.abs(runs.losses[0, -1] - runs.losses[0, 0]).max() > 1e-3   # training moved the losses


def test_retraining_a_trainer_task_reproduces_its_collected_runs(tmp_path):
    """retrain() drives the real Trainer: the collected curricula give the collected losses again."""
    from simfluence.errors import UsageError
    from simfluence.retrain import retrain

    task = MiniLMFinetune(warmup_steps=1)
    runs = collect(task, tmp_path / "store", num_runs=2, num_steps=3, seed=0, progress=False).load()
    np.testing.assert_allclose(retrain(task, runs.curricula), runs.losses, rtol=1e-5, atol=1e-6)
    # An example removed from a step: a smaller batch (its mean over 3 examples), and other losses.
    edited = runs.curricula[:1].copy()
    edited[0, 1, 0] = -1
    changed = retrain(task, edited)
    np.testing.assert_allclose(changed[0, :2], runs.losses[0, :2], rtol=1e-5, atol=1e-6)
    assert np.abs(changed[0, 2:] - runs.losses[0, 2:]).max() > 1e-6
    edited[0, 1] = -1   # nothing left at step 2: the Trainer cannot skip it and keep its schedule
    with pytest.raises(UsageError, match="run 0 has no example left at step 2"):
        retrain(task, edited)


def test_trainer_states_are_the_collected_runs_checkpoints_and_reproduce_their_losses(tmp_path):
    """train_states / final_states replay a Trainer task through the Trainer itself (the collection's code path)."""
    from simfluence.collect.train import train_states
    from simfluence.func.checkpoints import final_states
    from simfluence.peers.base import model_at

    task = MiniLMFinetune(warmup_steps=1, train_per_class=3, test_per_class=2)
    store = collect(task, tmp_path / "store", num_runs=1, num_steps=3, seed=0, checkpoint_steps=(0, 3),
                    progress=False)
    assert store.meta["checkpoint_steps"] == [0, 3] and store.checkpoint_steps("run-000000") == [0, 3]
    runs = store.load()
    states = train_states(task, runs.curricula[0], [3, 0, 2])       # any order: returned by step
    inputs, targets = task.split_data("test")
    for step, state in zip([0, 2, 3], states):
        with torch.no_grad():
            losses = task.example_losses(model_at(task, state), inputs, targets).numpy()
        np.testing.assert_allclose(losses, runs.losses[0, step], rtol=1e-6, atol=1e-6)
    for step, state in ((0, states[0]), (3, states[2])):          # the collection's stored checkpoints
        stored = store.read_checkpoint("run-000000", step)
        assert set(stored) == set(state) and all(torch.equal(stored[key], state[key]) for key in state)
    start = task.build_model().state_dict()
    assert all(torch.equal(start[key], states[0][key]) for key in start)
    (final,) = final_states(task, runs.curricula)
    assert all(torch.equal(final[key], states[2][key]) for key in final)
    lazy = store.stored_checkpoint("run-000000", 3)                 # read on access, same tensors
    assert len(lazy) == len(final) and all(torch.equal(lazy[key], final[key]) for key in final)


def test_minilm_finetune_cli_and_its_errors(tmp_path):
    from click.testing import CliRunner

    from simfluence.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["collect", "minilm-finetune", "--runs", "1", "--steps", "2", "--out",
                                  str(tmp_path / "s"), "--option", "test_per_class=2", "--option", "train_per_class=3"])
    assert result.exit_code == 0, result.output
    assert RunStore(tmp_path / "s").load().losses.shape == (1, 3, 8)
    for args, message in ((["--device", "bogus"], "device: 'bogus' is not a torch device"),
                          (["--option", "lr_schedule=step"], "lr_schedule: unknown schedule 'step'")):
        result = runner.invoke(main, ["collect", "minilm-finetune", "--runs", "1", "--steps", "2", "--out",
                                      str(tmp_path / "t"), *args])
        assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
        assert message in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(main, ["collect", "minilm-finetune", "--runs", "1", "--steps", "2", "--out",
                                      str(tmp_path / "t"), "--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA GPU is available" in result.output


@pytest.mark.parametrize("module, extra, task", [("transformers", "text,hf", "minilm-finetune"),
                                                 ("tokenizers", "text", "text-minilm")])
def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, module, extra, task):
    from click.testing import CliRunner

    from simfluence.cli import main

    monkeypatch.setitem(sys.modules, module, None)   # `import module` now fails as if it were not installed
    result = CliRunner().invoke(main, ["collect", task, "--runs", "1", "--steps", "2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: task '{task}' needs '{module}', which is not installed: "
                                     f"pip install 'simfluence[{extra}]'")
    assert not (tmp_path / "s").exists()


# --- a user's own Trainer -----------------------------------------------------------------------------------
def _collect_tiny(root, **options):
    settings = dict(num_runs=3, num_steps=4, sampler=UniformSampler(hf_tiny.NUM_TRAIN, 2), train_ids=hf_tiny.NUM_TRAIN,
                    test_examples=hf_tiny.TEST, test_collate=hf_tiny.collate, seed=7, progress=False)
    settings.update(options)
    return collect_trainer(hf_tiny.make_tiny_trainer, root, **settings)


def _replay_tiny(curriculum: np.ndarray) -> np.ndarray:
    """The tiny run by hand: AdamW, HF's linear warm-up/decay rates, clipping; test losses in eval mode."""
    model = hf_tiny.tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 1, len(curriculum))
    test = hf_tiny.collate(hf_tiny.TEST)
    labels = test.pop("labels")

    def evaluate():
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(**test).logits, labels, reduction="none").numpy()

    losses = [evaluate()]
    for row in curriculum:
        model.train()
        batch = hf_tiny.collate([hf_tiny.TRAIN[i] for i in row])
        targets = batch.pop("labels")
        F.cross_entropy(model(**batch).logits, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(evaluate())
    return np.stack(losses)


def test_user_trainer_runs_follow_the_curriculum_and_equal_a_replay(tmp_path):
    store = _collect_tiny(tmp_path / "a")
    runs = store.load()
    sampler = UniformSampler(hf_tiny.NUM_TRAIN, 2)
    for r in range(3):
        np.testing.assert_array_equal(runs.curricula[r], sampler.sample(4, derive_seed(7, r)))
        np.testing.assert_allclose(runs.losses[r], _replay_tiny(runs.curricula[r]), rtol=1e-5, atol=1e-6)
    assert store.meta["collector"] == "trainer" and store.meta["make_trainer"] == "hf_tiny.make_tiny_trainer"

    # Worker processes give the same runs; a second call with the same settings trains nothing.
    pooled = _collect_tiny(tmp_path / "b", workers=2).load()
    np.testing.assert_allclose(pooled.losses, runs.losses, rtol=0, atol=1e-6)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "runs").iterdir()}
    _collect_tiny(tmp_path / "a")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "runs").iterdir()} == before
    with pytest.raises(RunDataError, match="meta"):
        _collect_tiny(tmp_path / "a", seed=8)


def test_curriculum_sampler_splits_rows_for_gradient_accumulation():
    curriculum = np.array([[0, 1, 2, 3], [4, 5, -1, -1]])
    assert list(CurriculumBatchSampler(curriculum, 2)) == [[0, 1], [2, 3], [4], [5]]
    with pytest.raises(ValueError, match="step 2 has 2 examples, fewer than the 3"):
        CurriculumBatchSampler(curriculum, 3)


def test_gradient_accumulation_records_whole_steps(tmp_path):
    trainer = hf_tiny.make_tiny_trainer(0, np.zeros((3, 4)))
    trainer.args.gradient_accumulation_steps = 2
    curriculum = UniformSampler(hf_tiny.NUM_TRAIN, 4).sample(3, 1)
    from simfluence.recorder import SimfluenceCallback

    callback = SimfluenceCallback(tmp_path / "s", test_inputs=hf_tiny.TEST, test_collate=hf_tiny.collate)
    callback.attach(trainer)
    use_curriculum(trainer, curriculum)
    trainer.train()
    np.testing.assert_array_equal(callback.log.curriculum, curriculum)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_user_trainer_on_a_ray_cluster(tmp_path):
    ray = pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the `ray` command is not installed beside this Python")
    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    # A local test cluster: loopback only, and no token authentication (an earlier local Ray may have left
    # ~/.ray/auth_token, which would switch `ray start` to token mode while this driver runs without it).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "RAY_DISABLE_USAGE_STATS": "1", "RAY_AUTH_MODE": "disabled"}
    started = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                              "--num-cpus=2",
                              "--include-dashboard=false", "--disable-usage-stats"], env=env, capture_output=True,
                             text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        by_ray = _collect_tiny(tmp_path / "ray", executor="ray", workers=2, address=f"127.0.0.1:{port}").load()
        local = _collect_tiny(tmp_path / "local").load()
        np.testing.assert_array_equal(by_ray.curricula, local.curricula)
        np.testing.assert_allclose(by_ray.losses, local.losses, rtol=0, atol=1e-6)
    finally:
        ray.shutdown()
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import hf_tiny
from simfluence.collect import UniformSampler
from simfluence.collect.hf import collect_trainer
collect_trainer(hf_tiny.make_tiny_trainer, {root!r}, num_runs={runs}, num_steps=4,
                sampler=UniformSampler(hf_tiny.NUM_TRAIN, 2), train_ids=hf_tiny.NUM_TRAIN, test_examples=hf_tiny.TEST,
                test_collate=hf_tiny.collate, seed=7, progress=False)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_user_trainer_collection_resumes_after_kill(tmp_path):
    runs = 12
    root = tmp_path / "store"
    script = KILL_SCRIPT.format(tests=str(TESTS), root=str(root), runs=runs)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            if (root / "runs").is_dir() and len(list((root / "runs").glob("run-*.parquet"))) >= 2:
                break
            time.sleep(0.01)
        assert process.poll() is None, f"collection ended before it could be killed: {process.stderr.read()}"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    done = RunStore(root).run_ids()
    assert 2 <= len(done) < runs
    resumed = _collect_tiny(root, num_runs=runs).load()
    reference = _collect_tiny(tmp_path / "reference", num_runs=runs).load()
    assert list(resumed.run_ids) == list(reference.run_ids)
    np.testing.assert_allclose(resumed.losses, reference.losses, rtol=0, atol=1e-6)


def test_concurrent_creation_of_one_store_lets_exactly_one_win(tmp_path):
    context = multiprocessing.get_context("spawn")
    for trial in range(4):
        root = tmp_path / f"store-{trial}"
        barrier, results = context.Barrier(2), context.Queue()
        workers = [context.Process(target=create_store, args=(root, {"lr": lr}, barrier, results)) for lr in (0.1, 0.2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        outcomes = sorted(results.get(timeout=10) for _ in workers)
        assert outcomes[1] == "ok" and outcomes[0].startswith("error:") and "meta" in outcomes[0], outcomes
        assert json.loads((root / "simfluence-store.json").read_text())["meta"]["lr"] in (0.1, 0.2)
        shutil.rmtree(root)


def test_example_script_collects_a_users_trainer_and_fits(tmp_path):
    script = TESTS.parent / "examples" / "own_trainer.py"
    result = subprocess.run([sys.executable, str(script), "--runs", "3", "--steps", "2", "--heldout", "1",
                             "--out", str(tmp_path / "own")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "96 training and 48 test examples" in result.stdout and "auto chose" in result.stdout
    runs = RunStore(tmp_path / "own").load()
    assert runs.num_runs == 3 and runs.losses.shape[1:] == (3, 48)


def test_gradient_methods_and_featurized_refuse_trainer_runs():
    from simfluence.runs import RunSet
    from simfluence.simulators import FeaturizedSimulator, GradDotSimulator

    runs = RunSet.create(np.zeros((1, 2, 1), np.int32), np.ones((1, 3, 2), np.float32), ["a"], ["t0", "t1"],
                         meta={"task": "minilm-finetune", "task_config": {}})
    for simulator in (GradDotSimulator(), FeaturizedSimulator()):
        with pytest.raises(RunDataError, match="cannot replay"):
            simulator.fit(runs)
