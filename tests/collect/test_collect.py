"""collect(): store contents, reproducibility, resume, argument checks, process pool."""

import numpy as np
import pytest

import simfluence.collect.collector as collector
from simfluence.collect import EpochSampler, collect, derive_seed
from simfluence.collect.train import train_run
from simfluence.runs import RunDataError, RunStore
from simfluence.tasks import get_task

TASK = "digits-mlp"


def _collect(root, **options):
    settings = dict(num_runs=6, num_steps=15, seed=3, threads=1, progress=False)
    settings.update(options)
    return collect(TASK, root, **settings)


def _mtimes(store):
    return {run_id: store.run_path(run_id).stat().st_mtime_ns for run_id in store.run_ids()}


@pytest.fixture
def count_chunks(monkeypatch):
    """Counts the runs that collect() hands to workers."""
    trained = []

    def counting(chunk):
        trained.extend(chunk.run_indices)
        return collector_run_chunk(chunk)

    collector_run_chunk = collector.run_chunk
    monkeypatch.setattr(collector, "run_chunk", counting)
    return trained


def test_collect_writes_a_loadable_store(tmp_path):
    store = _collect(tmp_path / "store", chunk_size=4)
    runs = RunStore(tmp_path / "store").load()
    assert runs.num_runs == 6 and runs.num_steps == 15 and runs.batch_size == 4
    assert runs.losses.shape == (6, 16, 100) and runs.every_step
    assert list(runs.run_ids) == [f"run-{r:06d}" for r in range(6)]
    task = get_task(TASK)
    np.testing.assert_array_equal(runs.train_ids, task.train_ids)
    assert store.meta["task"] == TASK and store.meta["learning_rate"] == task.learning_rate
    assert store.meta["seed"] == 3 and store.meta["num_steps"] == 15
    assert store.meta["sampler"]["kind"] == "uniform" and store.meta["batch_size"] == 4


def test_a_run_is_reproducible_on_its_own(tmp_path):
    store = _collect(tmp_path / "store")
    log = store.read("run-000004")
    assert log.seed == derive_seed(3, 4)
    task = get_task(TASK)
    curriculum = collector.UniformSampler(task.default_pool(), 4).sample(15, log.seed)
    np.testing.assert_array_equal(log.curriculum, curriculum)
    assert np.abs(train_run(task, curriculum).losses - log.losses).max() < 1e-5


def test_resume_trains_nothing_when_done_and_only_missing_runs_otherwise(tmp_path, count_chunks):
    store = _collect(tmp_path / "store")
    assert sorted(count_chunks) == list(range(6))
    before = _mtimes(store)
    count_chunks.clear()
    _collect(tmp_path / "store")
    assert count_chunks == [] and _mtimes(store) == before

    kept = store.read("run-000002")
    store.run_path("run-000002").unlink()
    _collect(tmp_path / "store", num_runs=8)  # also extends the collection
    assert sorted(count_chunks) == [2, 6, 7]
    np.testing.assert_array_equal(store.read("run-000002").losses, kept.losses)
    assert len(store) == 8


@pytest.mark.parametrize("change", [dict(num_steps=16), dict(seed=4), dict(eval_steps=[0, 5, 15]),
                                    dict(sampler=EpochSampler(np.arange(200), 4))])
def test_resuming_with_other_settings_is_refused(tmp_path, change):
    _collect(tmp_path / "store", num_runs=1)
    with pytest.raises(RunDataError, match="meta"):
        _collect(tmp_path / "store", num_runs=1, **change)


def test_another_task_setting_is_refused(tmp_path):
    _collect(tmp_path / "store", num_runs=1)
    with pytest.raises(RunDataError, match="meta"):
        collect(get_task(TASK, learning_rate=0.5), tmp_path / "store", 1, 15, seed=3, threads=1, progress=False)


def test_loop_and_vectorised_collections_agree(tmp_path):
    vectorised = _collect(tmp_path / "a").load()
    loop = _collect(tmp_path / "b", vectorize=False).load()
    np.testing.assert_array_equal(loop.curricula, vectorised.curricula)
    assert np.abs(loop.losses - vectorised.losses).max() < 1e-5


def test_the_cli_takes_the_collection_settings(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from simfluence.cli import main

    chunks = []

    def recording(chunk):
        chunks.append(chunk)
        return collector_run_chunk(chunk)

    collector_run_chunk = collector.run_chunk
    monkeypatch.setattr(collector, "run_chunk", recording)
    result = CliRunner().invoke(main, ["collect", TASK, "--runs", "3", "--steps", "15", "--seed", "3", "--out",
                                       str(tmp_path / "cli"), "--chunk-size", "1", "--threads", "2",
                                       "--no-vectorize", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [chunk.run_indices for chunk in chunks] == [(0,), (1,), (2,)]
    assert all(not chunk.vectorize and chunk.num_threads == 2 for chunk in chunks)
    loop = _collect(tmp_path / "library", num_runs=3, vectorize=False).load()
    np.testing.assert_array_equal(RunStore(tmp_path / "cli").load().losses, loop.losses)


def test_eval_steps_and_epoch_sampler(tmp_path):
    sampler = EpochSampler(np.arange(50, 90), 4, subset_size=20)
    runs = _collect(tmp_path / "store", sampler=sampler, eval_steps=[0, 1, 10, 15]).load()
    np.testing.assert_array_equal(runs.eval_steps, [0, 1, 10, 15])
    assert runs.losses.shape == (6, 4, 100)
    assert set(np.unique(runs.curricula)) <= set(range(50, 90))


@pytest.mark.parametrize("options, message", [
    (dict(num_runs=0), "^num_runs:"),
    (dict(num_steps=2.5), "^num_steps:"),
    (dict(sampler=collector.UniformSampler([0, 200], 4)), "^sampler: draws index 200"),
    (dict(sampler="uniform"), "^sampler: expected a Sampler"),
    (dict(address="auto"), "^address: only for executor='ray'"),
    (dict(executor="nope"), "^executor 'nope' is unknown"),
    (dict(workers=0), "^workers:"),
    (dict(chunk_size=0), "^chunk_size:"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _collect(tmp_path / "store", **options)


def test_process_pool_matches_in_process(tmp_path):
    local = _collect(tmp_path / "local", num_runs=4, num_steps=10).load()
    pooled = _collect(tmp_path / "pool", num_runs=4, num_steps=10, workers=2).load()
    np.testing.assert_array_equal(pooled.curricula, local.curricula)
    np.testing.assert_array_equal(pooled.losses, local.losses)


def test_a_second_collection_into_a_store_in_use_is_refused(tmp_path):
    import os

    store = collect("digits-mlp", tmp_path / "s", num_runs=1, num_steps=3, progress=False)
    with store.collecting():
        with pytest.raises(RunDataError, match=rf"the store is in use by PID {os.getpid()} \(another collection\)"):
            collect("digits-mlp", tmp_path / "s", num_runs=2, num_steps=3, progress=False)
    assert len(collect("digits-mlp", tmp_path / "s", num_runs=2, num_steps=3, progress=False)) == 2


def test_a_collection_removes_temporaries_left_by_killed_writers(tmp_path):
    import os
    import time

    store = collect("digits-mlp", tmp_path / "s", num_runs=1, num_steps=3, progress=False)
    stale = store.root / "runs" / ".run-000001.parquet.abc.tmp.parquet"
    fresh = store.root / "runs" / ".run-000002.parquet.def.tmp.parquet"
    for path in (stale, fresh):
        path.write_bytes(b"")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    collect("digits-mlp", tmp_path / "s", num_runs=2, num_steps=3, progress=False)
    assert not stale.exists() and fresh.exists()   # a young temporary may still have a writer
    assert store.run_ids() == ["run-000000", "run-000001"]
