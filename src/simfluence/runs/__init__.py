"""Run data model and storage: :class:`RunLog`, :class:`RunSet`, :class:`RunStore`, interchange files."""

from simfluence.runs.interchange import read_interchange, write_interchange
from simfluence.runs.log import PAD, RunDataError, RunLog, RunSet
from simfluence.runs.store import RunStore, load_runs, save_runs

__all__ = [
    "PAD",
    "RunDataError",
    "RunLog",
    "RunSet",
    "RunStore",
    "load_runs",
    "read_interchange",
    "save_runs",
    "write_interchange",
]
