"""Benchmark: held-out accuracy against the number of fitting runs.

For each task, ``--fit-runs`` (64) fitting runs and ``--heldout-runs`` (16) held-out runs are
collected (uniform curricula over all training examples, different seeds). Each method is
fitted on the first n fitting runs, n in ``--sizes`` (4, 8, 16, 32, 64), and scored on the same
held-out runs (:func:`simfluence.evaluate.score`): all-steps MSE and across-run Spearman.
The mean trajectory of the same n runs is the baseline; "featurized (features only)" is the
featurized simulator without its per-pair residuals.

Target: ``featurized`` reaches Linear's 32-run all-steps MSE with at most 8 runs.

Writes a Markdown table to stdout and a plot (``--plot``, default ``docs/img/data_efficiency.png``).

Usage::

    python benchmarks/data_efficiency.py                            # digits-mlp and text-minilm
    python benchmarks/data_efficiency.py --task digits-mlp --sizes 4,8 --json out/efficiency.json
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _common import benchmark_parser, markdown_table, number, timed, write_json

from simfluence.collect import UniformSampler, collect
from simfluence.evaluate import score
from simfluence.runs.atomic import atomic_path
from simfluence.simulators import make_simulator
from simfluence.tasks import get_task

TASKS = ("digits-mlp", "text-minilm")
METHODS = ("featurized", "featurized (features only)", "linear-identity", "linear", "additive", "mean-trajectory")
VARIANTS = {"featurized (features only)": ("featurized", {"fit_residuals": False})}  # no per-pair residuals


def measure(task_name: str, args) -> list[dict]:
    task = get_task(task_name)
    every = UniformSampler(np.arange(task.num_train), task.batch_size)
    out = Path(args.out_dir) / task_name
    fitting = collect(task, out / "fit", max(args.sizes), args.steps, args.seed, every).load()
    heldout = collect(task, out / "heldout", args.heldout_runs, args.steps, args.seed + 1, every).load()
    rows = []
    for size in args.sizes:
        subset = fitting.select(np.arange(size))
        for method in METHODS:
            kind, params = VARIANTS.get(method, (method, {}))
            simulator, seconds = timed(make_simulator(kind, **params).fit, subset)
            metrics = score(simulator.simulate(heldout.curricula, heldout.initial_losses), heldout)
            rows.append({"task": task_name, "num_runs": size, "method": method, "mse": metrics.mse,
                         "across_run_spearman": metrics.across_run_spearman, "fit_seconds": seconds})
            print(f"  {task_name} n={size:<3} {method:<16} MSE {metrics.mse:.4g}  across-run Spearman "
                  f"{metrics.across_run_spearman:.3f}  ({seconds:.1f} s)", flush=True)
    return rows


def markdown(rows: list[dict], sizes: list[int]) -> str:
    lines = []
    for metric, title in (("mse", "all-steps MSE"), ("across_run_spearman", "across-run Spearman")):
        table = []
        for task in dict.fromkeys(row["task"] for row in rows):
            for method in METHODS:
                values = {row["num_runs"]: row[metric] for row in rows
                          if row["task"] == task and row["method"] == method}
                table.append([task, method, *(number(values.get(size)) for size in sizes)])
        lines += [f"**{title}** (held-out runs) by number of fitting runs", "",
                  *markdown_table(["task", "method", *sizes], table), ""]
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for task in dict.fromkeys(row["task"] for row in rows):
        mse = {(row["method"], row["num_runs"]): row["mse"] for row in rows if row["task"] == task}
        for reference in ("linear", "linear-identity"):
            if (reference, 32) not in mse:
                continue
            goal = mse[(reference, 32)]
            reached = sorted(size for (method, size), value in mse.items() if method == "featurized" and value <= goal)
            verdict = f"first reached with {reached[0]} runs" if reached else "never reached"
            met = bool(reached) and reached[0] <= 8
            lines.append(f"{task}: {reference} with 32 runs has all-steps MSE {goal:.4g}; featurized {verdict} "
                         f"(target <= 8 runs: {'met' if met else 'NOT met'})")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(row["task"] for row in rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for column, task in enumerate(tasks):
        for k, method in enumerate(METHODS):
            mine = sorted((row for row in rows if row["task"] == task and row["method"] == method),
                          key=lambda row: row["num_runs"])
            sizes = [row["num_runs"] for row in mine]
            style = dict(marker="o", label=method, color=plt.cm.tab10(k),
                         linestyle="--" if method in ("mean-trajectory", "featurized (features only)") else "-")
            axes[0][column].plot(sizes, [row["mse"] for row in mine], **style)
            if method != "mean-trajectory":
                axes[1][column].plot(sizes, [row["across_run_spearman"] for row in mine], **style)
        axes[0][column].set(title=task, xscale="log", yscale="log", ylabel="held-out all-steps MSE")
        axes[1][column].set(xscale="log", xlabel="fitting runs", ylabel="held-out across-run Spearman")
        for axis in axes[:, column]:
            axis.minorticks_off()
            axis.set_xticks(sorted({row["num_runs"] for row in rows}))
            axis.set_xticklabels(sorted({row["num_runs"] for row in rows}))
            axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--task", action="append", choices=TASKS, help="repeatable; default: both")
    parser.add_argument("--sizes", default="4,8,16,32,64", help="comma-separated numbers of fitting runs")
    parser.add_argument("--heldout-runs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default="out/data_efficiency", help="run stores (reused when present)")
    parser.add_argument("--plot", default="docs/img/data_efficiency.png")
    args = parser.parse_args()
    args.sizes = sorted(int(size) for size in args.sizes.split(","))
    torch.set_num_threads(args.threads)
    rows = [row for task in (args.task or TASKS) for row in measure(task, args)]
    print()
    print(markdown(rows, args.sizes))
    print("\n".join(targets(rows)))
    plot(rows, Path(args.plot))
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
