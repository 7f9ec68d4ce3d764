"""Benchmark: simulating training and test examples that no fitting run contained.

A fraction (``--holdout``, 20 %) of the training examples and, separately, of the test
examples is hidden:

* **hidden training examples** never occur in the fitting runs: the ``pool`` fitting runs draw
  their curricula (uniformly, with replacement) from the other 80 %. A second set of fitting
  runs, ``full``, draws from all training examples. The held-out runs draw from all of them, so
  they train on hidden examples too;
* **hidden test examples**: their losses are dropped from the fitting runs; a featurized
  simulator predicts them from their features and ``L_0`` alone
  (:meth:`FeaturizedSimulator.for_test_examples`).

All cells are scored (:func:`simfluence.evaluate.score`) on the same held-out runs:

| cell | fitting runs | test examples scored |
|---|---|---|
| seen | ``full`` | the 80 % seen test examples |
| unseen-train | ``pool`` | the 80 % seen test examples |
| unseen-test | ``full`` | the 20 % hidden test examples |
| both | ``pool`` | the 20 % hidden test examples |

Methods: ``featurized``; ``linear-identity`` (its coefficients of hidden training examples stay
0, "no effect"; it has nothing to say about hidden test examples, so those cells show n/a);
the mean trajectory of the fitting runs (for hidden test examples: the mean change of the
seen ones, added to each example's ``L_0``). The rows marked "(columns seen)" are fitted with
the hidden test examples' losses: the best one could do with them, for reference.

Targets: ``featurized`` unseen-train all-steps MSE within 2x of its seen MSE; unseen-test
across-run Spearman >= 0.5.

Usage::

    python benchmarks/generalisation.py                                # digits-mlp and text-minilm
    python benchmarks/generalisation.py --task digits-mlp --json out/generalisation.json
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _common import benchmark_parser, markdown_table, number, timed, write_json

from simfluence.collect import UniformSampler, collect
from simfluence.evaluate import METRICS, score
from simfluence.runs.log import RunSet
from simfluence.simulators import make_simulator
from simfluence.simulators.baselines import mean_trajectory
from simfluence.tasks import get_task

TASKS = ("digits-mlp", "text-minilm", "tiny-lm")
DEFAULT_TASKS = ("digits-mlp", "text-minilm")


def select_columns(runs: RunSet, columns: np.ndarray) -> RunSet:
    """``runs`` with only the test examples ``columns``."""
    return RunSet(runs.curricula, runs.losses[:, :, columns], runs.eval_steps, runs.train_ids,
                  runs.test_ids[columns], runs.run_ids, runs.meta)


def hidden_split(size: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, hidden) index arrays; ``round(fraction * size)`` hidden."""
    order = np.random.default_rng(seed).permutation(size)
    count = int(round(fraction * size))
    return np.sort(order[count:]), np.sort(order[:count])


def collect_runs(task_name: str, out: Path, args) -> dict:
    task = get_task(task_name)
    kept_train, hidden_train = hidden_split(task.num_train, args.holdout, args.seed)
    kept_test, hidden_test = hidden_split(task.num_test, args.holdout, args.seed + 1)
    every = np.arange(task.num_train)
    stores = {
        "full": collect(task, out / task_name / "fit-full", args.fit_runs, args.steps, args.seed,
                        UniformSampler(every, task.batch_size)),
        "pool": collect(task, out / task_name / "fit-pool", args.fit_runs, args.steps, args.seed + 1,
                        UniformSampler(kept_train, task.batch_size)),
        "heldout": collect(task, out / task_name / "heldout", args.heldout_runs, args.steps, args.seed + 2,
                           UniformSampler(every, task.batch_size)),
    }
    runs = {name: store.load() for name, store in stores.items()}
    return {"task": task, "runs": runs, "kept_test": kept_test, "hidden_test": hidden_test,
            "hidden_train": hidden_train}


def featurized(args):
    return make_simulator("featurized", features=args.features, dim=args.dim, num_checkpoints=args.checkpoints)


def evaluate_task(task_name: str, args) -> list[dict]:
    data = collect_runs(task_name, Path(args.out_dir), args)
    runs, kept, hidden = data["runs"], data["kept_test"], data["hidden_test"]
    heldout = runs["heldout"]
    contains_hidden = np.isin(heldout.curricula, data["hidden_train"]).any(axis=(1, 2))
    if not contains_hidden.all():
        raise RuntimeError(f"{(~contains_hidden).sum()} held-out runs train on no hidden example; use more steps")
    share = float(np.isin(heldout.curricula, data["hidden_train"]).mean())
    print(f"\n{task_name}: {heldout.num_runs} held-out runs, all of which train on hidden examples "
          f"({share:.0%} of their batch slots); {len(data['hidden_train'])} hidden training and "
          f"{len(hidden)} hidden test examples")
    scored = {"seen": select_columns(heldout, kept), "unseen-test": select_columns(heldout, hidden)}
    rows = []

    def add(cell, method, predicted, target, seconds=None):
        metrics = score(predicted, scored[target]).as_dict()
        rows.append({"task": task_name, "cell": cell, "method": method, **metrics, "fit_seconds": seconds})

    for fit_name, cells in (("full", ("seen", "unseen-test")), ("pool", ("unseen-train", "both"))):
        fitting = select_columns(runs[fit_name], kept)
        for method in ("featurized", "linear-identity", "mean-trajectory"):
            simulator = featurized(args) if method == "featurized" else make_simulator(method)
            _, seconds = timed(simulator.fit, fitting)
            seen = scored["seen"]
            add(cells[0], method, simulator.simulate(seen.curricula, seen.initial_losses), "seen", seconds)
            unseen = scored["unseen-test"]
            if method == "featurized":
                other = simulator.for_test_examples(unseen.test_ids)
                add(cells[1], method, other.simulate(unseen.curricula, unseen.initial_losses), "unseen-test", seconds)
                add(cells[1], "mean-trajectory", mean_trajectory(other.mean_change, unseen.initial_losses,
                                                                 unseen.num_steps), "unseen-test")
            elif method == "linear-identity":
                rows.append({"task": task_name, "cell": cells[1], "method": method,
                             **{metric: None for metric in METRICS}, "fit_seconds": None})
        for method in ("featurized", "linear-identity"):
            simulator = featurized(args) if method == "featurized" else make_simulator(method)
            simulator.fit(select_columns(runs[fit_name], np.arange(heldout.num_test)))
            predicted = simulator.simulate(heldout.curricula, heldout.initial_losses)[:, :, hidden]
            add(cells[1], f"{method} (columns seen)", predicted, "unseen-test")
    return rows


def markdown(rows: list[dict]) -> str:
    columns = ["task", "cell", "method", *METRICS, "fit_seconds"]
    return "\n".join(markdown_table(columns, [[number(row[c]) for c in columns] for row in rows]))


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for task in dict.fromkeys(row["task"] for row in rows):
        get = {(row["cell"], row["method"]): row for row in rows if row["task"] == task}
        seen, unseen = get[("seen", "featurized")]["mse"], get[("unseen-train", "featurized")]["mse"]
        ratio = unseen / seen
        lines.append(f"{task}: unseen-train / seen all-steps MSE (featurized) = {unseen:.4g} / {seen:.4g} = "
                     f"{ratio:.2f}x (target <= 2x: {'met' if ratio <= 2 else 'NOT met'})")
        for name in ("unseen-test", "both"):
            rho = get[(name, "featurized")]["across_run_spearman"]
            lines.append(f"{task}: {name} across-run Spearman (featurized) = {number(rho)} "
                         f"(target >= 0.5: {'met' if rho is not None and rho >= 0.5 else 'NOT met'})")
    return lines


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--task", action="append", choices=TASKS, help="repeatable; default: digits-mlp and text-minilm")
    parser.add_argument("--fit-runs", type=int, default=40)
    parser.add_argument("--heldout-runs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of training and of test examples hidden")
    parser.add_argument("--features", default="gradients", help="featurized simulator's features")
    parser.add_argument("--dim", type=int, default=0, help="featurized simulator's low-rank bilinear dimension")
    parser.add_argument("--checkpoints", type=int, default=4, help="featurized simulator's gradient checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default="out/generalisation", help="run stores (reused when present)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for task in (args.task or DEFAULT_TASKS) for row in evaluate_task(task, args)]
    print()
    print(markdown(rows))
    print()
    print("\n".join(targets(rows)))
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
