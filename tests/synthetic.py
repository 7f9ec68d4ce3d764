"""The library's synthetic run sets (:mod:`simfluence.runs.synthetic`), under the name the tests import."""

from simfluence.runs.synthetic import linear_runs, linear_trajectories, trajectory_runs

__all__ = ["linear_runs", "linear_trajectories", "trajectory_runs"]
