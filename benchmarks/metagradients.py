"""Benchmark: exact metagradients (:mod:`simfluence.func.metagradients`) on digits-mlp.

1. Cost: seconds and peak memory of :func:`~simfluence.func.metagradients.metagradients` for the
   default digits-mlp task (200 training, 100 test examples) on one uniform T=100, B=4
   curriculum, all 100 test examples, with the default checkpointing (every ceil(sqrt(T))
   steps, the rest recomputed) and with every step's parameters kept
   (``checkpoint_every=1``). Each configuration runs in a fresh process, so its peak resident
   memory (``ru_maxrss``) is its own; "extra" is the peak minus the resident memory after the
   task's data and starting checkpoint are loaded. With ``--tiny-lm`` the same on tiny-lm
   (0.23 M weights, 8 test examples, ``hvp="forward"``), where the parameter copies show.
   With ``--minilm`` the same through AdamW on minilm-finetune (the Hugging Face Trainer's
   optimizer, clipping and schedule; 22.7 M weights, 7 test examples: one group of adjoints,
   ``--minilm-steps`` steps, default 10), where the state is weights and Adam's two moments.
2. Removal LDS, MAGIC's protocol: one fixed reference curriculum (T=100, B=4, uniform over
   the task's pool); ``--sets`` random removal sets, each dropping ``--fraction`` of the
   training examples (all their occurrences replaced by -1, the rest of the curriculum in
   place); every edited curriculum retrained for real (:func:`simfluence.retrain.retrain`,
   all-padding steps skipped). Per test example, the Spearman correlation across the sets of
   the predicted and the real final loss, averaged over test examples. Predictions:

   * ``renormalised`` (:meth:`MetagradientResult.predict_removal`): the removal as an exact
     weight change (a step that loses k of its n examples trains on the mean of the rest, so
     its kept weights become n / (n - k)), to first order;
   * ``sum of scores``: ``L_T - sum of the removed examples' per-example scores`` (what an
     additive attribution method predicts; ignores the batch re-normalisation).

   Repeated for ``--references`` reference curricula (seeds 0, 1, ...).

Timings are on this machine with one torch thread (the model is tiny: more threads only
add overhead).

Usage::

    python benchmarks/metagradients.py              # full: 50 sets x 3 references
    python benchmarks/metagradients.py --quick      # small smoke version
    python benchmarks/metagradients.py --json out.json
    python benchmarks/metagradients.py --tiny-lm    # also checkpointing on tiny-lm (0.23 M weights)
    python benchmarks/metagradients.py --minilm     # also AdamW through minilm-finetune (22.7 M weights)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch
from _common import (
    benchmark_parser,
    child_result,
    markdown_table,
    max_rss_bytes,
    print_result,
    rss_bytes,
    timed,
    write_json,
)

from simfluence.collect import UniformSampler
from simfluence.evaluate import spearman
from simfluence.func.metagradients import metagradients
from simfluence.retrain import retrain
from simfluence.runs import PAD
from simfluence.tasks import get_task

MIB = 2 ** 20


def probe(task_name: str, checkpoint_every: int | None, steps: int, seed: int, num_test: int | None,
          hvp: str) -> dict:
    """Run once in this (fresh) process: seconds and peak memory of one metagradient computation."""
    torch.set_num_threads(1)
    task = get_task(task_name)
    task.data, task.build_model()                                   # load data and pretrain first
    curriculum = UniformSampler(task.default_pool(), task.batch_size).sample(steps, seed)
    metagradients(task, curriculum[:2], [0], hvp=hvp)              # warm up torch.func
    before = rss_bytes()[0] / MIB
    test_index = None if num_test is None else np.arange(num_test)
    cpu = time.process_time()
    result, seconds = timed(metagradients, task, curriculum, test_index, checkpoint_every=checkpoint_every, hvp=hvp)
    cpu_seconds = time.process_time() - cpu
    peak = max_rss_bytes() / MIB
    params = sum(p.numel() for p in task.build_model().parameters())
    return {"task": task_name, "checkpoint_every": result.checkpoint_every, "hvp": hvp, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "rss_before_mib": before, "peak_rss_mib": peak, "extra_mib": peak - before,
            "num_params": params, "num_test": int(result.test_index.size), "steps": steps}


def cost(task_name: str, steps: int, seed: int, num_test: int | None = None, hvp: str = "reverse") -> list[dict]:
    rows = []
    for every in ("default", "1"):
        command = [sys.executable, __file__, "--probe", every, "--probe-task", task_name, "--steps", str(steps),
                   "--seed", str(seed), "--hvp", hvp] + ([] if num_test is None else ["--probe-tests", str(num_test)])
        rows.append(child_result(command))
    return rows


def print_cost(rows: list[dict]) -> None:
    first = rows[0]
    print(f"## cost: {first['task']}, T={first['steps']}, B=4, {first['num_test']} test examples, "
          f"{first['num_params']} weights, hvp={first['hvp']}\n")
    print("\n".join(markdown_table(
        ["checkpoint_every", "seconds (wall)", "seconds (CPU)", "peak RSS MiB", "extra MiB"],
        [[row["checkpoint_every"], f"{row['seconds']:.2f}", f"{row['cpu_seconds']:.2f}", f"{row['peak_rss_mib']:.0f}",
          f"{row['extra_mib']:.1f}"] for row in rows])))


def removal_lds(steps: int, num_sets: int, fraction: float, references: int) -> list[dict]:
    torch.set_num_threads(1)
    task = get_task("digits-mlp")
    pool = task.default_pool()
    drop = max(1, round(fraction * task.num_train))
    out = []
    for reference in range(references):
        curriculum = UniformSampler(pool, task.batch_size).sample(steps, reference)
        rng = np.random.default_rng(1000 + reference)
        sets = [rng.choice(task.num_train, size=drop, replace=False) for _ in range(num_sets)]
        result, metagradient_seconds = timed(metagradients, task, curriculum)
        edited = np.stack([np.where(np.isin(curriculum, removed), PAD, curriculum) for removed in sets])
        retrained, retrain_seconds = timed(retrain, task, edited)
        actual = retrained[:, -1].astype(np.float64)                                  # [S, M]
        renormalised = result.predict_removals(sets)                                   # [S, M]
        scores = result.per_example(task.num_train)
        additive = result.final_losses - np.stack([scores[removed].sum(axis=0) for removed in sets])
        row = {"reference_seed": reference, "removed_per_set": drop, "sets": num_sets,
               "metagradient_seconds": metagradient_seconds, "retrain_seconds": retrain_seconds,
               "mean_abs_effect": float(np.abs(actual - result.final_losses).mean())}
        for name, predicted in (("renormalised", renormalised), ("sum_of_scores", additive)):
            per_test = spearman(predicted, actual, axis=0)
            row[f"lds_{name}"] = float(np.nanmean(per_test))
            row[f"lds_{name}_min"] = float(np.nanmin(per_test))
            effect_p, effect_a = predicted - result.final_losses, actual - result.final_losses
            row[f"effect_rel_error_{name}"] = float(np.linalg.norm(effect_p - effect_a) / np.linalg.norm(effect_a))
        out.append(row)
    return out


def main() -> None:
    parser = benchmark_parser(__doc__, quick="10 sets, 1 reference, T=40",
                              seed="curriculum seed of the cost measurement")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sets", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--references", type=int, default=3)
    parser.add_argument("--tiny-lm", action="store_true",
                        help="also measure checkpointing on tiny-lm (T steps, 8 test examples, hvp=forward)")
    parser.add_argument("--minilm", action="store_true",
                        help="also measure AdamW metagradients on minilm-finetune (7 test examples)")
    parser.add_argument("--minilm-steps", type=int, default=10, help="steps of the minilm-finetune run")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-task", default="digits-mlp", help=argparse.SUPPRESS)
    parser.add_argument("--probe-tests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hvp", default="reverse", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        print_result(probe(args.probe_task, None if args.probe == "default" else int(args.probe), args.steps,
                           args.seed, args.probe_tests, args.hvp))
        return
    if args.quick:
        args.steps, args.sets, args.references = 40, 10, 1

    print(f"# metagradients on digits-mlp ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          "1 thread)\n")
    rows = cost("digits-mlp", args.steps, args.seed)
    print_cost(rows)
    if args.tiny_lm:
        rows = rows + cost("tiny-lm", args.steps, args.seed, num_test=8, hvp="forward")
        print()
        print_cost(rows[-2:])
    if args.minilm:
        rows = rows + cost("minilm-finetune", args.minilm_steps, args.seed, num_test=7)
        print()
        print_cost(rows[-2:])
    lds = removal_lds(args.steps, args.sets, args.fraction, args.references)
    print(f"\n## removal LDS: {args.sets} sets, each dropping {lds[0]['removed_per_set']} of 200 training examples "
          f"({args.fraction:.0%}), T={args.steps}, B=4, 100 test examples\n")
    print("\n".join(markdown_table(
        ["reference seed", "LDS renormalised (min)", "LDS sum of scores (min)",
         "rel. error of effects (renorm. / sum)", "mean abs effect", "metagradient s", "retrain s"],
        [[row["reference_seed"], f"{row['lds_renormalised']:.3f} ({row['lds_renormalised_min']:.2f})",
          f"{row['lds_sum_of_scores']:.3f} ({row['lds_sum_of_scores_min']:.2f})",
          f"{row['effect_rel_error_renormalised']:.3f} / {row['effect_rel_error_sum_of_scores']:.3f}",
          f"{row['mean_abs_effect']:.4f}", f"{row['metagradient_seconds']:.2f}", f"{row['retrain_seconds']:.1f}"]
         for row in lds])))
    mean = {key: float(np.mean([row[key] for row in lds])) for key in ("lds_renormalised", "lds_sum_of_scores")}
    print(f"\nmean over references: LDS renormalised {mean['lds_renormalised']:.3f}, "
          f"sum of scores {mean['lds_sum_of_scores']:.3f}")
    write_json(args.json, {"cost": rows, "lds": lds, "mean": mean, "args": vars(args)})


if __name__ == "__main__":
    main()
