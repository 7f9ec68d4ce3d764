import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from simfluence import RunDataError, RunLog, RunSet, RunStore, load_runs, save_runs
from simfluence.runs.interchange import read_interchange, write_interchange


def assert_same(a, b):
    for name in ("curricula", "losses", "eval_steps", "train_ids", "test_ids", "run_ids"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.meta == b.meta


def test_interchange_round_trip(tmp_path, small_runs):
    path = write_interchange(small_runs, tmp_path / "runs.npz")
    assert_same(read_interchange(path), small_runs)
    assert not list(tmp_path.glob(".*tmp*"))


def test_store_round_trip_with_padding_and_sparse_evals(tmp_path, small_runs):
    curricula = small_runs.curricula.copy()
    curricula[0, 3, 2:] = -1
    runs = type(small_runs).create(curricula, small_runs.losses[:, ::3], small_runs.train_ids,
                                   small_runs.test_ids, eval_steps=np.arange(0, 31, 3),
                                   run_ids=small_runs.run_ids, meta=small_runs.meta)
    save_runs(runs, tmp_path / "store")
    assert_same(load_runs(tmp_path / "store"), runs)
    table = pq.read_table(tmp_path / "store" / "runs" / "run-000000.parquet")
    assert table.column_names == ["step", "batch", "loss"] and table.num_rows == 31
    assert table.column("loss").null_count == 20  # steps without an evaluation


def test_store_resume_checks_ids_and_meta(tmp_path, small_runs):
    store = RunStore.create(tmp_path, small_runs.train_ids, small_runs.test_ids, {"task": "x"})
    store.write(small_runs.logs()[0])
    again = RunStore.create(tmp_path, small_runs.train_ids, small_runs.test_ids, {"task": "x"}, exist_ok=True)
    assert again.run_ids() == ["run-000000"] and "run-000000" in again
    with pytest.raises(RunDataError, match="already exists"):
        RunStore.create(tmp_path, small_runs.train_ids, small_runs.test_ids, {"task": "x"})
    with pytest.raises(RunDataError, match="meta"):
        RunStore.create(tmp_path, small_runs.train_ids, small_runs.test_ids, {"task": "y"}, exist_ok=True)
    with pytest.raises(RunDataError, match="ids"):
        RunStore.create(tmp_path, small_runs.train_ids[::-1], small_runs.test_ids, {"task": "x"}, exist_ok=True)


def test_store_rejects_foreign_and_broken_files(tmp_path, small_runs):
    store = RunStore.create(tmp_path / "a", small_runs.train_ids, small_runs.test_ids)
    other = RunStore.create(tmp_path / "b", [f"x{i}" for i in range(small_runs.num_train)], small_runs.test_ids)
    other.write(small_runs.logs()[0])
    (tmp_path / "b" / "runs" / "run-000000.parquet").rename(tmp_path / "a" / "runs" / "run-000000.parquet")
    with pytest.raises(RunDataError, match="run-000000.parquet: field 'ids_digest'"):
        store.load()
    (tmp_path / "a" / "runs" / "run-000000.parquet").write_bytes(b"garbage")
    with pytest.raises(RunDataError, match="not a readable Parquet"):
        store.load()
    with pytest.raises(RunDataError, match="not a safe file name"):
        store.write(RunLog("../evil", small_runs.curricula[0], small_runs.losses[0], small_runs.eval_steps))
    bad = RunLog("run-x", small_runs.curricula[0] + 1000, small_runs.losses[0], small_runs.eval_steps)
    with pytest.raises(RunDataError, match="curriculum.*out of range"):
        store.write(bad)
    with pytest.raises(RunDataError, match="not a run store"):
        RunStore(tmp_path / "nowhere")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "simfluence-store.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RunDataError, match="format"):
        RunStore(tmp_path / "c")


def test_interchange_errors(tmp_path, small_runs):
    def write(**arrays):
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)
        return path

    good = dict(curricula=small_runs.curricula, losses=small_runs.losses, train_ids=small_runs.train_ids,
                test_ids=small_runs.test_ids, meta=np.array("{}"))
    for missing in ("curricula", "losses", "train_ids", "test_ids", "meta"):
        arrays = {k: v for k, v in good.items() if k != missing}
        with pytest.raises(RunDataError, match=f"bad.npz: field '{missing}': is missing"):
            read_interchange(write(**arrays))
    with pytest.raises(RunDataError, match="object array"):
        read_interchange(write(**{**good, "train_ids": np.array(list(small_runs.train_ids), dtype=object)}))
    with pytest.raises(RunDataError, match="meta"):
        read_interchange(write(**{**good, "meta": np.array([1, 2])}))
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(RunDataError, match="not an .npz archive"):
        read_interchange(tmp_path / "text.npz")
    with pytest.raises(RunDataError, match="does not exist"):
        load_runs(tmp_path / "absent.npz")


def test_flipped_bytes_in_a_data_page_are_caught_by_page_checksums(tmp_path):
    store = RunStore.create(tmp_path / "s", ["a", "b"], ["t0", "t1"])
    losses = np.array([[1.25, 2.5], [0.125, 0.75]], dtype=np.float32)
    path = store.write(RunLog("run-0", np.array([[0, 1]]), losses, np.array([0, 1]), 0, {}))
    data = bytearray(path.read_bytes())
    needle = np.float32(0.75).tobytes()   # neither the min nor the max: only in the data page, not statistics
    offset = bytes(data).find(needle)
    assert offset > 0
    data[offset:offset + 4] = np.float32(6.0e23).tobytes()   # a plausible float: only a checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(RunDataError, match="corrupted"):
        store.read("run-0")


def test_run_files_of_another_version_are_rejected(tmp_path):
    store = RunStore.create(tmp_path / "s", ["a", "b"], ["t0"])
    path = store.write(RunLog("run-0", np.array([[0, 1]]), np.ones((2, 1), np.float32), np.array([0, 1]), 0, {}))
    table = pq.read_table(path)
    info = json.loads(table.schema.metadata[b"simfluence"])
    pq.write_table(table.replace_schema_metadata({"simfluence": json.dumps({**info, "version": 99})}), path)
    with pytest.raises(RunDataError, match="unsupported run-file version 99"):
        store.read("run-0")


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def test_npz_headers_are_checked_before_any_data_is_read(tmp_path, monkeypatch):
    import zipfile

    import simfluence.runs.interchange as interchange

    runs = RunSet.create(np.zeros((1, 2, 1), np.int32), np.ones((1, 3, 2), np.float32), ["a"], ["t0", "t1"])
    save_runs(runs, tmp_path / "good.npz")
    # A member no one asked for is not read at all, even a broken one.
    with zipfile.ZipFile(tmp_path / "good.npz", "a") as archive:
        archive.writestr("extra.npy", b"\x93NUMPY garbage")
    assert read_interchange(tmp_path / "good.npz").num_runs == 1
    # A header that declares more data than the member holds is named as truncated; nothing is allocated.
    lying = _npy_bytes(np.ones((1, 3, 2), np.float32)).replace(b"(1, 3, 2)", b"(9, 3, 2)")
    with zipfile.ZipFile(tmp_path / "good.npz") as source, zipfile.ZipFile(tmp_path / "bad.npz", "w") as target:
        for item in source.infolist():
            target.writestr(item, lying if item.filename == "losses.npy" else source.read(item))
    with pytest.raises(RunDataError, match="field 'losses': is truncated"):
        read_interchange(tmp_path / "bad.npz")
    # Declared sizes over the limit are refused before loading.
    monkeypatch.setattr(interchange, "MAX_ARRAY_BYTES", 16)
    with pytest.raises(RunDataError, match="declare more than 16 bytes"):
        read_interchange(tmp_path / "good.npz")


def test_a_run_copied_from_a_collection_with_other_settings_is_refused(tmp_path):
    import shutil

    first = RunStore.create(tmp_path / "a", ["a", "b"], ["t0"], meta={"learning_rate": 0.1})
    second = RunStore.create(tmp_path / "b", ["a", "b"], ["t0"], meta={"learning_rate": 0.5})
    path = first.write(RunLog("run-0", np.array([[0, 1]]), np.ones((2, 1), np.float32), np.array([0, 1]), 0, {}))
    shutil.copy(path, second.run_path("run-0"))
    with pytest.raises(RunDataError, match="field 'store_meta_digest': the run was collected with other settings"):
        second.load()
    assert first.load().num_runs == 1
