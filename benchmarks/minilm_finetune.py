"""Benchmark: the cost of a ``minilm-finetune`` run (Hugging Face Trainer, full MiniLM fine-tuning).

Measures, in one process on one torch thread per run (as collection runs them):

* a whole recorded run of ``--steps`` steps, split into the training steps (forward, backward,
  AdamW, scheduler, Trainer bookkeeping) and the test evaluations the recorder makes after
  every step, timed by wrapping :meth:`Recorder.evaluate`;
* the test evaluation alone with length-sorted chunks (the recorder's default) against chunks in
  id order, each padded to its longest member: the ratio is the speed-up of sorting;
* process CPU seconds beside wall seconds, so a busy machine does not hide the split.

Usage::

    python benchmarks/minilm_finetune.py                   # 1 run of 50 steps, the task's eval batch (8)
    python benchmarks/minilm_finetune.py --steps 50 --eval-batch-size 16 --repeats 5

The simulator table for the task comes from ``simfluence benchmark minilm-finetune`` (see
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def main() -> None:
    from simfluence.collect import UniformSampler, derive_seed
    from simfluence.collect.hf import TrainerSpec, train_recorded
    from simfluence.recorder import Recorder, auto_loss
    from simfluence.tasks.finetune import MiniLMFinetune

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eval-batch-size", type=int, default=None, help="default: the task's (8)")
    parser.add_argument("--repeats", type=int, default=5, help="timings of the evaluation alone")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = MiniLMFinetune()
    args.eval_batch_size = args.eval_batch_size or task.eval_batch_size
    examples = task.examples("test")
    spec = TrainerSpec(task.make_trainer, examples, tuple(task.train_ids.tolist()), tuple(task.test_ids.tolist()),
                       task.collator(), None, 1, args.eval_batch_size)
    curriculum = UniformSampler(task.default_pool(), task.batch_size).sample(args.steps, derive_seed(0, 0))

    spent = {"eval_wall": 0.0, "eval_cpu": 0.0, "evals": 0}
    original = Recorder.evaluate

    def timed(self):
        wall, cpu = time.perf_counter(), time.process_time()
        out = original(self)
        spent["eval_wall"] += time.perf_counter() - wall
        spent["eval_cpu"] += time.process_time() - cpu
        spent["evals"] += 1
        return out

    Recorder.evaluate = timed
    try:
        with tempfile.TemporaryDirectory() as root:
            wall, cpu = time.perf_counter(), time.process_time()
            train_recorded(spec, root, 0, curriculum, 0)
            run_wall, run_cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        Recorder.evaluate = original

    # The evaluation alone: sorted by length vs id order.
    model = task.build_model()
    timings = {}
    with tempfile.TemporaryDirectory() as root:
        recorders = {sort: Recorder(f"{root}/{sort}", model=model, loss_fn=auto_loss, train_ids=task.num_train,
                                    test_inputs=examples, test_collate=task.collator(),
                                    eval_batch_size=args.eval_batch_size, sort_by_length=sort).start()
                     for sort in (True, False)}
        padded = {sort: sum(int(inputs["input_ids"].numel()) for inputs, _ in recorder._chunks)
                  for sort, recorder in recorders.items()}
        for sort in (True, False) * args.repeats:
            cpu = time.process_time()
            recorders[sort].evaluate()
            timings.setdefault(sort, []).append(time.process_time() - cpu)
        for recorder in recorders.values():
            recorder.abort()
    sorted_cpu, unsorted_cpu = statistics.median(timings[True]), statistics.median(timings[False])

    result = {
        "steps": args.steps, "test_examples": len(examples), "eval_batch_size": args.eval_batch_size,
        "threads": args.threads,
        "run_wall_s": run_wall, "run_cpu_s": run_cpu,
        "eval_wall_s": spent["eval_wall"], "eval_cpu_s": spent["eval_cpu"], "evaluations": spent["evals"],
        "train_wall_s": run_wall - spent["eval_wall"], "train_cpu_s": run_cpu - spent["eval_cpu"],
        "per_step_train_cpu_ms": 1000 * (run_cpu - spent["eval_cpu"]) / args.steps,
        "per_eval_cpu_ms": 1000 * spent["eval_cpu"] / max(spent["evals"], 1),
        "eval_sorted_cpu_ms": 1000 * sorted_cpu, "eval_id_order_cpu_ms": 1000 * unsorted_cpu,
        "sorting_speedup": unsorted_cpu / sorted_cpu, "padded_tokens_sorted": padded[True],
        "padded_tokens_id_order": padded[False],
    }
    print(json.dumps(result, indent=1))
    print(f"\none run of {args.steps} steps: {run_wall:.1f} s wall, {run_cpu:.1f} s CPU; per step "
          f"{result['per_step_train_cpu_ms']:.0f} ms training + {result['per_eval_cpu_ms']:.0f} ms test evaluation "
          f"(CPU time); length-sorted evaluation {result['sorting_speedup']:.2f}x faster than id order "
          f"({padded[True]} vs {padded[False]} padded token slots)")


if __name__ == "__main__":
    main()
