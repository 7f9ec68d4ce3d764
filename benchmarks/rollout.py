"""Benchmark: how fast a fitted Simfluence-Linear model rolls out trajectories.

(test example x step) predictions per second of :func:`simfluence.simulators.linear.rollout` and
of ``LinearSimulator.simulate``, against a NumPy loop over steps that is vectorised over runs
and test examples (:func:`naive_rollout`), for N=2,000 training and M=500 test examples,
200 curricula x 200 steps, batch 8, float32. The coefficients are the ground truth of
:class:`simfluence.runs.synthetic.LinearGroundTruth`. Target: >= 1e8 /s.

Usage::

    python benchmarks/rollout.py              # full size
    python benchmarks/rollout.py --threads 1  # when other processes share the cores
    python benchmarks/rollout.py --quick      # small sizes, CI smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from _common import (
    Size,
    add_threads_argument,
    benchmark_parser,
    best_of,
    check,
    finish,
    fmt_seconds,
    parse_fit_arguments,
    print_header,
    print_table,
    print_targets,
)

from simfluence.runs.synthetic import LinearGroundTruth, epoch_curricula
from simfluence.simulators import LinearIdentitySimulator
from simfluence.simulators.linear import rollout

FULL = Size(2000, 500, 200, 200, held_out=0)
QUICK = Size(300, 100, 50, 60, held_out=0)


def naive_rollout(a: np.ndarray, b: np.ndarray, curricula: np.ndarray, initial: np.ndarray, alpha_offset: float
                  ) -> np.ndarray:
    """NumPy loop over steps, vectorised over runs and test examples: gather the batch rows, sum, update."""
    num_runs, num_steps, _ = curricula.shape
    out = np.empty((num_runs, num_steps + 1, a.shape[1]), dtype=np.float32)
    loss = initial.astype(np.float32)
    out[:, 0] = loss
    for t in range(num_steps):
        batch = curricula[:, t]
        loss = (alpha_offset + a[batch].sum(1)) * loss + b[batch].sum(1)
        out[:, t + 1] = loss
    return out


def bench_rollout(args: argparse.Namespace, size: Size) -> dict[str, Any]:
    print(f"\n=== rollout: N={size.num_train:,} train, M={size.num_test:,} test, {size.num_runs} curricula x "
          f"{size.num_steps} steps, batch {size.batch}, float32 ===")
    truth = LinearGroundTruth(size.num_train, size.num_test, size.batch, args.seed)
    blocks = [truth.table(cols) for cols in truth.blocks()]
    half = [t.shape[1] // 2 for t in blocks]
    table = torch.cat([t[:, :h] for t, h in zip(blocks, half)] + [t[:, h:] for t, h in zip(blocks, half)], 1)
    rng = np.random.default_rng([args.seed, 3])
    curricula = epoch_curricula(size.num_runs, size.num_steps, size.batch, size.num_train, rng)
    initial = np.repeat(truth.initial[None], size.num_runs, 0)
    simulator = LinearIdentitySimulator(ridge=1.0)
    simulator.train_ids = np.array([f"train-{i}" for i in range(size.num_train)])
    simulator.test_ids = np.array([f"test-{m}" for m in range(size.num_test)])
    simulator.table = table
    predictions = size.num_runs * size.num_steps * size.num_test
    rollout(table, curricula[:2], initial[:2], 1.0, True)  # warm-up
    fast_seconds, fast = best_of(args.repeats, rollout, table, curricula, initial, 1.0, True)
    simulate_seconds, _ = best_of(args.repeats, simulator.simulate, curricula, initial)
    a, b = table[:, :size.num_test].numpy(), table[:, size.num_test:].numpy()
    naive_seconds, naive = best_of(args.repeats, naive_rollout, a, b, curricula, initial, 1.0)
    difference = float(np.abs(fast - naive).max())
    rows = [
        ["simfluence rollout (torch embedding_bag)", fmt_seconds(fast_seconds), f"{predictions / fast_seconds:.3g}",
         "1.00"],
        ["LinearSimulator.simulate (rollout + input checks)", fmt_seconds(simulate_seconds),
         f"{predictions / simulate_seconds:.3g}", f"{simulate_seconds / fast_seconds:.2f}"],
        ["naive NumPy loop over steps", fmt_seconds(naive_seconds), f"{predictions / naive_seconds:.3g}",
         f"{naive_seconds / fast_seconds:.2f}"],
    ]
    print_table(f"Rollout throughput: {predictions:,} (test example x step) predictions, best of {args.repeats}; "
                f"max |rollout - naive| = {difference:.1e}",
                ["method", "time", "predictions / s", "time / rollout time"], rows)
    print(f"speed ratio rollout vs naive NumPy: {naive_seconds / fast_seconds:.2f}x (> 1: rollout is faster)")
    return {"size": asdict(size), "predictions": predictions, "rollout_seconds": fast_seconds,
            "simulate_seconds": simulate_seconds, "naive_seconds": naive_seconds,
            "throughput": predictions / fast_seconds, "simulate_throughput": predictions / simulate_seconds,
            "naive_throughput": predictions / naive_seconds, "speed_ratio": naive_seconds / fast_seconds,
            "max_abs_difference": difference}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="small sizes for a CI smoke test")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each timing (best of)")
    add_threads_argument(parser)
    args = parse_fit_arguments(parser, argv)
    env = print_header("simfluence rollout benchmark", args)
    start = time.perf_counter()
    result = bench_rollout(args, QUICK if args.quick else FULL)
    print_targets([check("rollout throughput", result["throughput"], 1e8, True, " /s")], args.quick)
    finish({"environment": env, "quick": args.quick, "rollout": result}, args, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
