r"""Benchmark: simulators on several held-out splits of one run store, as ratios to the mean trajectory.

For each seed, ``split_runs(runs, --heldout, seed)`` holds out runs, every method is fitted on
the rest (a fresh simulator per split, default settings unless given as ``kind:key=value;...``,
values parsed as JSON) and scored on the held-out runs beside the mean trajectory of the same
fitting runs: all-steps MSE and final-step MSE as ratios (below 1 beats the baseline), across-run
Spearman, fit seconds. Prints one line per split and method, then the means.

Usage::

    python benchmarks/splits.py RUNS --heldout 20 --seeds 0,1,2 \
        --methods auto,gradient-trajectory,gradient-trajectory:prior_checkpoint=\"start\",linear-trajectory
    python benchmarks/splits.py RUNS --heldout 6 --seeds 0,1,2,3,4,5 \
        --methods linear:nest_mean=false,linear,linear:cv_folds=3
    python benchmarks/splits.py RUNS --heldout 20 --heldout-from 40 \
        --methods gradient-trajectory,gradient-trajectory:checkpoints=\"STORE_WITH_RUNS_0_39\"
    python benchmarks/splits.py RUNS --heldout 20 --fitting 15 --methods gradient-trajectory,linear-identity
    python benchmarks/splits.py RUNS --in-sample --methods gradient-trajectory

``--in-sample`` fits on every run and scores on those same runs (one "split", seed -1): how well a
method can rank the very runs it was fitted to, a bound on what it reaches on held-out runs.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from _common import benchmark_parser, markdown_table, timed, write_json

from simfluence import load_runs
from simfluence.evaluate import score, split_runs
from simfluence.simulators import make_simulator
from simfluence.simulators.baselines import mean_trajectory


def parse_method(spec: str) -> tuple[str, dict]:
    """``"kind:key=value;key=value"`` -> ``(kind, settings)`` with JSON values."""
    kind, _, options = spec.partition(":")
    settings = {}
    for item in filter(None, options.split(";")):
        key, _, value = item.partition("=")
        settings[key] = json.loads(value)
    return kind, settings


def split(runs, num_heldout: int, seed: int, heldout_from: int | None = None):
    """``split_runs(runs, num_heldout, seed)``; with ``heldout_from = K``, held-out runs only among runs ``K..``."""
    if heldout_from is None:
        return split_runs(runs, num_heldout, seed)
    if not 0 <= heldout_from <= runs.num_runs - num_heldout or num_heldout < 1:
        raise SystemExit(f"--heldout-from {heldout_from}: leaves fewer than --heldout {num_heldout} of "
                         f"{runs.num_runs} runs to hold out")
    held = np.sort(heldout_from + np.random.default_rng(seed).permutation(runs.num_runs - heldout_from)[:num_heldout])
    return runs.select(np.setdiff1d(np.arange(runs.num_runs), held)), runs.select(held)


def main() -> None:
    """Fit and score every method on every split; print the lines and the table of means."""
    parser = benchmark_parser(__doc__, seed=None)
    parser.add_argument("runs", help="a run store or interchange file")
    parser.add_argument("--heldout", type=int, default=20, help="held-out runs per split")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated split seeds")
    parser.add_argument("--methods", default="auto,gradient-trajectory,linear-trajectory,linear-identity,linear",
                        help="comma-separated kind[:key=value;...]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--heldout-from", type=int, default=None, metavar="K",
                        help="hold out runs only from runs K.. (the first K always fit: e.g. the runs whose final "
                             "weights a TRAK prior reads, gradient-trajectory:checkpoints=\"STORE\")")
    parser.add_argument("--fitting", type=int, default=None, metavar="N",
                        help="fit on the first N of each split's fitting runs only (same held-out runs): how a "
                             "method's scores grow with the runs")
    parser.add_argument("--in-sample", action="store_true",
                        help="fit on every run and score on the same runs (instead of the splits)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = load_runs(args.runs)
    methods = args.methods.split(",")
    rows: dict[str, list[dict]] = {method: [] for method in methods}
    for seed in [-1] if args.in_sample else (int(s) for s in args.seeds.split(",")):
        fitting, heldout = (runs, runs) if args.in_sample else split(runs, args.heldout, seed, args.heldout_from)
        if args.fitting is not None:
            if not 1 <= args.fitting <= fitting.num_runs:
                raise SystemExit(f"--fitting {args.fitting}: a split has {fitting.num_runs} fitting runs")
            fitting = fitting.select(np.arange(args.fitting))
        initial = heldout.initial_losses.astype(np.float64)
        for method in methods:
            kind, settings = parse_method(method)
            simulator, seconds = timed(make_simulator(kind, **settings).fit, fitting)
            metrics = score(simulator.simulate(heldout.curricula, initial), heldout)
            base = score(mean_trajectory(simulator.mean_change, initial, heldout.num_steps), heldout)
            row = {"seed": seed, "mse_ratio": metrics.mse / base.mse, "final_ratio": metrics.final_mse / base.final_mse,
                   "across_run_spearman": metrics.across_run_spearman, "fit_seconds": seconds,
                   "chosen": simulator.fit_info.get("chosen")}
            rows[method].append(row)
            print(f"split {seed} {method:40s} all-steps {row['mse_ratio']:.3f}x final {row['final_ratio']:.3f}x "
                  f"across {row['across_run_spearman']:.3f} fit {seconds:.1f} s"
                  + (f" (chose {row['chosen']})" if row["chosen"] else ""), flush=True)
    table = [[method, f"{np.mean([r['mse_ratio'] for r in rs]):.3f}", f"{np.mean([r['final_ratio'] for r in rs]):.3f}",
              f"{np.nanmean([r['across_run_spearman'] for r in rs]):.3f}",
              f"{min(r['fit_seconds'] for r in rs):.1f}-{max(r['fit_seconds'] for r in rs):.1f}"]
             for method, rs in rows.items()]
    print("\n".join(markdown_table(["method", "all-steps MSE / mean trajectory", "final MSE / mean trajectory",
                          "across-run Spearman", "fit s"], table)))
    if args.json:
        write_json(args.json, {"runs": args.runs, "heldout": args.heldout, "seeds": args.seeds, "rows": rows})


if __name__ == "__main__":
    main()
