"""Benchmark: collecting digits-mlp runs, vectorised (``torch.func.vmap``) versus the plain loop.

Two tables, each the best of ``--repeats``:

* training only: ``train_run`` on each curriculum versus one ``train_runs_vmap`` call;
* :func:`simfluence.collect.collect` end to end (curriculum sampling, training,
  evaluation of all 100 test examples after every step, Parquet writes with fsync)
  into a fresh temporary store.

Wall time and CPU time are both shown: on a shared machine CPU time is the steadier
measure. The checkpoint is pretrained (and cached) before timing, and every variant
trains the same curricula, so the loss arrays are compared too.

Target: vectorised >= 5x the loop's runs/second (32 runs x 100 steps, one thread).

Usage::

    python benchmarks/collect.py                       # 32 runs x 100 steps, 1 thread
    python benchmarks/collect.py --runs 64 --threads 2
    python benchmarks/collect.py --workers 2            # add a 2-process vectorised row
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from simfluence.collect import UniformSampler, collect, derive_seed, train_run, train_runs_vmap
from simfluence.runs import RunStore
from simfluence.tasks import get_task
from simfluence.threads import cpu_count


def best_of(repeats: int, work) -> tuple[float, float, np.ndarray]:
    """Best wall time and best CPU time (s) of ``repeats`` calls of ``work()``, and the last losses.

    ``work()`` does the timed part and returns a function that produces its losses
    ``[R, T+1, M]`` afterwards (untimed). CPU time is this process's
    (``time.process_time``); on a shared machine it is the steadier measure of the work
    done, wall time the one a user waits for.
    """
    best_wall, best_cpu, losses = float("inf"), float("inf"), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        finish = work()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        losses = finish()
    return best_wall, best_cpu, losses


def collect_losses(runs: int, steps: int, **options):
    """``collect()`` into a fresh temporary store; reading it back is not timed."""
    def work():
        directory = Path(tempfile.mkdtemp(prefix="simfluence-bench-"))
        collect("digits-mlp", directory / "store", runs, steps, seed=0, progress=False, **options)

        def finish():
            try:
                return RunStore(directory / "store").load().losses
            finally:
                shutil.rmtree(directory)
        return finish
    return work


def trainer_losses(runs: int, steps: int, vectorize: bool):
    task = get_task("digits-mlp")
    curricula = UniformSampler(task.default_pool(), task.batch_size).sample_many(
        steps, [derive_seed(0, index) for index in range(runs)])

    def work():
        if vectorize:
            logs = train_runs_vmap(task, curricula)
        else:
            logs = [train_run(task, curriculum) for curriculum in curricula]
        return lambda: np.stack([log.losses for log in logs])
    return work


def print_table(title: str, runs: int, results: list) -> float:
    """Rows relative to the first (the loop); returns the second row's CPU-time speed-up."""
    loop_wall, loop_cpu, loop_losses = results[0][2:]
    print(f"\n{title}")
    print(f"{'variant':<24}{'wall (s)':>9}{'runs/s':>8}{'speed-up':>9}{'CPU (s)':>9}{'runs/CPU-s':>11}"
          f"{'speed-up':>9}{'max |dL| vs loop':>18}")
    for name, workers, wall, cpu, losses in results:
        # A pool's work is done in its children: the parent's CPU time says nothing.
        cpu_columns = (f"{cpu:>9.2f}{runs / cpu:>11.1f}{loop_cpu / cpu:>8.1f}x" if workers == 1
                       else f"{'-':>9}{'-':>11}{'-':>9}")
        print(f"{name:<24}{wall:>9.2f}{runs / wall:>8.1f}{loop_wall / wall:>8.1f}x{cpu_columns}"
              f"{np.abs(losses - loop_losses).max():>18.1e}")
    return loop_wall / results[1][2], loop_cpu / results[1][3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--workers", type=int, default=1, help="also time a vectorised run with this many processes")
    args = parser.parse_args()

    get_task("digits-mlp").build_model()  # pretrain and cache outside the timings
    print(f"digits-mlp, {args.runs} runs x {args.steps} steps, batch 4, 100 test examples; "
          f"{args.threads} torch thread(s) per worker; best of {args.repeats}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    torch.set_num_threads(args.threads)
    trainer = [(name, 1, *best_of(args.repeats, trainer_losses(args.runs, args.steps, vectorize)))
               for name, vectorize in (("loop (train_run)", False), ("vmap (train_runs_vmap)", True))]
    trainer_ratio = print_table("Training only (no I/O):", args.runs, trainer)

    variants = [("loop", dict(vectorize=False, threads=args.threads)),
                ("vmap", dict(vectorize=True, threads=args.threads))]
    if args.workers > 1:
        variants.append((f"vmap, {args.workers} processes", dict(vectorize=True, workers=args.workers,
                                                                threads=args.threads)))
    collected = [(name, options.get("workers", 1), *best_of(args.repeats, collect_losses(args.runs, args.steps,
                                                                                         **options)))
                 for name, options in variants]
    collect_ratio = print_table("collect() end to end (sampling, training, Parquet writes):", args.runs, collected)

    print()
    for name, (wall, cpu) in (("training", trainer_ratio), ("collect()", collect_ratio)):
        verdict = "PASS" if min(wall, cpu) >= 5 else "FAIL"
        print(f"vmap / loop, {name:<9}: {wall:4.1f}x wall, {cpu:4.1f}x CPU (target >= 5x): {verdict}")


if __name__ == "__main__":
    main()
