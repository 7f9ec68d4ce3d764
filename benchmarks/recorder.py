"""Benchmark: overhead of :class:`simfluence.recorder.Recorder` beyond the test-set forward passes.

Three variants of the same training loop (same model, data, curriculum, optimizer):

* ``train``: training only, no evaluation (for reference: how much of (a) evaluation is).
* ``(a) manual``: after every step, evaluate the test set by hand: eval mode, ``torch.no_grad()``,
  the same chunks of ``eval_batch_size`` test examples through the same ``loss_fn``, keep the
  loss vector, back to train mode. This is the cost of the forward passes themselves.
* ``(b) recorder``: ``with Recorder(...)`` and ``rec.step(batch_ids)`` after every step, which does
  that evaluation and the logging, and writes the run to a fresh ``RunStore`` on exit
  (the write is included).

The overhead is ``(b) / (a) - 1``; target <= 5 %. The variants run interleaved (order alternating),
``--repeats`` times each, and the median is reported. On the CPU the loops are timed in process CPU
time by default (``--clock cpu``, one torch thread), so other processes on a shared machine do not
inflate one variant's wall time; ``--clock wall`` times elapsed seconds (the default on a GPU).

Cases:

* ``mlp``: a small MLP classifier (64 -> 128 -> 10), 1,000 test examples, batch 32. The forward
  passes are cheap, so this is close to the worst case for a fixed per-step overhead.
* ``gpt2``: a tiny GPT-2 built from a config (1 layer, 64 dims, vocab 256, sequences of 32
  tokens), 128 test sequences, the causal-LM per-example loss. Needs ``transformers``.

Usage::

    python benchmarks/recorder.py                 # both cases
    python benchmarks/recorder.py --only mlp --steps 100 --repeats 3
    python benchmarks/recorder.py --device cuda   # on a GPU (the recorder keeps losses on the device)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simfluence.recorder import Recorder, causal_lm_loss


@dataclass
class Case:
    name: str
    build_model: Callable[[], nn.Module]
    loss_fn: Callable
    train_inputs: object
    train_targets: object
    test_inputs: object
    test_targets: object
    num_train: int
    batch_size: int
    eval_batch_size: int
    lr: float


def _take(inputs, index):
    if isinstance(inputs, dict):
        return {key: value[index] for key, value in inputs.items()}
    return inputs[index]


def mlp_case(device: torch.device) -> Case:
    g = torch.Generator().manual_seed(0)
    num_train, num_test, dim, classes = 2000, 1000, 64, 10
    x = torch.randn(num_train + num_test, dim, generator=g)
    y = (x[:, :classes] + 0.5 * torch.randn(num_train + num_test, classes, generator=g)).argmax(1)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, classes)).to(device)

    def loss_fn(model, inputs, targets):
        return nn.functional.cross_entropy(model(inputs), targets, reduction="none")

    x, y = x.to(device), y.to(device)
    return Case("mlp", build, loss_fn, x[:num_train], y[:num_train], x[num_train:], y[num_train:],
                num_train, 32, 1000, 0.1)


def gpt2_case(device: torch.device) -> Case:
    import transformers

    g = torch.Generator().manual_seed(0)
    num_train, num_test, length, vocab = 512, 128, 32, 256
    tokens = torch.randint(vocab, (num_train + num_test, length), generator=g).to(device)
    mask = torch.ones_like(tokens)
    config = transformers.GPT2Config(n_layer=1, n_head=4, n_embd=64, vocab_size=vocab, n_positions=length,
                                     bos_token_id=0, eos_token_id=0)

    def build():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config).to(device)

    train = {"input_ids": tokens[:num_train], "attention_mask": mask[:num_train]}
    test = {"input_ids": tokens[num_train:], "attention_mask": mask[num_train:]}
    return Case("gpt2", build, causal_lm_loss, train, None, test, None, num_train, 8, 64, 1e-3)


def run_loop(case: Case, curriculum: np.ndarray, mode: str, store_root: Path | None = None,
             run_id: str = "bench") -> dict[str, float]:
    """Train along ``curriculum``; return seconds (model build excluded).

    Keys: ``loop`` (start to the end of the last step, all included), and for (a) and (b):
    ``setup`` (before the first step: step-0 evaluation, and for (b) ``Recorder(...)`` and ``start``),
    ``steps`` (evaluating and logging after the steps: ``manual_eval`` / ``rec.step``), ``setup_fwd``
    and ``steps_fwd`` (the part of each inside ``loss_fn``: the forward passes), ``write`` (for (b):
    leaving the ``with`` block, which writes the run; for (a): stacking the kept losses on the host).
    """
    model = case.build_model()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=case.lr)
    batches = [torch.as_tensor(row, device=_device(case)) for row in curriculum]
    sync = torch.cuda.synchronize if _device(case).type == "cuda" else (lambda: None)
    clock = _CLOCK[0]
    in_forward = [0.0]

    def timed_loss(model, inputs, targets):
        begin = clock()
        losses = case.loss_fn(model, inputs, targets)
        in_forward[0] += clock() - begin
        return losses

    def train_step(index):
        optimizer.zero_grad(set_to_none=True)
        targets = None if case.train_targets is None else case.train_targets[index]
        case.loss_fn(model, _take(case.train_inputs, index), targets).mean().backward()
        optimizer.step()

    chunks = [(_take(case.test_inputs, slice(s, s + case.eval_batch_size)),
               None if case.test_targets is None else case.test_targets[s:s + case.eval_batch_size])
              for s in range(0, _num_test(case), case.eval_batch_size)]

    def manual_eval(kept):
        model.eval()
        with torch.no_grad():
            losses = torch.cat([timed_loss(model, inputs, targets) for inputs, targets in chunks])
        model.train()
        kept.append(losses)

    sync()
    start = clock()
    if mode == "train":
        for index in batches:
            train_step(index)
        sync()
        return {"loop": clock() - start}
    if mode not in ("manual", "recorder"):
        raise ValueError(mode)
    if mode == "manual":
        kept: list[torch.Tensor] = []
        manual_eval(kept)
        evaluate = lambda row: manual_eval(kept)   # noqa: E731
    else:
        rec = Recorder(store_root, model=model, loss_fn=timed_loss, train_ids=case.num_train,
                       test_inputs=case.test_inputs, test_targets=case.test_targets,
                       eval_batch_size=case.eval_batch_size, run_id=run_id, overwrite=True)
        rec.start()
        evaluate = rec.step
    timing = {"setup": clock() - start, "setup_fwd": in_forward[0]}
    in_forward[0], in_steps = 0.0, 0.0
    for row, index in zip(curriculum, batches):
        train_step(index)
        begin = clock()
        evaluate(row)
        in_steps += clock() - begin
    sync()
    loop_end = clock()
    if mode == "manual":
        np.stack([losses.cpu().numpy() for losses in kept])   # the logged losses, on the host
    else:
        rec.finish()
    sync()
    end = clock()
    return {**timing, "steps": in_steps, "steps_fwd": in_forward[0], "loop": end - start, "write": end - loop_end}


_CLOCK = [time.process_time]
"""The clock the loops are timed with (set by ``--clock``)."""


def _device(case: Case) -> torch.device:
    inputs = case.train_inputs["input_ids"] if isinstance(case.train_inputs, dict) else case.train_inputs
    return inputs.device


def _num_test(case: Case) -> int:
    return case.test_inputs["input_ids"].shape[0] if isinstance(case.test_inputs, dict) else case.test_inputs.shape[0]


@dataclass
class Result:
    case: str
    steps: int
    test_examples: int
    train_s: float           # training only
    manual_s: float          # (a), whole loop
    recorder_s: float        # (b), whole loop, writing the run included
    overhead: float          # (b) / (a) - 1
    book_a_ms: float         # per step, (a)'s evaluation outside loss_fn (mode switches, cat, keeping losses)
    book_b_ms: float         # per step, rec.step outside loss_fn
    step_overhead: float     # (book_b - book_a) / ((a) per step): the recorder's per-step overhead
    setup_b_ms: float        # per run, Recorder(...) + start outside loss_fn
    write_b_ms: float        # per run, writing the run
    run_overhead: float      # (book_b - book_a) * steps + setup_b + write_b - (setup/write of (a)), over (a)
    eval_share: float        # (manual - train) / manual


def bench(case: Case, steps: int, repeats: int) -> Result:
    rng = np.random.default_rng(0)
    curriculum = np.stack([rng.choice(case.num_train, case.batch_size, replace=False) for _ in range(steps)])
    modes = ["train", "manual", "recorder"]
    timings: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"   # one store, one run per repeat, as when recording many runs
        for mode in modes:            # warm-up (allocator, lazy init, the store's manifest)
            run_loop(case, curriculum[:3], mode, store, "warm-up")
        for repeat in range(repeats):
            for mode in (modes if repeat % 2 == 0 else modes[::-1]):   # alternate the order
                timings[mode].append(run_loop(case, curriculum, mode, store, f"run-{repeat:06d}"))

    def median(mode: str, key: str) -> float:
        return statistics.median(t[key] for t in timings[mode])

    def book(mode: str, part: str) -> float:   # time outside loss_fn
        return statistics.median(t[part] - t[f"{part}_fwd"] for t in timings[mode])

    train_s, manual_s, recorder_s = (median(mode, "loop") for mode in modes)
    per_step_a = manual_s / steps
    book_a, book_b = book("manual", "steps") / steps, book("recorder", "steps") / steps
    fixed_a = book("manual", "setup") + median("manual", "write")
    fixed_b = book("recorder", "setup") + median("recorder", "write")
    return Result(
        case.name, steps, _num_test(case), train_s, manual_s, recorder_s, recorder_s / manual_s - 1,
        1e3 * book_a, 1e3 * book_b, (book_b - book_a) / per_step_a,
        1e3 * book("recorder", "setup"), 1e3 * median("recorder", "write"),
        ((book_b - book_a) * steps + fixed_b - fixed_a) / manual_s, (manual_s - train_s) / manual_s,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=["mlp", "gpt2"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=["cpu", "wall"],
                        help="cpu: process CPU time (default on CPU: robust on a shared machine); "
                             "wall: elapsed time (default on GPU)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    _CLOCK[0] = time.process_time if clock == "cpu" else time.perf_counter
    builders = {"mlp": mlp_case, "gpt2": gpt2_case}
    results = [bench(builders[name](device), args.steps, args.repeats) for name in (args.only or builders)]

    print(f"# Recorder overhead  ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {device}, {args.threads} thread(s), {clock} time, median of {args.repeats})")
    header = (f"{'case':<5} {'steps':>5} {'M':>5} {'train s':>8} {'(a) manual s':>12} {'(b) recorder s':>14} "
              f"{'b/a':>6} | {'a ms/step':>9} {'b ms/step':>9} {'per step':>8} | {'setup ms':>8} "
              f"{'write ms':>8} {'per run':>8} | {'eval share':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.case:<5} {r.steps:>5} {r.test_examples:>5} {r.train_s:>8.3f} {r.manual_s:>12.3f} "
              f"{r.recorder_s:>14.3f} {r.recorder_s / r.manual_s:>6.3f} | {r.book_a_ms:>9.4f} {r.book_b_ms:>9.4f} "
              f"{100 * r.step_overhead:>7.2f}% | {r.setup_b_ms:>8.2f} {r.write_b_ms:>8.2f} "
              f"{100 * r.run_overhead:>7.2f}% | {100 * r.eval_share:>9.1f}%")
    print("b/a: whole loops timed against each other (noisy on a busy machine).\n"
          "a/b ms/step: per-step time spent evaluating and logging outside loss_fn (the forward passes) by\n"
          "  (a) the manual evaluation and (b) rec.step; per step = (b - a) / (time of one step of (a)).\n"
          "setup/write ms: the recorder's one-off costs per run outside loss_fn (constructor and start,\n"
          "  writing the run); per run = all of the recorder's extra time over the run / (a).\n"
          "eval share: the part of (a) spent evaluating the test set.")
    for r in results:
        verdict = "met" if r.step_overhead <= 0.05 and r.run_overhead <= 0.05 else "NOT met"
        print(f"{r.case}: target overhead <= 5%: {verdict} (per step {100 * r.step_overhead:+.2f}%, "
              f"per run {100 * r.run_overhead:+.2f}%, whole loops {100 * r.overhead:+.2f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
