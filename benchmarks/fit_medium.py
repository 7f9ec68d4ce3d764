"""Benchmark: the fast Simfluence-Linear fit against the naive one, at a medium size.

On synthetic runs drawn from a known ground-truth Simfluence-Linear model
(:func:`simfluence.runs.synthetic.large_linear_runs`: identity-centred,
``L_t = (1 + sum_{i in c_t} A_i) L_{t-1} + sum_{i in c_t} B_i + noise``, losses decaying from
about 2.3 towards 0.5-1 over the run, curricula walking through permutations of the training
examples), N=2,000 training and M=500 test examples, 50 runs x 200 steps:

* fast fit of all test examples: ``LinearSimulator`` / ``LinearIdentitySimulator``, fixed ridge,
  batched PCG, float32;
* naive fit: one dense float64 ridge solve per test example (:func:`naive_transition_ridge`),
  timed on a subset of test examples and extrapolated linearly to all of them.

Held-out all-steps MSE (rolled out from the true ``L_0``) of fast and naive are compared on
that subset. Targets: relative MSE difference <= 1 %, speed ratio >= 100x.

Usage::

    python benchmarks/fit_medium.py              # full size
    python benchmarks/fit_medium.py --quick      # small sizes, CI smoke test (< 30 s)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from _common import (
    VARIANTS,
    Size,
    SolveRecorder,
    add_fit_arguments,
    benchmark_parser,
    check,
    finish,
    fmt_seconds,
    mean_occurrences,
    parse_fit_arguments,
    print_header,
    print_table,
    print_targets,
    resolve_ridge,
    test_columns,
    timed,
)

from simfluence.runs.log import RunSet
from simfluence.simulators.linear import Transitions, rollout

FULL = Size(2000, 500, 50, 200)
QUICK = Size(300, 40, 20, 60, held_out=4)


def naive_transition_ridge(batches: np.ndarray, num_train: int, previous: np.ndarray, target: np.ndarray,
                           ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The naive fit: one dense float64 ridge solve per test example, ``(a, b)`` each ``[N, M]``.

    The objective of :func:`simfluence.simulators.ridge.solve_transition_ridge` with ``fit_alpha``,
    on the dense design ``X [S, N]`` (``X[s, i]`` = times example ``i`` is in batch ``s``).
    """
    x = np.zeros((batches.shape[0], num_train))
    steps = np.broadcast_to(np.arange(batches.shape[0])[:, None], batches.shape)
    valid = batches >= 0
    np.add.at(x, (steps[valid], batches[valid]), 1.0)
    previous, target = np.asarray(previous, dtype=np.float64), np.asarray(target, dtype=np.float64)
    a, b = np.zeros((num_train, target.shape[1])), np.zeros((num_train, target.shape[1]))
    for m in range(target.shape[1]):
        features = np.hstack([previous[:, m:m + 1] * x, x])
        gram = features.T @ features + ridge * np.eye(2 * num_train)
        a[:, m], b[:, m] = np.split(np.linalg.solve(gram, features.T @ target[:, m]), 2)
    return a, b


def per_test_mse(predicted: np.ndarray, runs: RunSet) -> np.ndarray:
    """All-steps MSE per test example, ``[M]``."""
    error = predicted[:, runs.eval_steps[1:]].astype(np.float64) - runs.losses[:, 1:]
    return np.mean(error ** 2, axis=(0, 1))


def bench_medium(args: argparse.Namespace, size: Size) -> dict[str, Any]:
    print(f"\n=== medium: {size.describe()} ===")
    data, seconds = size.runs(args.noise, args.seed)
    fitting, held_out = data.fitting, data.held_out
    assert held_out is not None and data.truth_mse_per_test is not None
    ridge = resolve_ridge(args, fitting)
    losses = fitting.losses
    print(f"synthetic runs generated in {seconds:.2f} s; mean loss step 0 = {losses[:, 0].mean():.2f}, "
          f"step {size.num_steps // 2} = {losses[:, size.num_steps // 2].mean():.2f}, "
          f"step {size.num_steps} = {losses[:, -1].mean():.2f}; ridge = {ridge:.4g} "
          f"({ridge / mean_occurrences(fitting):.3g} x mean occurrences)")
    subset = np.unique(np.linspace(0, size.num_test - 1, min(args.naive_subset, size.num_test)).astype(int))
    transitions = Transitions.of(fitting)
    previous, current = transitions.columns(subset)
    results: dict[str, Any] = {"size": asdict(size), "ridge": ridge, "naive_subset": subset.tolist(),
                               "truth_mse_all": float(data.truth_mse_per_test.mean()),
                               "truth_mse_subset": float(data.truth_mse_per_test[subset].mean()), "variants": {}}
    rows, accuracy_rows = [], []
    for name in args.variants:
        cls = VARIANTS[name]
        simulator = cls(ridge=ridge, dtype="float32", tol=args.tol, max_iter=args.max_iter)
        gc.collect()
        with SolveRecorder() as recorder:
            _, fast_seconds = timed(simulator.fit, fitting)
        predicted = simulator.simulate(held_out.curricula, held_out.initial_losses)
        fast_mse_per_test = per_test_mse(predicted, held_out)

        # Naive: one dense float64 normal-equation solve per test example (2N x 2N).
        target = current - previous if cls.alpha_offset == 1.0 else current
        (a, b), naive_seconds = timed(naive_transition_ridge, transitions.batches, size.num_train, previous, target,
                                      ridge)
        naive_table = torch.as_tensor(np.hstack([a, b]))
        initial = held_out.initial_losses[:, subset].astype(np.float64)
        naive_predicted = rollout(naive_table, held_out.curricula, initial, cls.alpha_offset, True)
        naive_mse = float(per_test_mse(naive_predicted, test_columns(held_out, subset)).mean())
        fast_mse = float(fast_mse_per_test[subset].mean())
        fast_a, fast_b = simulator.coefficients
        fast_sub = np.hstack([fast_a[:, subset], fast_b[:, subset]]).astype(np.float64)
        naive_sub = np.hstack([a, b])
        coefficient_diff = float(np.linalg.norm(fast_sub - naive_sub) / np.linalg.norm(naive_sub))
        naive_total = naive_seconds / subset.size * size.num_test
        info = simulator.fit_info
        result = {
            "fast_fit_seconds": fast_seconds, **recorder.summary(), "cg_iterations": info["cg_iterations"],
            "cg_relative_residual": info["cg_relative_residual"], "column_chunk": info["column_chunk"],
            "naive_subset_seconds": naive_seconds, "naive_extrapolated_seconds": naive_total,
            "speed_ratio": naive_total / fast_seconds, "fast_mse_all": float(fast_mse_per_test.mean()),
            "fast_mse_subset": fast_mse, "naive_mse_subset": naive_mse,
            "mse_relative_difference": abs(fast_mse - naive_mse) / naive_mse,
            "coefficient_relative_difference": coefficient_diff,
        }
        results["variants"][name] = result
        rows.append([name, fmt_seconds(fast_seconds), f"{result['solve_seconds']:.3g} s",
                     f"{info['cg_iterations']} (chunk {info['column_chunk']})", f"{info['cg_relative_residual']:.1e}",
                     f"{fmt_seconds(naive_seconds)} / {subset.size}", fmt_seconds(naive_total),
                     f"{result['speed_ratio']:,.0f}x"])
        accuracy_rows.append([name, f"{fast_mse:.6f}", f"{naive_mse:.6f}",
                              f"{100 * result['mse_relative_difference']:.3g} %", f"{coefficient_diff:.2e}",
                              f"{result['fast_mse_all']:.6f}"])
        del simulator, a, b, naive_table
    print_table(f"Fit time, all {size.num_test} test examples (naive timed on {subset.size} test examples, "
                f"extrapolated linearly x{size.num_test / subset.size:g})",
                ["variant", "fast fit", "of which CG", "CG iters", "CG resid", "naive measured",
                 f"naive est. {size.num_test}", "speed ratio"], rows)
    print_table(f"Held-out all-steps MSE ({size.held_out} runs, rolled out from the true L_0) on the "
                f"{subset.size} naive test examples; true model (noise floor) = {results['truth_mse_subset']:.6f} "
                f"on the subset, {results['truth_mse_all']:.6f} on all",
                ["variant", "fast", "naive", "rel. diff", "coef rel. diff", f"fast, all {size.num_test}"],
                accuracy_rows)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="small sizes for a CI smoke test (< 30 s)")
    add_fit_arguments(parser)
    parser.add_argument("--naive-subset", type=int, default=5,
                           help="test examples the naive dense solve is timed on (default 5)")
    args = parse_fit_arguments(parser, argv)
    env = print_header("simfluence fit benchmark, fast versus naive", args)
    start = time.perf_counter()
    medium = bench_medium(args, QUICK if args.quick else FULL)
    rows = []
    for variant, r in medium["variants"].items():
        rows.append(check(f"{variant}: held-out MSE rel. diff fast vs naive", 100 * r["mse_relative_difference"],
                          1.0, False, " %"))
        rows.append(check(f"{variant}: speed ratio vs naive", r["speed_ratio"], 100, True, "x"))
    print_targets(rows, args.quick)
    finish({"environment": env, "quick": args.quick, "medium": medium}, args, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
