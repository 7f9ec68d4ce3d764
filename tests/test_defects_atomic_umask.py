"""Atomic writes read the process umask without changing it (collection writes from threads)."""

import os
import sys
import threading

from simfluence.runs import atomic
from simfluence.runs.atomic import atomic_path, write_text_atomic


def _umask_calls_during(action) -> list[str]:
    """Run ``action`` in this thread and list the functions that call ``os.umask`` while it runs."""
    calls = []

    def profile(frame, event, arg):
        if event == "c_call" and arg is os.umask:
            calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return calls


def test_atomic_write_never_sets_the_umask(tmp_path):
    # Setting the umask (even to restore it) leaves a window in which another thread
    # creates world-writable files: the write path must only read it.
    calls = _umask_calls_during(lambda: write_text_atomic(tmp_path / "a.txt", "x"))
    assert calls == []
    assert (tmp_path / "a.txt").read_text() == "x"


def test_atomic_file_gets_plain_open_permissions_under_the_current_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a.bin") as temporary:
            temporary.write_bytes(b"x")
        with open(tmp_path / "plain.bin", "wb") as stream:
            stream.write(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~0o027
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777


def test_concurrent_atomic_writes_leave_the_umask_alone(tmp_path):
    umask = atomic.current_umask()
    errors = []

    def write(worker):
        try:
            for k in range(50):
                write_text_atomic(tmp_path / f"w{worker}-{k}.txt", "x")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert atomic.current_umask() == umask
    modes = {path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes == {0o666 & ~umask}
