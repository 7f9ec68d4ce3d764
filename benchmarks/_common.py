"""What the benchmark scripts share: arguments, timing, memory, the machine, tables and JSON results.

The scripts import it as ``_common`` (Python puts a script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import simfluence.simulators.linear as linear_module
from simfluence.runs.atomic import write_text_atomic
from simfluence.runs.log import RunSet
from simfluence.runs.synthetic import LargeLinearRuns, large_linear_runs
from simfluence.simulators import LinearIdentitySimulator, LinearSimulator
from simfluence.simulators.design import BatchDesign
from simfluence.simulators.linear import Transitions

T = TypeVar("T")
GB = 1e9
RESULT_TAG = "@@RESULT "
"""Prefix of the line that carries a child process's result (:func:`child_result`)."""


# --- arguments ---------------------------------------------------------------------------
def benchmark_parser(doc: str, quick: str | None = None,
                     seed: str | None = "seed of every random draw") -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with ``--json`` (and ``--quick``, ``--seed``).

    Args:
        doc: the script's docstring.
        quick: help of a ``--quick`` flag (small sizes); ``None``: no such flag.
        seed: help of ``--seed`` (default 0); ``None``: no such option.
    """
    out = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    if quick is not None:
        out.add_argument("--quick", action="store_true", help=quick)
    if seed is not None:
        out.add_argument("--seed", type=int, default=0, help=seed)
    out.add_argument("--json", metavar="PATH", default=None, help="also write every number to this JSON file")
    return out


# --- time and memory ---------------------------------------------------------------------
def timed(function: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``function(*args, **kwargs)``'s value and its wall time in seconds."""
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def best_of(repeats: int, function: Callable[..., T], *args: Any) -> tuple[float, T]:
    """The best wall time (s) of ``repeats`` calls ``function(*args)`` and the last call's value."""
    best, value = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        value, seconds = timed(function, *args)
        best = min(best, seconds)
    return best, value  # type: ignore[return-value]


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
    """Peak resident memory of this process since it started (``ru_maxrss``), bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_result(command: Sequence[str]) -> dict[str, Any]:
    """Run ``command`` (a benchmark in a fresh process, for its own peak memory) and return its result.

    The child prints its result as one JSON line after :data:`RESULT_TAG` (:func:`print_result`).
    """
    completed = subprocess.run(list(command), capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if completed.returncode != 0 or not lines:
        print(completed.stdout[-2000:], completed.stderr[-4000:], sep="\n")
        raise RuntimeError(f"{' '.join(command[1:3])}: the child process failed with exit code {completed.returncode}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def print_result(result: dict[str, Any]) -> None:
    """In a child process: hand ``result`` to :func:`child_result`."""
    print(RESULT_TAG + json.dumps(result, default=float), flush=True)


# --- the machine -------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Versions, threads, CPUs and load: what a timing depends on."""
    blas_threads = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "blas_threads": blas_threads[0] if blas_threads else None,
            "cpus": os.cpu_count(), "machine": platform.machine(), "processor": cpu_name(),
            "load_average": os.getloadavg()}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def warn_if_busy(env: dict[str, Any]) -> None:
    """Say so when other processes load the machine (timings are then noisy)."""
    if env["load_average"][0] >= 0.75 * (env["cpus"] or 1):
        print(f"WARNING: load average {env['load_average'][0]:.2f} on {env['cpus']} CPUs: other processes are running, "
              "timings will be noisy" + ("; an oversubscribed torch thread pool can be several times slower, "
                                         "consider --threads 1" if env["torch_threads"] > 1 else ""))


# --- tables ------------------------------------------------------------------------------
def number(value: Any, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits; ``n/a`` for None, NaN and inf; other values as ``str``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, (float, np.floating)) else str(value)


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:,.0f} s"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table (cells as ``str``)."""
    return (["| " + " | ".join(str(c) for c in header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table under ``title``: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def check(name: str, value: float, target: float, higher_is_better: bool, unit: str = "") -> list[str]:
    """A row of a targets table: ``[name, measured, target, met / MISSED]``."""
    ok = value >= target if higher_is_better else value <= target
    relation = ">=" if higher_is_better else "<="
    return [name, f"{value:.3g}{unit}", f"{relation} {target:g}{unit}", "met" if ok else "MISSED"]


def print_targets(rows: list[list[str]], quick: bool) -> None:
    """The :func:`check` rows as a table (with a note that ``--quick`` sizes do not test the targets)."""
    title = "Targets" + (" (targets are for the full sizes; --quick only smoke-tests)" if quick else "")
    print_table(title, ["check", "measured", "target", "status"], rows)


# --- results -----------------------------------------------------------------------------
def write_json(path: str | os.PathLike | None, results: Any) -> None:
    """Write ``results`` to ``path`` as indented JSON, atomically; nothing when ``path`` is None."""
    if path:
        write_text_atomic(path, json.dumps(results, indent=1, default=float))


# --- Simfluence-Linear on synthetic runs (fit_medium.py, fit_large.py, rollout.py) --------------
@dataclass(frozen=True)
class Size:
    """A synthetic problem (:func:`simfluence.runs.synthetic.large_linear_runs`)."""

    num_train: int
    num_test: int
    num_runs: int  # fitting runs
    num_steps: int
    batch: int = 8
    held_out: int = 10

    def describe(self) -> str:
        return (f"N={self.num_train:,} train, M={self.num_test:,} test, {self.num_runs} runs x {self.num_steps} steps, "
                f"batch {self.batch}, {self.held_out} held-out runs")

    def runs(self, noise: float, seed: int) -> tuple[LargeLinearRuns, float]:
        """The fitting and held-out runs, and the seconds it took to simulate them."""
        return timed(large_linear_runs, self.num_train, self.num_test, self.num_runs, self.num_steps, self.batch,
                     self.held_out, noise, seed)


VARIANTS = {"linear": LinearSimulator, "linear-identity": LinearIdentitySimulator}


def add_fit_arguments(out: argparse.ArgumentParser) -> None:
    """The options of a timed ``LinearSimulator`` fit on synthetic runs."""
    out.add_argument("--variants", default="linear,linear-identity",
                     help="comma-separated simulators to fit: linear, linear-identity (default: both)")
    out.add_argument("--ridge-factor", type=float, default=0.01,
                     help="ridge = factor x mean number of times a training example is trained on (the scale of "
                          "LinearSimulator's ridge grid; default 0.01, close to what cross-validation picks on "
                          "these synthetic runs)")
    out.add_argument("--ridge", type=float, default=None, help="absolute ridge (overrides --ridge-factor)")
    out.add_argument("--tol", type=float, default=1e-5, help="CG tolerance (LinearSimulator default 1e-5)")
    out.add_argument("--max-iter", type=int, default=1000,
                     help="CG iteration cap (LinearSimulator default 1000); a small cap makes a quick memory probe of "
                          "the large case: the working set is the same after the first iteration")
    out.add_argument("--noise", type=float, default=0.005, help="std of the per-step loss noise (default 0.005)")
    add_threads_argument(out)


def add_threads_argument(out: argparse.ArgumentParser) -> None:
    out.add_argument("--threads", type=int, default=None,
                     help="torch intra-op threads (default: torch's choice, usually the number of cores); "
                          "use 1 when other processes compete for the cores")


def parse_fit_arguments(out: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, check ``--variants`` and apply ``--threads`` (to NumPy's BLAS too)."""
    args = out.parse_args(argv)
    if hasattr(args, "variants"):
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(args.variants) - set(VARIANTS))
        if unknown:
            out.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)
    return args


def print_header(title: str, args: argparse.Namespace) -> dict[str, Any]:
    """Print what the timings depend on (machine, settings); returns :func:`machine`."""
    env = machine()
    print(f"{title}{' (--quick)' if args.quick else ''}: {env['cpus']} CPUs ({env['processor']}), "
          f"torch {env['torch']} with {env['torch_threads']} threads, numpy {env['numpy']} "
          f"(BLAS threads {env['blas_threads']}), load average {env['load_average'][0]:.2f}")
    if hasattr(args, "ridge_factor"):
        print(f"ridge = {args.ridge if args.ridge is not None else f'{args.ridge_factor:g} x mean occurrences'}, "
              f"CG tol = {args.tol:g}, CG max_iter = {args.max_iter}, loss noise std = {args.noise:g}, "
              f"seed = {args.seed}")
        if args.max_iter < 1000:
            print("NOTE: CG is capped: fit times are not converged fits (use this only to probe memory)")
    warn_if_busy(env)
    return env


def finish(results: dict[str, Any], args: argparse.Namespace, start: float) -> None:
    """Total time and load at the end, then the JSON file."""
    results["total_seconds"] = time.perf_counter() - start
    results["environment"]["load_average_end"] = os.getloadavg()
    print(f"\ntotal {results['total_seconds']:.1f} s; load average at end "
          f"{results['environment']['load_average_end'][0]:.2f} (> {results['environment']['cpus']} means other "
          "processes competed)")
    write_json(args.json, results)


class SolveRecorder:
    """Wraps the solver that ``LinearSimulator`` calls to record time and CG iterations per column chunk."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, float]] = []
        self._original = linear_module.solve_transition_ridge

    def __enter__(self) -> SolveRecorder:
        def timed_solve(design, previous, target, *args, **kwargs):
            solution, seconds = timed(self._original, design, previous, target, *args, **kwargs)
            self.chunks.append({"seconds": seconds, "iterations": solution.iterations,
                                "residual": solution.max_relative_residual, "columns": int(target.shape[1])})
            return solution

        linear_module.solve_transition_ridge = timed_solve
        return self

    def __exit__(self, *exc) -> None:
        linear_module.solve_transition_ridge = self._original

    def summary(self) -> dict[str, Any]:
        seconds = sum(c["seconds"] for c in self.chunks)
        iterations = [c["iterations"] for c in self.chunks]
        return {"solve_seconds": seconds, "chunks": len(self.chunks), "iterations_per_chunk": iterations,
                "seconds_per_iteration": seconds / max(1, sum(iterations))}


def resolve_ridge(args: argparse.Namespace, runs: RunSet) -> float:
    """``--ridge``, else ``--ridge-factor`` times the mean number of times a training example is trained on."""
    if args.ridge is not None:
        return args.ridge
    return args.ridge_factor * mean_occurrences(runs)


def mean_occurrences(runs: RunSet) -> float:
    return float(BatchDesign(Transitions.of(runs).batches, runs.num_train).occurrences.mean())


def test_columns(runs: RunSet, cols: np.ndarray) -> RunSet:
    """The same runs restricted to test examples ``cols``."""
    return RunSet(runs.curricula, runs.losses[:, :, cols], runs.eval_steps, runs.train_ids, runs.test_ids[cols],
                  runs.run_ids, runs.meta)
