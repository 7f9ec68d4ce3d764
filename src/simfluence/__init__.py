"""simfluence: training data attribution by simulating training runs."""

from simfluence.runs import RunDataError, RunLog, RunSet, RunStore, load_runs, save_runs

__version__ = "0.1.0"
__all__ = ["RunDataError", "RunLog", "RunSet", "RunStore", "__version__", "load_runs", "save_runs"]
