#!/usr/bin/env python3
"""Time the text tasks and check that Simfluence-Linear beats the mean trajectory on them.

    .venv/bin/python scripts/measure_text_tasks.py text-minilm --runs 48 --steps 100
    .venv/bin/python scripts/measure_text_tasks.py tiny-lm --runs 48 --steps 100 --set learning_rate=0.1

Trains ``--runs`` runs of ``--steps`` steps on uniformly sampled curricula over the task's
default pool (vectorised with ``train_runs_vmap``, or ``--loop`` for ``train_run``), times
a few single runs with ``train_run`` after a warm-up, checks that the vectorised and the
loop trainer agree on run 0, holds out ``--heldout`` runs and prints held-out metrics of
Simfluence-Linear (paper and identity-centred) beside the mean-trajectory baseline.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from simfluence.collect.curricula import UniformSampler
from simfluence.collect.train import train_run, train_runs_vmap
from simfluence.evaluate import evaluate, split_runs
from simfluence.runs.log import RunSet
from simfluence.simulators import LinearIdentitySimulator, LinearSimulator
from simfluence.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task")
    parser.add_argument("--runs", type=int, default=48)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--heldout", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timed", type=int, default=3, help="single loop runs to time")
    parser.add_argument("--loop", action="store_true", help="collect with train_run instead of train_runs_vmap")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the collector's default is 1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="task option")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    options = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    start = time.perf_counter()
    task = get_task(args.task, **options)
    task.data
    task.build_model()
    print(f"{task!r}\nsetup (data + checkpoint, incl. imports and cache): {time.perf_counter() - start:.1f} s")

    sampler = UniformSampler(task.default_pool(), task.batch_size)
    curricula = sampler.sample_many(args.steps, [args.seed * 100_000 + r for r in range(args.runs)])
    train_run(task, curricula[0, :2])  # warm-up (imports, allocator)
    times, cpu = [], []
    for r in range(args.timed):
        start, start_cpu = time.perf_counter(), time.process_time()
        reference = train_run(task, curricula[r])
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if args.timed:
        print(f"train_run, {args.steps} steps, {torch.get_num_threads()} thread(s): {np.median(times):.2f} s wall, "
              f"{np.median(cpu):.2f} s CPU (median of {args.timed}; a busy machine inflates wall time)")

    start, start_cpu = time.perf_counter(), time.process_time()
    if args.loop:
        logs = [train_run(task, curricula[r], run_id=f"run-{r:06d}") for r in range(args.runs)]
    else:
        logs = train_runs_vmap(task, curricula)
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"{'train_run loop' if args.loop else 'train_runs_vmap'}: {args.runs} runs in {elapsed:.1f} s wall, "
          f"{elapsed_cpu:.1f} s CPU ({elapsed / args.runs:.2f} s wall per run)")
    if args.timed:
        last = args.timed - 1
        print(f"vmap/loop agreement on run {last}: max |diff| = "
              f"{np.abs(logs[last].losses - reference.losses).max():.2e}")

    runs = RunSet.from_logs(logs, task.train_ids, task.test_ids, task.meta())
    losses = runs.losses
    print(f"mean test loss: step 0 {losses[:, 0].mean():.3f}, step {args.steps} {losses[:, -1].mean():.3f}; "
          f"across-run std of the final loss {losses[:, -1].std(axis=0).mean():.3f}")
    fit, heldout = split_runs(runs, args.heldout, seed=args.seed)
    for simulator in (LinearIdentitySimulator(), LinearSimulator()):
        simulator.fit(fit)
        evaluation = evaluate(simulator, heldout)
        print(f"\n{simulator.kind} (ridge {simulator.chosen_ridge:.3g}), fitted on {fit.num_runs} runs:")
        print(evaluation.table())


if __name__ == "__main__":
    main()
