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
    command = [sys.executable, "-m", "simfluence.cli", "collect", "digits-mlp", "--runs", str(RUNS), "--steps",
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


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads parent ids from /proc")
@pytest.mark.parametrize("how", ["kill -9", "kill (SIGTERM)", "Ctrl-C (SIGINT to the process group)"])
def test_workers_exit_when_the_collecting_parent_is_killed(tmp_path, how):
    command = [sys.executable, "-m", "simfluence.cli", "collect", "digits-mlp", "--runs", "400", "--steps", "200",
               "--workers", "2", "--out", str(tmp_path / "s")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "s" / "runs").is_dir():
            time.sleep(0.05)
        workers = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [pid for pid in _children(process.pid)
                       if "spawn_main" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")]
            time.sleep(0.05)
        assert len(workers) == 2, "the pool's workers did not start"
        if how == "kill -9":
            os.kill(process.pid, signal.SIGKILL)
        elif how == "kill (SIGTERM)":
            os.kill(process.pid, signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") and
                                                  open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                                                  for pid in workers):
            time.sleep(0.1)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")
                 and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, f"workers {alive} outlived their killed parent"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
