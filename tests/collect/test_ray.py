"""collect(executor="ray"): same runs as the local executor, resumable, on a local Ray."""

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
ray = pytest.importorskip("ray")

from simfluence.collect import collect  # noqa: E402
from simfluence.collect.executors import RayExecutor, get_executor  # noqa: E402

TASK = "digits-mlp"


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray (no dashboard) for the module; shut down at the end."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _collect(root, **options):
    settings = dict(num_runs=4, num_steps=10, seed=3, threads=1, progress=False, chunk_size=1)
    settings.update(options)
    return collect(TASK, root, **settings)


def _mtimes(store):
    return {run_id: store.run_path(run_id).stat().st_mtime_ns for run_id in store.run_ids()}


def test_ray_matches_local_and_resumes_without_training(tmp_path, local_ray, monkeypatch):
    by_ray = _collect(tmp_path / "ray", executor="ray", workers=2)
    local = _collect(tmp_path / "local").load()
    runs = by_ray.load()
    assert list(runs.run_ids) == list(local.run_ids) == [f"run-{r:06d}" for r in range(4)]
    np.testing.assert_array_equal(runs.curricula, local.curricula)
    np.testing.assert_allclose(runs.losses, local.losses, rtol=0, atol=1e-6)

    maps = []
    original = RayExecutor.map
    monkeypatch.setattr(RayExecutor, "map", lambda self, fn, chunks: maps.append(len(chunks)) or original(self, fn, chunks))
    before = _mtimes(by_ray)
    _collect(tmp_path / "ray", executor="ray", workers=2)
    assert maps == [] and _mtimes(by_ray) == before

    by_ray.run_path("run-000002").unlink()
    _collect(tmp_path / "ray", executor="ray", workers=2)
    assert maps == [1] and len(by_ray) == 4
    np.testing.assert_allclose(by_ray.load().losses, local.losses, rtol=0, atol=1e-6)


def test_get_executor_ray():
    executor = get_executor("ray", 3, address="ray://nowhere:10001")  # connects only in map()
    assert isinstance(executor, RayExecutor) and executor.workers == 3 and executor.address == "ray://nowhere:10001"
    with pytest.raises(ValueError, match="^workers:"):
        get_executor("ray", 0)
    with pytest.raises(ValueError, match="^address: only for executor='ray'"):
        get_executor("local", 1, address="auto")


def test_missing_ray_is_a_one_line_error(monkeypatch):
    from simfluence.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "ray", None)   # makes `import ray` fail as if it were not installed
    with pytest.raises(MissingExtraError, match=r"^executor 'ray' needs 'ray', which is not installed: "
                                                r"pip install 'simfluence\[ray\]'$"):
        get_executor("ray", 2)
