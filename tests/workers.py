"""Functions that tests run in spawned processes: importable by name from the tests directory
(pytest's ``pythonpath``), which spawned children inherit, unlike the test modules themselves."""

from __future__ import annotations

from simfluence.runs import RunDataError, RunStore


def create_store(root, meta, barrier, results) -> None:
    """Wait for the other process, then create one store at ``root``; report ``ok`` or the one-line error."""
    barrier.wait()
    try:
        RunStore.create(root, ["a", "b"], ["t"], meta=meta, exist_ok=True)
        results.put("ok")
    except RunDataError as error:
        results.put(f"error: {error}")
