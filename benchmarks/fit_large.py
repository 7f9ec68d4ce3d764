"""Benchmark: fit time and peak memory of Simfluence-Linear at a large size.

N=50,000 training and M=5,000 test examples, 250 runs x 200 steps, float32, on synthetic runs
drawn from a known ground-truth Simfluence-Linear model
(:func:`simfluence.runs.synthetic.large_linear_runs`). Each variant (``LinearSimulator``,
``LinearIdentitySimulator``, fixed ridge) runs in a fresh subprocess that generates its own
runs, so its peak memory (max RSS via ``getrusage``) is its own; the fit's own increment is the
peak RSS during the fit (VmHWM, reset just before it) minus the RSS before it.
Targets: < 120 s, < 8 GB.

Usage::

    python benchmarks/fit_large.py                      # full size (can take hours on a small CPU)
    python benchmarks/fit_large.py --test-subset 512    # fit 512 test examples, extrapolate the time
    python benchmarks/fit_large.py --variants linear-identity --max-iter 2   # memory probe
    python benchmarks/fit_large.py --quick              # small sizes, CI smoke test
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from _common import (
    GB,
    VARIANTS,
    Size,
    SolveRecorder,
    add_fit_arguments,
    benchmark_parser,
    check,
    child_result,
    finish,
    fmt_seconds,
    max_rss_bytes,
    parse_fit_arguments,
    print_header,
    print_result,
    print_table,
    print_targets,
    reset_peak,
    resolve_ridge,
    rss_bytes,
    test_columns,
    timed,
)

from simfluence.simulators.linear import all_steps_mse

FULL = Size(50_000, 5_000, 250, 200)
QUICK = Size(1000, 100, 20, 50, held_out=4)


def child(args: argparse.Namespace, size: Size, variant: str) -> dict[str, Any]:
    """Runs inside a fresh process: generate runs, fit one variant, report time and memory."""
    baseline = rss_bytes()[0]
    data, generate_seconds = size.runs(args.noise, args.seed)
    fitting, held_out, truth_mse = data.fitting, data.held_out, data.truth_mse_per_test
    assert held_out is not None and truth_mse is not None
    data_bytes = fitting.losses.nbytes + held_out.losses.nbytes
    ridge = resolve_ridge(args, fitting)
    full_test = size.num_test
    if 0 < args.test_subset < full_test:  # fit the first K test examples only; extrapolate the time
        fitting = test_columns(fitting, np.arange(args.test_subset))  # copies the K columns
        held_out = test_columns(held_out, np.arange(args.test_subset))
        truth_mse = truth_mse[: args.test_subset]
    gc.collect()
    before_current, before_peak = rss_bytes()
    before_max = max_rss_bytes()
    peak_reset = reset_peak()
    simulator = VARIANTS[variant](ridge=ridge, dtype="float32", tol=args.tol, max_iter=args.max_iter)
    with SolveRecorder() as recorder:
        _, fit_seconds = timed(simulator.fit, fitting)
    after_current, fit_peak = rss_bytes()
    after_max = max_rss_bytes()
    info = simulator.fit_info
    predicted, rollout_seconds = timed(simulator.simulate, held_out.curricula, held_out.initial_losses)
    return {
        "variant": variant, "size": asdict(size), "ridge": ridge, "generate_seconds": generate_seconds,
        "fit_seconds": fit_seconds, **recorder.summary(), "cg_iterations": info["cg_iterations"],
        "cg_relative_residual": info["cg_relative_residual"], "column_chunk": info["column_chunk"],
        "rss_import": baseline, "rss_before_fit": before_current, "peak_before_fit": max(before_peak, before_max),
        "rss_after_fit": after_current, "fit_peak_rss": fit_peak if peak_reset else None,
        "max_rss": after_max, "peak_reset": peak_reset,
        "fit_increment": (fit_peak if peak_reset else after_max) - before_current,
        "data_bytes": data_bytes, "table_bytes": simulator.table.numel() * simulator.table.element_size(),
        "held_out_rollout_seconds": rollout_seconds,
        "held_out_mse": all_steps_mse(predicted, held_out), "truth_mse": float(truth_mse.mean()),
        "torch_threads": torch.get_num_threads(), "fitted_test": fitting.num_test,
        "fit_seconds_extrapolated": fit_seconds * full_test / fitting.num_test,
    }


def bench_large(args: argparse.Namespace, size: Size) -> dict[str, Any]:
    partial = 0 < args.test_subset < size.num_test
    subset = f"; fitting only the first {args.test_subset} test examples" if partial else ""
    print(f"\n=== large: {size.describe()}, float32, one fresh subprocess per variant{subset} ===")
    results: dict[str, Any] = {"size": asdict(size), "variants": {}}
    rows, memory_rows, profile_rows = [], [], []
    for variant in args.variants:
        command = [sys.executable, os.path.abspath(__file__), "--child", variant, "--seed", str(args.seed),
                   "--noise", str(args.noise), "--tol", str(args.tol), "--ridge-factor", str(args.ridge_factor),
                   "--max-iter", str(args.max_iter)]
        if args.ridge is not None:
            command += ["--ridge", str(args.ridge)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.test_subset:
            command += ["--test-subset", str(args.test_subset)]
        if args.quick:
            command.append("--quick")
        result, wall = timed(child_result, command)
        result["subprocess_wall_seconds"] = wall
        results["variants"][variant] = result
        fitted = result["fitted_test"]
        fit_text = fmt_seconds(result["fit_seconds"])
        if fitted < size.num_test:
            fit_text += f" for {fitted} -> est. {fmt_seconds(result['fit_seconds_extrapolated'])} for {size.num_test}"
        rows.append([variant, fit_text, fmt_seconds(result["solve_seconds"]),
                     f"{result['cg_iterations']}", f"{result['chunks']} x {result['column_chunk']}",
                     f"{1000 * result['seconds_per_iteration']:.0f} ms", f"{result['cg_relative_residual']:.1e}",
                     f"{result['held_out_mse']:.5f} ({result['truth_mse']:.5f})"])
        memory_rows.append([variant, f"{result['max_rss'] / GB:.2f} GB", f"{result['rss_before_fit'] / GB:.2f} GB",
                            f"{result['fit_increment'] / GB:.2f} GB", f"{result['data_bytes'] / GB:.2f} GB",
                            f"{result['table_bytes'] / GB:.2f} GB", f"{result['generate_seconds']:.1f} s"])
        profile_rows.append([variant, " ".join(str(i) for i in result["iterations_per_chunk"])])
    print_table("Fit time (LinearSimulator.fit, fixed ridge, float32)",
                ["variant", "fit", "of which CG", "max CG iters", "chunks x cols", "CG time / iteration (one chunk)",
                 "CG resid", "held-out MSE (true model)"], rows)
    print_table("Memory (max RSS of the subprocess; 'fit increment' = peak during fit - RSS before fit)",
                ["variant", "max RSS", "RSS before fit (data)", "fit increment", "losses array", "fitted table",
                 "generation time"], memory_rows)
    print_table("CG iterations per column chunk", ["variant", "iterations"], profile_rows)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, quick="small sizes for a CI smoke test")
    add_fit_arguments(parser)
    parser.add_argument("--test-subset", type=int, default=0, metavar="K",
                           help="fit only the first K test examples (all data still generated and held) and "
                                "extrapolate the fit time linearly to all; memory then reflects the data, not the "
                                "full table (default 0 = fit all)")
    parser.add_argument("--child", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parse_fit_arguments(parser, argv)
    size = QUICK if args.quick else FULL
    if args.child:
        print_result(child(args, size, args.child))
        return 0
    env = print_header("simfluence large fit benchmark", args)
    start = time.perf_counter()
    large = bench_large(args, size)
    rows = []
    for variant, r in large["variants"].items():
        partial = r["fitted_test"] < r["size"]["num_test"]
        rows.append(check(f"{variant}: fit time" + (" (extrapolated)" if partial else ""),
                          r["fit_seconds_extrapolated"], 120, False, " s"))
        rows.append(check(f"{variant}: peak memory (max RSS)" + (" (partial fit: not the target)" if partial else ""),
                          r["max_rss"] / GB, 8, False, " GB"))
    print_targets(rows, args.quick)
    finish({"environment": env, "quick": args.quick, "large": large}, args, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
