"""Benchmark: subset-training LDS of the simulators against the number of fitting runs and of sampled curricula.

For one task, ``max(--sizes)`` fitting runs are collected once (uniform curricula, seed
``--seed``) and ``--subsets`` random halves of the training pool are retrained along one fresh
curriculum each (:func:`simfluence.lds.subset_counterfactuals`, seed 0, the same counterfactuals
as ``simfluence lds``). Each simulator is fitted on the first n fitting runs, n in ``--sizes``,
and scored by the subset LDS (mean over test examples of the Spearman across subsets between its
prediction of a subset and the retrained final loss, with a 95 % bootstrap interval), so one can
read whether more fitting runs would lift a simulator above a peer's score from ``simfluence lds``.
The prediction is the simulator's expected final loss as ``simfluence lds`` takes it (in closed
form where the kind has one, ``Simulator.simulate_expected``); ``--draws 16,128`` adds the mean
rollout over the first k of the subset's sampled curricula, for each k, beside it.

Usage::

    python benchmarks/lds_runs.py --task digits-mlp --sizes 48,96,192
    python benchmarks/lds_runs.py --task tiny-lm --steps 50 --subsets 30 --sizes 24,48,96
    python benchmarks/lds_runs.py --task digits-mlp --sizes 48 --draws 16,128 --methods linear-identity,additive
"""

from __future__ import annotations

from dataclasses import replace
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
    parser.add_argument("--draws", default="", help="comma-separated numbers of sampled curricula per subset "
                        "whose mean rollout is scored beside the expected loss (empty: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out-dir", default="out/lds_runs", help="the run store (reused when present)")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    methods = args.methods.split(",")
    draws = [int(k) for k in args.draws.split(",") if k]
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    runs = collect(task, Path(args.out_dir) / args.task, sizes[-1], args.steps, args.seed).load()
    subsets, seconds = timed(subset_counterfactuals, task, args.steps, num_subsets=args.subsets,
                             batch_size=runs.batch_size, seed=0, draws=max([16, *draws]))
    predictions = {"expected": subsets, **{f"{k} draws": replace(subsets, sampler=None,
                                                                    simulated=subsets.simulated[:, :k])
                                           for k in draws}}
    print(f"{args.task}: retrained {args.subsets} subsets twice in {seconds:.1f} s", flush=True)
    rows = []
    for size in sizes:
        fitting = runs.select(np.arange(size))
        for kind in methods:
            simulator = make_simulator(kind, task=task) if capabilities(kind).task != "none" else make_simulator(kind)
            _, fit_seconds = timed(simulator.fit, fitting)
            for prediction, counterfactuals in predictions.items():
                record = score_method(SimulatorMethod(kind, simulator, size, fit_seconds), counterfactuals)
                rows.append({"num_runs": size, "method": kind, "prediction": prediction, "lds": record["mean"],
                             "low": record["low"], "high": record["high"], "fit_seconds": fit_seconds})
                print(f"  n={size:<4} {kind:<16} {prediction:<10} LDS {record['mean']:.3f} "
                      f"[{record['low']:.3f}, {record['high']:.3f}]  fit {fit_seconds:.1f} s", flush=True)
    table = [[kind, prediction, *(next(f"{row['lds']:.3f} [{row['low']:.2f}, {row['high']:.2f}]" for row in rows
                                       if (row["method"], row["prediction"], row["num_runs"]) == (kind, prediction,
                                                                                                   size))
                                  for size in sizes)]
             for kind in methods for prediction in predictions]
    print()
    print("\n".join(markdown_table(["method", "prediction", *(f"{size} runs" for size in sizes)], table)))
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
