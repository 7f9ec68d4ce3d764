"""Benchmark: subset-training LDS of the simulators against the number of fitting runs.

For one task, ``max(--sizes)`` fitting runs are collected once (uniform curricula, seed
``--seed``) and ``--subsets`` random halves of the training pool are retrained along one fresh
curriculum each (:func:`simfluence.lds.subset_counterfactuals`, seed 0, the same counterfactuals
as ``simfluence lds``). Each simulator is fitted on the first n fitting runs, n in ``--sizes``,
and scored by the subset LDS (mean over test examples of the Spearman across subsets between
the mean rollout over 16 curricula of a subset and its retrained final loss, with a 95 %
bootstrap interval), so one can read whether more fitting runs would lift a simulator above
a peer's score from ``simfluence lds``.

Usage::

    python benchmarks/lds_runs.py --task digits-mlp --sizes 48,96,192
    python benchmarks/lds_runs.py --task tiny-lm --steps 50 --subsets 30 --sizes 24,48,96
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _common import benchmark_parser, markdown_table, timed, write_json

from simfluence.collect import collect
from simfluence.lds import SimulatorMethod, score_method, subset_counterfactuals
from simfluence.simulators import capabilities, make_simulator
from simfluence.tasks import get_task

METHODS = ("linear-identity", "additive", "featurized")


def main() -> None:
    """Collect, retrain the subsets, fit at each size, print the table."""
    parser = benchmark_parser(__doc__, seed="seed of the fitting runs' curricula")
    parser.add_argument("--task", default="digits-mlp", help="a built-in task that trains with plain SGD")
    parser.add_argument("--sizes", default="48,96,192", help="comma-separated numbers of fitting runs")
    parser.add_argument("--steps", type=int, default=100, help="steps per run")
    parser.add_argument("--subsets", type=int, default=50, help="random halves of the pool, each retrained")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated simulator kinds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out-dir", default="out/lds_runs", help="the run store (reused when present)")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    runs = collect(task, Path(args.out_dir) / args.task, sizes[-1], args.steps, args.seed).load()
    subsets, seconds = timed(subset_counterfactuals, task, args.steps, num_subsets=args.subsets,
                             batch_size=runs.batch_size, seed=0)
    print(f"{args.task}: retrained {args.subsets} subsets twice in {seconds:.1f} s", flush=True)
    rows = []
    for size in sizes:
        fitting = runs.select(np.arange(size))
        for kind in methods:
            simulator = make_simulator(kind, task=task) if capabilities(kind).task != "none" else make_simulator(kind)
            _, fit_seconds = timed(simulator.fit, fitting)
            record = score_method(SimulatorMethod(kind, simulator, size, fit_seconds), subsets)
            rows.append({"num_runs": size, "method": kind, "lds": record["mean"], "low": record["low"],
                         "high": record["high"], "fit_seconds": fit_seconds})
            print(f"  n={size:<4} {kind:<16} LDS {record['mean']:.3f} [{record['low']:.3f}, {record['high']:.3f}]"
                  f"  fit {fit_seconds:.1f} s", flush=True)
    table = [[kind, *(next(f"{row['lds']:.3f} [{row['low']:.2f}, {row['high']:.2f}]" for row in rows
                           if row["method"] == kind and row["num_runs"] == size) for size in sizes)]
             for kind in methods]
    print()
    print("\n".join(markdown_table(["method", *(f"{size} runs" for size in sizes)], table)))
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
