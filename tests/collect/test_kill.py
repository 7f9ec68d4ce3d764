"""A collection killed with SIGKILL leaves a valid store and resumes to the same result."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from simfluence.collect import collect
from simfluence.runs import RunStore

RUNS, STEPS, SEED = 40, 100, 5


def _settings():
    return dict(num_runs=RUNS, num_steps=STEPS, seed=SEED, threads=1, progress=False)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_mid_collection_then_resume(tmp_path):
    root = tmp_path / "store"
    command = [sys.executable, "-m", "simfluence.collect", "digits-mlp", "--runs", str(RUNS), "--steps",
               str(STEPS), "--seed", str(SEED), "--out", str(root), "--chunk-size", "1", "--threads", "1", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        runs_dir = root / "runs"
        # Kill once a few runs are written, while the worker is busy with the next ones.
        while time.monotonic() < deadline and process.poll() is None:
            if runs_dir.is_dir() and len(list(runs_dir.glob("run-*.parquet"))) >= 3:
                break
            time.sleep(0.005)
        assert process.poll() is None, f"collection ended before it could be killed: {process.stderr.read()}"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()

    # A writer killed inside RunStore.write leaves its temporary beside the runs; plant
    # one (truncated Parquet) so this is checked even if the kill missed that moment.
    finished = sorted(runs_dir.glob("run-*.parquet"))
    assert 3 <= len(finished) < RUNS
    (runs_dir / ".run-000039.parquet.k1ll3d.tmp.parquet").write_bytes(finished[0].read_bytes()[:100])

    store = RunStore(root)
    assert store.run_ids() == [path.stem for path in finished]  # temporaries are not runs
    for path in finished:
        pq.read_table(path)  # every finished file is complete
    partial = store.load()
    assert partial.num_runs == len(finished) and partial.losses.shape[1:] == (STEPS + 1, 100)

    resumed = collect("digits-mlp", root, **_settings()).load()  # vectorised, other chunks: same numbers
    reference = collect("digits-mlp", tmp_path / "reference", **_settings()).load()
    assert resumed.num_runs == RUNS
    np.testing.assert_array_equal(resumed.run_ids, reference.run_ids)
    np.testing.assert_array_equal(resumed.curricula, reference.curricula)
    np.testing.assert_array_equal(resumed.losses, reference.losses)  # identical, not merely close
