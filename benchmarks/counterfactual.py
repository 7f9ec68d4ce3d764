"""Benchmark: counterfactual queries on digits-mlp checked against real retraining.

1. Collect real runs on random curricula (a resumable run store), split off held-out
   runs, fit ``linear-identity`` on the rest.
2. Leave-group-out on every held-out curriculum: remove all training examples of one
   digit class (10 groups) or a random group of 20; simulate with
   :func:`simfluence.query.leave_group_out` and retrain every edited curriculum for real.
3. Leave-one-out on one held-out curriculum: every example it holds, removed on its own.
4. Curriculum search: :func:`simfluence.query.optimize` for a few target sets, then the
   optimised curriculum and random curricula of the same budget retrained for real.
5. Speed: simulate time per curriculum in one large vectorised batch versus train time
   per run (the plain loop and the vectorised trainer), on this machine, one thread.

For 2 and 3 the compared quantity is the *effect* on each test example's final loss,
``L_T(edited) - L_T(original)`` (predicted vs real); for 4 the mean final loss over the
targets. Spearman and MSE as in :mod:`simfluence.retrain`.

Usage::

    python benchmarks/counterfactual.py                      # 48 runs (8 held out) x 100 steps
    python benchmarks/counterfactual.py --quick              # small smoke version
    python benchmarks/counterfactual.py --json out.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from _common import benchmark_parser, best_of, machine, markdown_table, number, timed, write_json

from simfluence.collect import UniformSampler, collect, train_run, train_runs_vmap
from simfluence.evaluate import split_runs
from simfluence.query import leave_group_out, optimize, simulate_curricula
from simfluence.retrain import agreement, compare_with_retraining
from simfluence.runs import PAD
from simfluence.simulators import LinearIdentitySimulator
from simfluence.tasks import get_task


def removal_curricula(curriculum: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """``[1 + G, T, B]``: the curriculum, then one copy per group with its members padded."""
    return np.stack([curriculum] + [np.where(np.isin(curriculum, group), PAD, curriculum) for group in groups])


def effects_summary(predicted: list[np.ndarray], actual: list[np.ndarray]) -> dict:
    predicted, actual = np.concatenate(predicted), np.concatenate(actual)
    out = agreement(predicted, actual)
    out["sign_agreement"] = float(np.mean(np.sign(predicted) == np.sign(actual)))
    out["rows"] = int(len(predicted))
    out["mean_abs_actual_effect"] = float(np.abs(actual).mean())
    return out


def group_queries(simulator, task, heldout, groups: dict[str, np.ndarray]) -> dict:
    """Leave-group-out on every held-out curriculum, simulated and retrained."""
    predicted, actual, interactions, seconds = [], [], [], {"simulate": 0.0, "train": 0.0}
    for r in range(heldout.num_runs):
        curriculum, initial = heldout.curricula[r], heldout.initial_losses[r]
        query = leave_group_out(simulator, curriculum, initial, groups)
        comparison = compare_with_retraining(simulator, task, removal_curricula(curriculum, list(groups.values())),
                                             reference=0)
        # The library query and the comparison simulate the same edits: a consistency check.
        np.testing.assert_allclose(comparison.predicted[1:] - comparison.predicted[0], query.final_delta,
                                   atol=1e-4)
        predicted.append(query.final_delta)
        actual.append(comparison.actual[1:] - comparison.actual[0])
        interactions.append(np.abs(query.final_interaction).mean())
        seconds["simulate"] += comparison.simulate_seconds
        seconds["train"] += comparison.train_seconds
    return {**effects_summary(predicted, actual), "mean_abs_simulated_interaction": float(np.mean(interactions)),
            "seconds": seconds}


def leave_one_out_query(simulator, task, curriculum: np.ndarray) -> dict:
    present = np.unique(curriculum[curriculum != PAD])
    comparison = compare_with_retraining(simulator, task, removal_curricula(curriculum, [[i] for i in present]),
                                         reference=0)
    predicted = comparison.predicted[1:] - comparison.predicted[0]
    actual = comparison.actual[1:] - comparison.actual[0]
    # Per training example: the effect on the mean final loss over all test examples.
    example_spearman = float(agreement(predicted.mean(axis=1)[:, None], actual.mean(axis=1)[:, None])["spearman"])
    top = np.argsort(-predicted.mean(axis=1))[:10]
    return {**effects_summary([predicted], [actual]), "examples": int(present.size),
            "per_example_mean_effect_spearman": example_spearman,
            "top10_predicted_helpful_actual_mean_effect": float(actual[top].mean()),
            "all_examples_actual_mean_effect": float(actual.mean())}


def search_queries(simulator, task, initial, target_sets: dict[str, np.ndarray], budget: int, num_steps: int,
                   batch_size: int, num_random: int, num_retrained_random: int, seed: int) -> list[dict]:
    rows = []
    for name, targets in target_sets.items():
        result, search_seconds = timed(optimize, simulator, initial, targets, budget, num_steps, batch_size,
                                       num_random=num_random, seed=seed)
        curricula = np.concatenate([result.curriculum[None], result.random_curricula[:num_retrained_random]])
        comparison = compare_with_retraining(simulator, task, curricula, test_index=targets)
        simulated, real = comparison.predicted.mean(axis=1), comparison.actual.mean(axis=1)
        rows.append({
            "targets": name, "num_targets": int(targets.size), "budget": budget, "search_seconds": search_seconds,
            "simulated_optimised": result.objective, "simulated_random_median": result.random_median,
            "simulated_random_best": result.random_best, "simulated_random_median_retrained": float(
                np.median(simulated[1:])),
            "real_optimised": float(real[0]), "real_random_median": float(np.median(real[1:])),
            "real_random_best": float(real[1:].min()),
            "real_optimised_rank": int((real[1:] < real[0]).sum()) + 1,
            "initial": float(initial[targets].mean()),
            "random_spearman_sim_vs_real": float(agreement(simulated[1:, None], real[1:, None])["spearman"]),
            "order_labels": task.data.train_targets.numpy()[result.order].tolist()})
    return rows


def speed(simulator, task, initial, num_curricula: int, num_steps: int, num_targets: int, repeats: int,
          seed: int) -> dict:
    sampler = UniformSampler(task.default_pool(), task.batch_size)
    curricula = sampler.sample_many(num_steps, range(seed, seed + num_curricula))
    starting = np.repeat(initial[None], num_curricula, axis=0)

    simulate_all = best_of(repeats, simulator.simulate, curricula, starting)[0]
    targets = np.arange(num_targets)
    simulate_targets = best_of(repeats, simulate_curricula, simulator, curricula, initial, targets)[0]
    # A counterfactual needs only the final losses: retraining evaluates at steps 0 and T only.
    ends = [0, num_steps]
    loop_runs = curricula[:5]
    train_run(task, loop_runs[0], ends)  # warm caches (checkpoint, data) before timing
    loop = best_of(repeats, lambda: [train_run(task, curriculum, ends) for curriculum in loop_runs])[0] / len(loop_runs)
    vmap = best_of(repeats, train_runs_vmap, task, curricula[:64], ends)[0] / 64
    per_all, per_targets = simulate_all / num_curricula, simulate_targets / num_curricula
    return {"curricula": num_curricula, "steps": num_steps, "test_examples": int(initial.size),
            "targets": num_targets, "simulate_seconds_per_curriculum_all_tests": per_all,
            "simulate_seconds_per_curriculum_targets": per_targets, "train_run_seconds_per_run": loop,
            "train_runs_vmap_seconds_per_run": vmap, "speedup_vs_loop_all_tests": loop / per_all,
            "speedup_vs_vmap_all_tests": vmap / per_all, "speedup_vs_loop_targets": loop / per_targets,
            "speedup_vs_vmap_targets": vmap / per_targets}


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    return markdown_table(columns, [[number(row[column], 3) for column in columns] for row in rows])


def markdown(results: dict) -> str:
    effects = ["mse", "spearman", "across_curricula_spearman", "sign_agreement", "mean_abs_actual_effect", "rows"]
    queries = [{"query": name, **results[key]} for name, key in (
        ("leave one class out (10 groups x held-out runs)", "leave_class_out"),
        ("leave a random group of 20 out", "leave_random_group_out"),
        ("leave one out (every example of held-out run 0)", "leave_one_out"))]
    search = ["targets", "budget", "simulated_optimised", "simulated_random_median", "simulated_random_best",
              "real_optimised", "real_random_median", "real_random_best", "real_optimised_rank", "initial"]
    speed = results["speed"]
    loo = results["leave_one_out"]
    lines = [f"{results['fitting_runs']} fitting runs, {results['heldout_runs']} held-out runs, "
             f"{results['config']['steps']} steps; linear-identity, ridge {results['ridge']:.3g} "
             f"(fit {results['fit_seconds']:.1f} s).", "",
             "Effects on each test example's final loss, simulated vs real (edited minus original run):", "",
             *_table(queries, ["query", *effects]), "",
             f"Leave-one-out, per training example (effect on the mean final loss over all test examples): "
             f"Spearman {loo['per_example_mean_effect_spearman']:.3g}; the 10 examples the simulator ranks most "
             f"helpful have a real mean effect of {loo['top10_predicted_helpful_actual_mean_effect']:+.3g}, all "
             f"{loo['examples']} examples {loo['all_examples_actual_mean_effect']:+.3g}.", "",
             f"Curriculum search, mean final loss over the targets ({results['config']['random']} random curricula "
             f"simulated, {results['config']['retrain_random']} of them and the optimised one retrained; rank 1 = "
             "better than every retrained random curriculum):", "",
             *_table(results["search"], search), "",
             f"Speed ({speed['curricula']} curricula x {speed['steps']} steps, one thread): simulate "
             f"{speed['simulate_seconds_per_curriculum_all_tests'] * 1e6:.1f} us per curriculum for all "
             f"{speed['test_examples']} test examples, {speed['simulate_seconds_per_curriculum_targets'] * 1e6:.1f} "
             f"us for {speed['targets']} targets; retrain {speed['train_run_seconds_per_run'] * 1e3:.1f} ms per run "
             f"(train_run), {speed['train_runs_vmap_seconds_per_run'] * 1e3:.1f} ms per run (train_runs_vmap, 64 at "
             f"once). Speed-up: {speed['speedup_vs_loop_all_tests']:,.0f}x / {speed['speedup_vs_loop_targets']:,.0f}x "
             f"vs train_run, {speed['speedup_vs_vmap_all_tests']:,.0f}x / {speed['speedup_vs_vmap_targets']:,.0f}x vs "
             "train_runs_vmap (all test examples / targets)."]
    return "\n".join(lines)


def speed_only(args) -> dict:
    """:func:`speed` on another task: its bigger model makes retraining, not simulating, dearer."""
    task = get_task(args.speed_only)
    store = collect(task, Path(args.out) / "runs", args.runs, args.steps, args.seed)
    fitting, heldout = split_runs(store.load(), args.heldout, args.seed)
    simulator = LinearIdentitySimulator().fit(fitting)
    initial = heldout.initial_losses[0].astype(np.float64)
    return {"task": task.name, **speed(simulator, task, initial, args.speed_curricula, args.steps,
                                        min(10, task.num_test), args.repeats, args.seed)}


def main() -> None:
    parser = benchmark_parser(__doc__, quick="Small sizes for a smoke run.")
    parser.add_argument("--out", default="out/counterfactual", help="Run store and results directory.")
    parser.add_argument("--runs", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--budgets", default="20,100", help="Comma-separated curriculum-search budgets K.")
    parser.add_argument("--random", type=int, default=200, help="Random curricula simulated per search.")
    parser.add_argument("--retrain-random", type=int, default=50, help="Of those, retrained for real.")
    parser.add_argument("--speed-curricula", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-only", metavar="TASK", default=None,
                           help="Only time simulated vs retrained counterfactuals, on TASK (e.g. tiny-lm).")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.heldout, args.steps, args.budgets = 16, 2, 40, "10"
        args.random, args.retrain_random, args.speed_curricula, args.repeats = 40, 10, 1000, 1
    torch.set_num_threads(1)
    if args.speed_only:
        result = speed_only(args)
        print(json.dumps(result, indent=1))
        write_json(args.json, result)
        return

    task = get_task("digits-mlp")
    store = collect(task, Path(args.out) / "runs", args.runs, args.steps, args.seed)
    fitting, heldout = split_runs(store.load(), args.heldout, args.seed)
    simulator, fit_seconds = timed(LinearIdentitySimulator().fit, fitting)
    initial = heldout.initial_losses[0].astype(np.float64)

    train_labels, test_labels = task.data.train_targets.numpy(), task.data.test_targets.numpy()
    rng = np.random.default_rng(args.seed)
    class_groups = {f"class-{k}": np.flatnonzero(train_labels == k) for k in range(10)}
    random_groups = {f"random-{g}": rng.choice(task.num_train, 20, replace=False) for g in range(10)}
    target_sets = {**{f"class-{k}": np.flatnonzero(test_labels == k) for k in (5, 7, 9)},
                   "random-10": np.sort(rng.choice(task.num_test, 10, replace=False))}

    results = {
        "machine": machine(),
        "config": vars(args), "fitting_runs": fitting.num_runs, "heldout_runs": heldout.num_runs,
        "fit_seconds": fit_seconds, "ridge": simulator.fit_info["ridge"],
        "leave_class_out": group_queries(simulator, task, heldout, class_groups),
        "leave_random_group_out": group_queries(simulator, task, heldout, random_groups),
        "leave_one_out": leave_one_out_query(simulator, task, heldout.curricula[0]),
        "search": [row for budget in map(int, args.budgets.split(","))
                   for row in search_queries(simulator, task, initial, target_sets, budget, args.steps,
                                             task.batch_size, args.random, args.retrain_random, args.seed)],
        "speed": speed(simulator, task, initial, args.speed_curricula, args.steps, 10, args.repeats, args.seed),
    }
    print(markdown(results))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
