"""The paper's comparison as one call: every method scored on the same held-out runs.

:func:`run_benchmark` collects (or reuses) runs of a task, splits them into fitting and
held-out runs, fits every simulator (learned, gradient-based and baselines), scores each
on the held-out runs with :mod:`simfluence.evaluate`, and writes

* ``benchmark.json``: all metrics per method with fit and simulate times (seconds), plus
  a data-efficiency table (the learned simulators among the methods, fitted on the first 4, 8,
  16, 32 runs);
* ``benchmark.md``: the same as Markdown tables;
* ``trajectories.png``: true vs simulated losses of a few test examples in one held-out run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simfluence.errors import UsageError
from simfluence.evaluate import METRICS, evaluate, split_runs
from simfluence.runs.atomic import write_text_atomic
from simfluence.runs.log import RunSet
from simfluence.simulators import capabilities, make_simulator, simulator_kinds
from simfluence.simulators.uncertainty import interval_coverage

LEARNED = tuple(simulator_kinds("learned"))
EXTENSIONS = tuple(simulator_kinds("extension"))
GRADIENT = tuple(simulator_kinds("gradient"))
BASELINES = tuple(simulator_kinds("baseline"))
ALL_METHODS = LEARNED + EXTENSIONS + GRADIENT + BASELINES
"""The groups of the comparison: the registry's families (:class:`~simfluence.simulators.Capabilities`)."""
INTERVAL_LEVEL = 0.9


@dataclass
class BenchmarkConfig:
    """Settings of one benchmark. ``quick`` shrinks everything for a smoke run (CI)."""

    task: str = "digits-mlp"
    out_dir: str = "benchmark"
    num_runs: int = 48
    num_steps: int = 100
    num_heldout: int = 8
    seed: int = 0
    methods: tuple[str, ...] = ALL_METHODS
    efficiency_sizes: tuple[int, ...] = (4, 8, 16, 32)
    workers: int = 1
    plot_examples: int = 4
    task_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides) -> BenchmarkConfig:
        """A small configuration for a smoke run (CI); ``overrides`` replace any field."""
        return cls(**{"num_runs": 24, "num_steps": 50, "num_heldout": 6, "efficiency_sizes": (4, 8, 16),
                      **overrides})


def _simulator(method: str, task) -> Any:
    """A new ``method`` simulator, given the task when it uses one (rather than rebuilding it from the runs)."""
    return make_simulator(method, task=task) if capabilities(method).task != "none" else make_simulator(method)


def _fit_and_score(method: str, task, fitting: RunSet, heldout: RunSet) -> tuple[dict, np.ndarray]:
    simulator = _simulator(method, task)
    start = time.perf_counter()
    simulator.fit(fitting)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predicted = simulator.simulate(heldout.curricula, heldout.initial_losses)
    simulate_seconds = time.perf_counter() - start
    result = evaluate(simulator, heldout, predicted=predicted)
    record: dict[str, Any] = {"method": method, **result.metrics.as_dict(), "fit_seconds": fit_seconds,
              "simulate_seconds": simulate_seconds}
    if simulator.capabilities.intervals:
        lower, _, upper = simulator.simulate_interval(heldout.curricula, heldout.initial_losses, INTERVAL_LEVEL)
        record["interval"] = {"level": INTERVAL_LEVEL, **interval_coverage(lower, upper, heldout)}
    for key in ("ridge", "scale"):
        if key in simulator.fit_info:
            record[key] = simulator.fit_info[key]
    return record, predicted


def sgd_replaying(methods) -> list[str]:
    """The simulator kinds among ``methods`` that read the task in ways a Trainer task does not support.

    They replay its training with plain SGD or read its example features, which a Hugging Face
    Trainer task's runs do not support; kinds that declare ``trainer_tasks`` (they need only the
    starting model and the task's own replay) are not among them.
    """
    return [name for name in methods if name in ALL_METHODS and capabilities(name).task != "none"
            and not capabilities(name).trainer_tasks]


def run_benchmark(config: BenchmarkConfig, progress: bool = True) -> dict:
    """Run the comparison described in the module docstring; returns the JSON record."""
    from simfluence.collect import collect
    from simfluence.tasks import get_task

    unknown = sorted(set(config.methods) - set(ALL_METHODS))
    if unknown:
        raise UsageError(f"methods: unknown {unknown}; choose from {list(ALL_METHODS)}")
    out = Path(config.out_dir)
    task = get_task(config.task, **config.task_options)
    methods = tuple(config.methods)
    replaying = sgd_replaying(methods) if task.runner == "trainer" else []
    if replaying:   # before collecting anything
        if methods != ALL_METHODS:
            raise UsageError(f"methods: task '{task.name}' trains through the Hugging Face Trainer, which "
                             f"{replaying} cannot replay; leave them out")
        methods = tuple(name for name in methods if name not in replaying)
        if progress:
            print(f"  {task.name} trains through the Hugging Face Trainer: leaving out {', '.join(replaying)}")
    store = collect(task, out / "runs", config.num_runs, config.num_steps, config.seed, workers=config.workers,
                    progress=progress)
    runs = store.load()
    fitting, heldout = split_runs(runs, config.num_heldout, config.seed)

    records, predictions = [], {}
    for method in methods:
        record, predictions[method] = _fit_and_score(method, task, fitting, heldout)
        records.append(record)
        if progress:
            print(f"  {method:<18} all-steps MSE {record['mse']:.4g}  ({record['fit_seconds']:.1f} s fit)")

    efficiency = []
    for size in config.efficiency_sizes:
        if size > fitting.num_runs:
            continue
        subset = fitting.select(np.arange(size))
        for method in (method for method in LEARNED if method in methods):
            record, _ = _fit_and_score(method, task, subset, heldout)
            efficiency.append({"num_runs": size, **record})

    result = {"config": {**asdict(config), "methods": list(methods)},
              "task": task.name, "num_fitting_runs": fitting.num_runs, "num_heldout_runs": heldout.num_runs,
              "num_steps": runs.num_steps, "num_train": runs.num_train, "num_test": runs.num_test,
              "methods": records, "data_efficiency": efficiency}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "benchmark.json", json.dumps(result, indent=1))
    write_text_atomic(out / "benchmark.md", benchmark_markdown(result))
    plot_trajectories(heldout, predictions, out / "trajectories.png", config.plot_examples)
    return result


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def benchmark_markdown(result: dict) -> str:
    """The benchmark ``result`` (as :func:`run_benchmark` returns it) as a Markdown report."""
    columns = ["method", *METRICS, "fit_seconds", "simulate_seconds"]
    baseline = next((r for r in result["methods"] if r["method"] == "mean-trajectory"), None)
    rows = []
    for record in result["methods"]:
        row = dict(record)
        if baseline and record["mse"]:
            row["mse vs mean-trajectory"] = baseline["mse"] / record["mse"]
        rows.append(row)
    text = [f"# Benchmark: {result['task']}", "",
            f"{result['num_fitting_runs']} fitting runs, {result['num_heldout_runs']} held-out runs, "
            f"{result['num_steps']} steps, {result['num_train']} training and {result['num_test']} test examples. "
            "Metrics on held-out runs, rolled out from the true initial losses; "
            "`mse vs mean-trajectory` > 1 means better than the mean-trajectory baseline.", "",
            _table(rows, columns + (["mse vs mean-trajectory"] if baseline else [])), ""]
    intervals = [{"method": r["method"], **r["interval"]} for r in result["methods"] if "interval" in r]
    if intervals:
        text += ["## Prediction intervals", "",
                 "Share of held-out (run, step, test example) losses inside the interval, all steps and final step; "
                 "mean width in loss units.", "",
                 _table(intervals, ["method", "level", "coverage", "final_coverage", "width", "final_width"]), ""]
    if result["data_efficiency"]:
        text += ["## Data efficiency", "", "Learned simulators fitted on the first n fitting runs.", "",
                 _table(result["data_efficiency"], ["num_runs", "method", *METRICS]), ""]
    return "\n".join(text)


def plot_trajectories(heldout: RunSet, predictions: dict[str, np.ndarray], path: Path, num_examples: int = 4,
                      run: int = 0) -> Path:
    """PNG of :func:`trajectories_figure` at ``path``."""
    import matplotlib.pyplot as plt

    fig = trajectories_figure(heldout, predictions, num_examples, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trajectories_figure(heldout: RunSet, predictions: dict[str, np.ndarray], num_examples: int = 4, run: int = 0):
    """True vs simulated trajectories for the test examples whose loss moves most in ``run`` (matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true = heldout.losses[run]
    movement = np.abs(true[-1] - true[0])
    examples = np.argsort(-movement)[:num_examples]
    fig, axes = plt.subplots(1, len(examples), figsize=(4 * len(examples) + 2, 3.4), squeeze=False)
    steps = np.arange(heldout.num_steps + 1)
    for ax, m in zip(axes[0], examples):
        ax.plot(heldout.eval_steps, true[:, m], color="black", linewidth=2.5, label="true")
        for k, (method, predicted) in enumerate(predictions.items()):
            ax.plot(steps, predicted[run, :, m], linewidth=1, label=method, color=plt.cm.tab20(k % 20))
        ax.set_title(f"{heldout.test_ids[m]}", fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("test loss")
    # One legend for all panels, beside them: inside a panel it would cover data.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(0.86, 0.5), frameon=False)
    fig.suptitle(f"held-out run {heldout.run_ids[run]}: true vs simulated", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    return fig
