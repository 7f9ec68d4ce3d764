"""Benchmark: fitting Simfluence-Linear and rolling it out.

Three cases, each on synthetic runs drawn from a known ground-truth Simfluence-Linear model
(identity-centred: ``L_t = (1 + sum_{i in c_t} A_i) L_{t-1} + sum_{i in c_t} B_i + noise``), with
losses decaying from about 2.3 towards 0.5-1 over the run and curricula drawn uniformly over
the training examples:

* ``medium``: fast fit (``LinearSimulator`` / ``LinearIdentitySimulator``, fixed ridge, batched PCG)
  of all test examples versus the naive fit, one dense float64 ridge solve per test example
  (:func:`naive_transition_ridge`). The naive fit is timed on a subset
  of test examples and extrapolated linearly to all of them; held-out all-steps MSE (rolled out
  from the true ``L_0``) of fast and naive are compared on that subset.
  Targets: relative MSE difference <= 1 %, speed ratio >= 100x.
* ``large``: fit time and peak memory at N=50,000, M=5,000, 250 runs x 200 steps, float32, each
  variant in a fresh subprocess (max RSS via ``getrusage``). Targets: < 120 s, < 8 GB.
* ``rollout``: (test example x step) predictions per second of :func:`simfluence.simulators.linear.rollout`
  versus a NumPy loop over steps (vectorised over runs and test examples). Target: >= 1e8 /s.

Usage::

    python benchmarks/fit.py                 # all three cases at full size (the large fit can take
                                             # hours on a small CPU: see --large-test-subset)
    python benchmarks/fit.py --quick         # small sizes, CI smoke test (< 30 s)
    python benchmarks/fit.py --only medium   # one case (repeatable: --only medium --only rollout)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import simfluence.simulators.linear as linear_module
from simfluence.runs.log import RunSet
from simfluence.simulators import LinearIdentitySimulator, LinearSimulator
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.linear import Transitions, all_steps_mse, rollout

VARIANTS = {"linear": LinearSimulator, "linear-identity": LinearIdentitySimulator}
RESULT_TAG = "@@RESULT "
GB = 1e9


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    num_train: int
    num_test: int
    num_runs: int  # fitting runs
    num_steps: int
    batch: int = 8
    held_out: int = 10

    def describe(self) -> str:
        return (f"N={self.num_train:,} train, M={self.num_test:,} test, {self.num_runs} runs x {self.num_steps} steps, "
                f"batch {self.batch}, {self.held_out} held-out runs")


FULL = {
    "medium": Size(2000, 500, 50, 200),
    "large": Size(50_000, 5_000, 250, 200),
    "rollout": Size(2000, 500, 200, 200, held_out=0),
}
QUICK = {
    "medium": Size(300, 40, 20, 60, held_out=4),
    "large": Size(1000, 100, 20, 50, held_out=4),
    "rollout": Size(300, 100, 50, 60, held_out=0),
}


# --------------------------------------------------------------------------------------------
# Synthetic runs from a ground-truth Simfluence-Linear model
# --------------------------------------------------------------------------------------------
class GroundTruth:
    r"""Identity-centred Simfluence-Linear coefficients, drawn block by block of test examples.

    Per test example ``m``: a total decay rate per step ``rate_m ~ U(0.007, 0.015)`` (at batch
    size ``B``), a loss floor ``floor_m ~ U(0.4, 0.9)`` and an initial loss ``~ 2.3``. Per training
    example ``i``: ``A_im = -(rate_m / B) g_im`` with ``g_im`` log-normal (mean 1, so some examples
    matter more than others), ``B_im = (rate_m / B) (g_im floor_m + 0.5 floor_m h_im)`` with
    ``h_im ~ N(0, 1)`` (some examples help this test example, some hurt it). The table of a block
    depends only on ``seed`` and the block index, so it is regenerated instead of stored.
    """

    block = 128

    def __init__(self, num_train: int, num_test: int, batch: int, seed: int):
        self.num_train, self.num_test, self.batch, self.seed = num_train, num_test, batch, seed
        rng = np.random.default_rng([seed, 1])
        self.rate = rng.uniform(0.007, 0.015, num_test)
        self.floor = rng.uniform(0.4, 0.9, num_test)
        self.initial = 2.3 + 0.1 * rng.standard_normal(num_test)

    def blocks(self):
        for start in range(0, self.num_test, self.block):
            yield slice(start, min(start + self.block, self.num_test))

    def table(self, cols: slice) -> torch.Tensor:
        """float32 ``[N, 2w]`` = ``[A | B]`` for the test examples ``cols`` (a block)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cols.start)
        width = cols.stop - cols.start
        per_example = torch.as_tensor(self.rate[cols] / self.batch, dtype=torch.float32)
        floor = torch.as_tensor(self.floor[cols], dtype=torch.float32)
        gain = torch.exp(0.5 * torch.randn(self.num_train, width, generator=generator) - 0.125)
        spread = torch.randn(self.num_train, width, generator=generator)
        a = -per_example * gain
        b = per_example * floor * (gain + 0.5 * spread)
        return torch.cat([a, b], dim=1)


def draw_curricula(num_runs: int, num_steps: int, batch: int, num_train: int, rng: np.random.Generator) -> np.ndarray:
    """int32 ``[R, T, B]``: each run walks through random permutations of all examples (epochs)."""
    per_run = num_steps * batch
    epochs = -(-per_run // num_train)
    out = np.empty((num_runs, per_run), dtype=np.int32)
    for r in range(num_runs):
        out[r] = np.concatenate([rng.permutation(num_train) for _ in range(epochs)])[:per_run]
    return out.reshape(num_runs, num_steps, batch)


@dataclass
class Synthetic:
    fitting: RunSet
    held_out: RunSet | None
    truth_mse_per_test: np.ndarray | None  # held-out all-steps MSE of the (noiseless) true model, per test example
    seconds: float


def make_runs(size: Size, noise: float, seed: int) -> Synthetic:
    """Simulate ``size.num_runs + size.held_out`` runs from the ground truth, block by block of test examples.

    Memory: the losses ``[R, T + 1, M]`` float32 plus one block's coefficients; the full ground-truth
    table is never held.
    """
    start_time = time.perf_counter()
    truth = GroundTruth(size.num_train, size.num_test, size.batch, seed)
    rng = np.random.default_rng([seed, 2])
    total_runs, steps = size.num_runs + size.held_out, size.num_steps
    curricula = draw_curricula(total_runs, steps, size.batch, size.num_train, rng)
    initial = (truth.initial[None, :] + 0.02 * rng.standard_normal((total_runs, size.num_test))).astype(np.float32)
    design = BatchDesign(curricula.transpose(1, 0, 2).reshape(-1, size.batch), size.num_train)  # step-major rows
    # Fitting and held-out runs in separate arrays, so no 1 GB copy is made when splitting them.
    losses = [np.empty((count, steps + 1, size.num_test), dtype=np.float32) for count in (size.num_runs, size.held_out)]
    truth_sse = np.zeros(size.num_test)
    for cols in truth.blocks():
        width = cols.stop - cols.start
        table = truth.table(cols)
        coefficients = design.matmul(table).view(steps, total_runs, 2 * width)
        generator = torch.Generator().manual_seed(seed * 7_919 + 17 + cols.start)
        trajectory = torch.empty(steps + 1, total_runs, width)
        trajectory[0] = torch.from_numpy(initial[:, cols])
        clean = trajectory[0, size.num_runs:].clone()
        clean_sse = torch.zeros(width, dtype=torch.float64)
        for t in range(steps):
            alpha = coefficients[t, :, :width] + 1.0
            beta = coefficients[t, :, width:]
            step_noise = torch.randn(total_runs, width, generator=generator).mul_(noise)
            torch.addcmul(beta + step_noise, alpha, trajectory[t], out=trajectory[t + 1])
            if size.held_out:
                clean = alpha[size.num_runs:] * clean + beta[size.num_runs:]
                clean_sse += ((clean - trajectory[t + 1, size.num_runs:]).double() ** 2).sum(0)
        runs_first = trajectory.permute(1, 0, 2).numpy()
        losses[0][:, :, cols] = runs_first[: size.num_runs]
        losses[1][:, :, cols] = runs_first[size.num_runs:]
        truth_sse[cols] = clean_sse.numpy()
        del coefficients, trajectory
    train_ids = [f"train-{i}" for i in range(size.num_train)]
    test_ids = [f"test-{m}" for m in range(size.num_test)]
    fitting = RunSet.create(curricula[: size.num_runs], losses[0], train_ids, test_ids)
    held_out = (RunSet.create(curricula[size.num_runs:], losses[1], train_ids, test_ids,
                              run_ids=[f"held-out-{r:06d}" for r in range(size.held_out)])
                if size.held_out else None)
    truth_mse = truth_sse / (size.held_out * steps) if size.held_out else None
    return Synthetic(fitting, held_out, truth_mse, time.perf_counter() - start_time)


# --------------------------------------------------------------------------------------------
# Measuring helpers
# --------------------------------------------------------------------------------------------
class SolveRecorder:
    """Wraps the solver that ``LinearSimulator`` calls to record time and CG iterations per column chunk."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, float]] = []
        self._original = linear_module.solve_transition_ridge

    def __enter__(self) -> SolveRecorder:
        def timed(design, previous, target, *args, **kwargs):
            start = time.perf_counter()
            solution = self._original(design, previous, target, *args, **kwargs)
            self.chunks.append({"seconds": time.perf_counter() - start, "iterations": solution.iterations,
                                "residual": solution.max_relative_residual, "columns": int(target.shape[1])})
            return solution

        linear_module.solve_transition_ridge = timed
        return self

    def __exit__(self, *exc) -> None:
        linear_module.solve_transition_ridge = self._original

    def summary(self) -> dict[str, Any]:
        seconds = sum(c["seconds"] for c in self.chunks)
        iterations = [c["iterations"] for c in self.chunks]
        return {"solve_seconds": seconds, "chunks": len(self.chunks), "iterations_per_chunk": iterations,
                "seconds_per_iteration": seconds / max(1, sum(iterations))}


def mean_occurrences(runs: RunSet) -> float:
    return float(BatchDesign(Transitions.of(runs).batches, runs.num_train).occurrences.mean())


def resolve_ridge(args: argparse.Namespace, runs: RunSet) -> float:
    return args.ridge if args.ridge is not None else args.ridge_factor * mean_occurrences(runs)


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS since start or the last :func:`reset_peak`) of this process, bytes."""
    current = peak = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return current, peak


def reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def per_test_mse(predicted: np.ndarray, runs: RunSet) -> np.ndarray:
    """All-steps MSE per test example, ``[M]``."""
    error = predicted[:, runs.eval_steps[1:]].astype(np.float64) - runs.losses[:, 1:]
    return np.mean(error ** 2, axis=(0, 1))


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:,.0f} s"


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print(line)
    for row in cells[1:]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


# --------------------------------------------------------------------------------------------
# Case 1: medium, fast versus naive
# --------------------------------------------------------------------------------------------
def naive_transition_ridge(batches: np.ndarray, num_train: int, previous: np.ndarray, target: np.ndarray,
                           ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The naive fit: one dense float64 ridge solve per test example, ``(a, b)`` each ``[N, M]``.

    The objective of :func:`simfluence.simulators.ridge.solve_transition_ridge` with ``fit_alpha``,
    on the dense design ``X [S, N]`` (``X[s, i]`` = times example ``i`` is in batch ``s``).
    """
    x = np.zeros((batches.shape[0], num_train))
    steps = np.broadcast_to(np.arange(batches.shape[0])[:, None], batches.shape)
    valid = batches >= 0
    np.add.at(x, (steps[valid], batches[valid]), 1.0)
    previous, target = np.asarray(previous, dtype=np.float64), np.asarray(target, dtype=np.float64)
    a, b = np.zeros((num_train, target.shape[1])), np.zeros((num_train, target.shape[1]))
    for m in range(target.shape[1]):
        features = np.hstack([previous[:, m:m + 1] * x, x])
        gram = features.T @ features + ridge * np.eye(2 * num_train)
        a[:, m], b[:, m] = np.split(np.linalg.solve(gram, features.T @ target[:, m]), 2)
    return a, b


def bench_medium(args: argparse.Namespace, size: Size) -> dict[str, Any]:
    print(f"\n=== medium: {size.describe()} ===")
    data = make_runs(size, args.noise, args.seed)
    fitting, held_out = data.fitting, data.held_out
    ridge = resolve_ridge(args, fitting)
    losses = fitting.losses
    print(f"synthetic runs generated in {data.seconds:.2f} s; mean loss step 0 = {losses[:, 0].mean():.2f}, "
          f"step {size.num_steps // 2} = {losses[:, size.num_steps // 2].mean():.2f}, "
          f"step {size.num_steps} = {losses[:, -1].mean():.2f}; ridge = {ridge:.4g} "
          f"({ridge / mean_occurrences(fitting):.3g} x mean occurrences)")
    subset = np.unique(np.linspace(0, size.num_test - 1, min(args.naive_subset, size.num_test)).astype(int))
    transitions = Transitions.of(fitting)
    previous, current = transitions.columns(subset)
    results: dict[str, Any] = {"size": asdict(size), "ridge": ridge, "naive_subset": subset.tolist(),
                               "truth_mse_all": float(data.truth_mse_per_test.mean()),
                               "truth_mse_subset": float(data.truth_mse_per_test[subset].mean()), "variants": {}}
    rows, accuracy_rows = [], []
    for name in args.variants:
        cls = VARIANTS[name]
        simulator = cls(ridge=ridge, dtype="float32", tol=args.tol, max_iter=args.max_iter)
        gc.collect()
        with SolveRecorder() as recorder:
            start = time.perf_counter()
            simulator.fit(fitting)
            fast_seconds = time.perf_counter() - start
        predicted = simulator.simulate(held_out.curricula, held_out.initial_losses)
        fast_mse_per_test = per_test_mse(predicted, held_out)

        # Naive: one dense float64 normal-equation solve per test example (2N x 2N).
        target = current - previous if cls.alpha_offset == 1.0 else current
        start = time.perf_counter()
        a, b = naive_transition_ridge(transitions.batches, size.num_train, previous, target, ridge)
        naive_seconds = time.perf_counter() - start
        naive_table = torch.as_tensor(np.hstack([a, b]))
        initial = held_out.initial_losses[:, subset].astype(np.float64)
        naive_predicted = rollout(naive_table, held_out.curricula, initial, cls.alpha_offset, True)
        naive_mse = float(per_test_mse(naive_predicted, _subset_runs(held_out, subset)).mean())
        fast_mse = float(fast_mse_per_test[subset].mean())
        fast_a, fast_b = simulator.coefficients
        fast_sub = np.hstack([fast_a[:, subset], fast_b[:, subset]]).astype(np.float64)
        naive_sub = np.hstack([a, b])
        coefficient_diff = float(np.linalg.norm(fast_sub - naive_sub) / np.linalg.norm(naive_sub))
        naive_total = naive_seconds / subset.size * size.num_test
        info = simulator.fit_info
        result = {
            "fast_fit_seconds": fast_seconds, **recorder.summary(), "cg_iterations": info["cg_iterations"],
            "cg_relative_residual": info["cg_relative_residual"], "column_chunk": info["column_chunk"],
            "naive_subset_seconds": naive_seconds, "naive_extrapolated_seconds": naive_total,
            "speed_ratio": naive_total / fast_seconds, "fast_mse_all": float(fast_mse_per_test.mean()),
            "fast_mse_subset": fast_mse, "naive_mse_subset": naive_mse,
            "mse_relative_difference": abs(fast_mse - naive_mse) / naive_mse,
            "coefficient_relative_difference": coefficient_diff,
        }
        results["variants"][name] = result
        rows.append([name, fmt_seconds(fast_seconds), f"{result['solve_seconds']:.3g} s",
                     f"{info['cg_iterations']} (chunk {info['column_chunk']})", f"{info['cg_relative_residual']:.1e}",
                     f"{fmt_seconds(naive_seconds)} / {subset.size}", fmt_seconds(naive_total),
                     f"{result['speed_ratio']:,.0f}x"])
        accuracy_rows.append([name, f"{fast_mse:.6f}", f"{naive_mse:.6f}",
                              f"{100 * result['mse_relative_difference']:.3g} %", f"{coefficient_diff:.2e}",
                              f"{result['fast_mse_all']:.6f}"])
        del simulator, a, b, naive_table
    print_table(f"Fit time, all {size.num_test} test examples (naive timed on {subset.size} test examples, "
                f"extrapolated linearly x{size.num_test / subset.size:g})",
                ["variant", "fast fit", "of which CG", "CG iters", "CG resid", "naive measured",
                 f"naive est. {size.num_test}", "speed ratio"], rows)
    print_table(f"Held-out all-steps MSE ({size.held_out} runs, rolled out from the true L_0) on the "
                f"{subset.size} naive test examples; true model (noise floor) = {results['truth_mse_subset']:.6f} "
                f"on the subset, {results['truth_mse_all']:.6f} on all",
                ["variant", "fast", "naive", "rel. diff", "coef rel. diff", f"fast, all {size.num_test}"],
                accuracy_rows)
    return results


def _subset_runs(runs: RunSet, cols: np.ndarray) -> RunSet:
    """The same runs restricted to test examples ``cols``."""
    return RunSet(runs.curricula, runs.losses[:, :, cols], runs.eval_steps, runs.train_ids, runs.test_ids[cols],
                  runs.run_ids, runs.meta)


# --------------------------------------------------------------------------------------------
# Case 2: large, fit time and memory in fresh subprocesses
# --------------------------------------------------------------------------------------------
def large_child(args: argparse.Namespace, size: Size, variant: str) -> dict[str, Any]:
    """Runs inside a fresh process: generate runs, fit one variant, report time and memory."""
    baseline = rss_bytes()[0]
    data = make_runs(size, args.noise, args.seed)
    fitting, held_out = data.fitting, data.held_out
    ridge = resolve_ridge(args, fitting)
    full_test = size.num_test
    if 0 < args.large_test_subset < full_test:  # fit the first K test examples only; extrapolate the time
        fitting = _subset_runs(fitting, np.arange(args.large_test_subset))  # copies the K columns
        held_out = _subset_runs(held_out, np.arange(args.large_test_subset))
        data.truth_mse_per_test = data.truth_mse_per_test[: args.large_test_subset]
    gc.collect()
    before_current, before_peak = rss_bytes()
    before_max = max_rss_bytes()
    peak_reset = reset_peak()
    simulator = VARIANTS[variant](ridge=ridge, dtype="float32", tol=args.tol, max_iter=args.max_iter)
    with SolveRecorder() as recorder:
        start = time.perf_counter()
        simulator.fit(fitting)
        fit_seconds = time.perf_counter() - start
    after_current, fit_peak = rss_bytes()
    after_max = max_rss_bytes()
    info = simulator.fit_info
    start = time.perf_counter()
    predicted = simulator.simulate(held_out.curricula, held_out.initial_losses)
    rollout_seconds = time.perf_counter() - start
    return {
        "variant": variant, "size": asdict(size), "ridge": ridge, "generate_seconds": data.seconds,
        "fit_seconds": fit_seconds, **recorder.summary(), "cg_iterations": info["cg_iterations"],
        "cg_relative_residual": info["cg_relative_residual"], "column_chunk": info["column_chunk"],
        "rss_import": baseline, "rss_before_fit": before_current, "peak_before_fit": max(before_peak, before_max),
        "rss_after_fit": after_current, "fit_peak_rss": fit_peak if peak_reset else None,
        "max_rss": after_max, "peak_reset": peak_reset,
        "fit_increment": (fit_peak if peak_reset else after_max) - before_current,
        "data_bytes": data.fitting.losses.nbytes + data.held_out.losses.nbytes,
        "table_bytes": simulator.table.numel() * simulator.table.element_size(),
        "held_out_rollout_seconds": rollout_seconds,
        "held_out_mse": all_steps_mse(predicted, held_out), "truth_mse": float(data.truth_mse_per_test.mean()),
        "torch_threads": torch.get_num_threads(), "fitted_test": fitting.num_test,
        "fit_seconds_extrapolated": fit_seconds * full_test / fitting.num_test,
    }


def bench_large(args: argparse.Namespace, size: Size) -> dict[str, Any]:
    partial = 0 < args.large_test_subset < size.num_test
    subset = f"; fitting only the first {args.large_test_subset} test examples" if partial else ""
    print(f"\n=== large: {size.describe()}, float32, one fresh subprocess per variant{subset} ===")
    results = {"size": asdict(size), "variants": {}}
    rows, memory_rows, profile_rows = [], [], []
    for variant in args.variants:
        command = [sys.executable, os.path.abspath(__file__), "--child-large", variant, "--seed", str(args.seed),
                   "--noise", str(args.noise), "--tol", str(args.tol), "--ridge-factor", str(args.ridge_factor),
                   "--max-iter", str(args.max_iter)]
        if args.ridge is not None:
            command += ["--ridge", str(args.ridge)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.large_test_subset:
            command += ["--large-test-subset", str(args.large_test_subset)]
        if args.quick:
            command.append("--quick")
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_TAG)]
        if completed.returncode != 0 or not lines:
            print(completed.stdout[-2000:], completed.stderr[-4000:], sep="\n")
            raise RuntimeError(f"large child for {variant} failed with exit code {completed.returncode}")
        result = json.loads(lines[-1][len(RESULT_TAG):])
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


# --------------------------------------------------------------------------------------------
# Case 3: rollout throughput
# --------------------------------------------------------------------------------------------
def naive_rollout(a: np.ndarray, b: np.ndarray, curricula: np.ndarray, initial: np.ndarray, alpha_offset: float
                  ) -> np.ndarray:
    """NumPy loop over steps, vectorised over runs and test examples: gather the batch rows, sum, update."""
    num_runs, num_steps, _ = curricula.shape
    out = np.empty((num_runs, num_steps + 1, a.shape[1]), dtype=np.float32)
    loss = initial.astype(np.float32)
    out[:, 0] = loss
    for t in range(num_steps):
        batch = curricula[:, t]
        loss = (alpha_offset + a[batch].sum(1)) * loss + b[batch].sum(1)
        out[:, t + 1] = loss
    return out


def best_of(repeats: int, function) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - start)
    return best, value


def bench_rollout(args: argparse.Namespace, size: Size) -> dict[str, Any]:
    print(f"\n=== rollout: N={size.num_train:,} train, M={size.num_test:,} test, {size.num_runs} curricula x "
          f"{size.num_steps} steps, batch {size.batch}, float32 ===")
    truth = GroundTruth(size.num_train, size.num_test, size.batch, args.seed)
    blocks = [truth.table(cols) for cols in truth.blocks()]
    half = [t.shape[1] // 2 for t in blocks]
    table = torch.cat([t[:, :h] for t, h in zip(blocks, half)] + [t[:, h:] for t, h in zip(blocks, half)], 1)
    rng = np.random.default_rng([args.seed, 3])
    curricula = draw_curricula(size.num_runs, size.num_steps, size.batch, size.num_train, rng)
    initial = np.repeat(truth.initial[None], size.num_runs, 0)
    simulator = LinearIdentitySimulator(ridge=1.0)
    simulator.train_ids = np.array([f"train-{i}" for i in range(size.num_train)])
    simulator.test_ids = np.array([f"test-{m}" for m in range(size.num_test)])
    simulator.table = table
    predictions = size.num_runs * size.num_steps * size.num_test
    rollout(table, curricula[:2], initial[:2], 1.0, True)  # warm-up
    fast_seconds, fast = best_of(args.repeats, lambda: rollout(table, curricula, initial, 1.0, True))
    simulate_seconds, _ = best_of(args.repeats, lambda: simulator.simulate(curricula, initial))
    a, b = table[:, :size.num_test].numpy(), table[:, size.num_test:].numpy()
    naive_seconds, naive = best_of(args.repeats, lambda: naive_rollout(a, b, curricula, initial, 1.0))
    difference = float(np.abs(fast - naive).max())
    rows = [
        ["simfluence rollout (torch embedding_bag)", fmt_seconds(fast_seconds), f"{predictions / fast_seconds:.3g}",
         "1.00"],
        ["LinearSimulator.simulate (rollout + input checks)", fmt_seconds(simulate_seconds),
         f"{predictions / simulate_seconds:.3g}", f"{simulate_seconds / fast_seconds:.2f}"],
        ["naive NumPy loop over steps", fmt_seconds(naive_seconds), f"{predictions / naive_seconds:.3g}",
         f"{naive_seconds / fast_seconds:.2f}"],
    ]
    print_table(f"Rollout throughput: {predictions:,} (test example x step) predictions, best of {args.repeats}; "
                f"max |rollout - naive| = {difference:.1e}",
                ["method", "time", "predictions / s", "time / rollout time"], rows)
    print(f"speed ratio rollout vs naive NumPy: {naive_seconds / fast_seconds:.2f}x (> 1: rollout is faster)")
    return {"size": asdict(size), "predictions": predictions, "rollout_seconds": fast_seconds,
            "simulate_seconds": simulate_seconds, "naive_seconds": naive_seconds,
            "throughput": predictions / fast_seconds, "simulate_throughput": predictions / simulate_seconds,
            "naive_throughput": predictions / naive_seconds, "speed_ratio": naive_seconds / fast_seconds,
            "max_abs_difference": difference}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def check(name: str, value: float, target: float, higher_is_better: bool, unit: str = "") -> list[str]:
    ok = value >= target if higher_is_better else value <= target
    relation = ">=" if higher_is_better else "<="
    return [name, f"{value:.3g}{unit}", f"{relation} {target:g}{unit}", "met" if ok else "MISSED"]


def summarize(results: dict[str, Any], quick: bool) -> None:
    rows = []
    medium = results.get("medium")
    if medium:
        for variant, r in medium["variants"].items():
            rows.append(check(f"medium {variant}: held-out MSE rel. diff fast vs naive",
                              100 * r["mse_relative_difference"], 1.0, False, " %"))
            rows.append(check(f"medium {variant}: speed ratio vs naive", r["speed_ratio"], 100, True, "x"))
    large = results.get("large")
    if large:
        for variant, r in large["variants"].items():
            partial = r["fitted_test"] < r["size"]["num_test"]
            rows.append(check(f"large {variant}: fit time" + (" (extrapolated)" if partial else ""),
                              r["fit_seconds_extrapolated"], 120, False, " s"))
            rows.append(check(f"large {variant}: peak memory (max RSS)" + (" (partial fit: not the target)"
                                                                           if partial else ""),
                              r["max_rss"] / GB, 8, False, " GB"))
    rollout_result = results.get("rollout")
    if rollout_result:
        rows.append(check("rollout throughput", rollout_result["throughput"], 1e8, True, " /s"))
    title = "Targets" + (" (targets are for the full sizes; --quick only smoke-tests)" if quick else "")
    print_table(title, ["check", "measured", "target", "status"], rows)


def environment() -> dict[str, Any]:
    blas_threads = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "blas_threads": blas_threads[0] if blas_threads else None,
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "processor": _cpu_name(), "load_average": os.getloadavg()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke test (< 30 s)")
    parser.add_argument("--only", action="append", choices=["medium", "large", "rollout"],
                        help="run only this case (repeatable); default: all three")
    parser.add_argument("--variants", default="linear,linear-identity",
                        help="comma-separated simulators to fit: linear, linear-identity (default: both)")
    parser.add_argument("--ridge-factor", type=float, default=0.01,
                        help="ridge = factor x mean number of times a training example is trained on "
                             "(the scale of LinearSimulator's ridge grid; default 0.01, close to what "
                             "cross-validation picks on these synthetic runs)")
    parser.add_argument("--ridge", type=float, default=None, help="absolute ridge (overrides --ridge-factor)")
    parser.add_argument("--tol", type=float, default=1e-5, help="CG tolerance (LinearSimulator default 1e-5)")
    parser.add_argument("--max-iter", type=int, default=1000,
                        help="CG iteration cap (LinearSimulator default 1000); a small cap makes a quick memory "
                             "probe of the large case: the working set is the same after the first iteration")
    parser.add_argument("--noise", type=float, default=0.005, help="std of the per-step loss noise (default 0.005)")
    parser.add_argument("--naive-subset", type=int, default=5,
                        help="test examples the naive dense solve is timed on (default 5)")
    parser.add_argument("--large-test-subset", type=int, default=0, metavar="K",
                        help="large case: fit only the first K test examples (all data still generated and held) "
                             "and extrapolate the fit time linearly to all; memory then reflects the data, not "
                             "the full table (default 0 = fit all)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the rollout timings (best of)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, usually the number of cores); "
                             "use 1 when other processes compete for the cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write all measurements to this JSON file")
    parser.add_argument("--child-large", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)  # NumPy's BLAS (the naive dense solves) too
    sizes = QUICK if args.quick else FULL
    if args.child_large:
        result = large_child(args, sizes["large"], args.child_large)
        print(RESULT_TAG + json.dumps(result))
        return 0
    cases = args.only or ["medium", "large", "rollout"]
    env = environment()
    print(f"simfluence fit/rollout benchmark{' (--quick)' if args.quick else ''}: "
          f"{env['cpus']} CPUs ({env['processor']}), "
          f"torch {env['torch']} with {env['torch_threads']} threads, numpy {env['numpy']} "
          f"(BLAS threads {env['blas_threads']}), "
          f"load average {env['load_average'][0]:.2f}")
    print(f"ridge = {args.ridge if args.ridge is not None else f'{args.ridge_factor:g} x mean occurrences'}, "
          f"CG tol = {args.tol:g}, CG max_iter = {args.max_iter}, loss noise std = {args.noise:g}, seed = {args.seed}")
    if args.max_iter < 1000:
        print("NOTE: CG is capped: fit times are not converged fits (use this only to probe memory)")
    if env["load_average"][0] >= 0.75 * (env["cpus"] or 1):
        print(f"WARNING: load average {env['load_average'][0]:.2f} on {env['cpus']} CPUs: other processes are running, "
              "timings will be noisy" + ("; an oversubscribed torch thread pool can be several times slower, "
                                         "consider --threads 1" if env["torch_threads"] > 1 else ""))
    results: dict[str, Any] = {"environment": env, "quick": args.quick}
    start = time.perf_counter()
    for case in ("medium", "large", "rollout"):
        if case in cases:
            results[case] = {"medium": bench_medium, "large": bench_large, "rollout": bench_rollout}[case](
                args, sizes[case])
    summarize(results, args.quick)
    results["total_seconds"] = time.perf_counter() - start
    results["environment"]["load_average_end"] = os.getloadavg()
    print(f"\ntotal {results['total_seconds']:.1f} s; load average at end "
          f"{results['environment']['load_average_end'][0]:.2f} (> {env['cpus']} means other processes competed)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
