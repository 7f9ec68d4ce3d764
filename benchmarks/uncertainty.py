#!/usr/bin/env python3
"""Do the ``linear-bootstrap`` prediction intervals cover real held-out trajectories?

    .venv/bin/python benchmarks/uncertainty.py                          # digits-mlp and text-minilm
    .venv/bin/python benchmarks/uncertainty.py --tasks digits-mlp --quick
    .venv/bin/python benchmarks/uncertainty.py --json out.json

For each task: ``--runs`` real runs on uniform random curricula (the task's default pool and
batch size, trained with ``train_runs_vmap``), ``--heldout`` of them held out at random. The
simulator is fitted on the rest only: its ridge (cross-validated), its bootstrap replicas and
its calibration (out-of-bag residuals of the fitting runs) never see a held-out run. Reported
per interval level: the share of held-out (run, step, test example) cells inside the
interval, over all steps ``1..T`` and at the final step, and the mean interval width (loss
units), beside the held-out all-steps MSE of the point prediction and of the mean trajectory.
"""

from __future__ import annotations

import torch
from _common import benchmark_parser, timed, write_json

from simfluence.collect.curricula import UniformSampler
from simfluence.collect.train import train_runs_vmap
from simfluence.evaluate import evaluate, split_runs
from simfluence.runs.log import RunSet
from simfluence.simulators.uncertainty import BootstrapLinearSimulator, interval_coverage
from simfluence.tasks import get_task

LEVELS = (0.5, 0.8, 0.9, 0.95)


def measure(task_name: str, num_runs: int, num_steps: int, num_heldout: int, replicas: int, seed: int = 0) -> dict:
    """Collect, fit on the fitting runs, and score the intervals on the held-out runs."""
    task = get_task(task_name)
    sampler = UniformSampler(task.default_pool(), task.batch_size)

    def collect() -> RunSet:
        logs = train_runs_vmap(task, sampler.sample_many(num_steps, [seed * 100_000 + r for r in range(num_runs)]))
        return RunSet.from_logs(logs, task.train_ids, task.test_ids, meta=task.meta())

    runs, collect_seconds = timed(collect)
    fitting, heldout = split_runs(runs, num_heldout, seed)
    simulator, fit_seconds = timed(BootstrapLinearSimulator(replicas=replicas, seed=seed).fit, fitting)
    evaluation = evaluate(simulator, heldout)
    intervals = {}
    for level in LEVELS:
        lower, _, upper = simulator.simulate_interval(heldout.curricula, heldout.initial_losses, level)
        intervals[f"{level:g}"] = {"scale": simulator.interval_scale(level), **interval_coverage(lower, upper, heldout)}
    final_losses = heldout.losses[:, -1]
    return {"task": task_name, "num_fitting_runs": fitting.num_runs, "num_heldout_runs": heldout.num_runs,
            "num_steps": num_steps, "num_train": runs.num_train, "num_test": runs.num_test, "replicas": replicas,
            "ridge": simulator.chosen_ridge, "collect_seconds": collect_seconds, "fit_seconds": fit_seconds,
            "mse": evaluation.metrics.mse, "final_mse": evaluation.metrics.final_mse,
            "mean_trajectory_mse": evaluation.baselines["mean-trajectory"].mse,
            "heldout_final_loss_std": float(final_losses.std()), "intervals": intervals}


def main() -> None:
    parser = benchmark_parser(__doc__, quick="24 runs (8 held out) of 50 steps, 8 replicas")
    parser.add_argument("--tasks", default="digits-mlp,text-minilm")
    parser.add_argument("--runs", type=int, default=96)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--heldout", type=int, default=48)
    parser.add_argument("--replicas", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.runs, args.steps, args.heldout, args.replicas = 24, 50, 8, 8
    results = []
    for task_name in args.tasks.split(","):
        result = measure(task_name.strip(), args.runs, args.steps, args.heldout, args.replicas, args.seed)
        results.append(result)
        print(f"\n== {result['task']}: {result['num_fitting_runs']} fitting / {result['num_heldout_runs']} "
              f"held-out runs, "
              f"{result['num_steps']} steps, {result['num_test']} test examples, {result['replicas']} replicas "
              f"(collect {result['collect_seconds']:.1f} s, fit {result['fit_seconds']:.1f} s)")
        print(f"point prediction all-steps MSE {result['mse']:.5f} "
              f"(mean trajectory {result['mean_trajectory_mse']:.5f}), final MSE {result['final_mse']:.5f}")
        print(f"{'level':>6} {'scale':>6} {'coverage':>9} {'final cov.':>10} {'width':>8} {'final width':>11}")
        for level, row in result["intervals"].items():
            print(f"{level:>6} {row['scale']:>6.2f} {row['coverage']:>9.3f} {row['final_coverage']:>10.3f} "
                  f"{row['width']:>8.4f} {row['final_width']:>11.4f}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
