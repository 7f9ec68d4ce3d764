"""The ``simfluence`` command line: a thin layer over the library.

Errors in the user's input (files, fields, arguments) print one line and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
import numpy as np

from simfluence.runs import RunDataError, load_runs, save_runs
from simfluence.runs.interchange import read_npz_arrays
from simfluence.runs.atomic import atomic_path

METHODS = ["linear", "linear-identity", "additive", "mean-trajectory", "constant"]
GRADIENT_METHODS = ["grad-dot", "grad-dot-scaled", "tracin-cp", "tracin-cp-scaled", "influence", "influence-scaled"]


def _user_errors(command):
    """Turn bad-input exceptions into a one-line message and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (RunDataError, ValueError, FileNotFoundError) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="simfluence")
def main() -> None:
    """Training data attribution by simulating training runs."""


@main.command()
@click.argument("runs", type=click.Path(exists=True))
@click.option("--method", type=click.Choice(METHODS + GRADIENT_METHODS), default="linear-identity",
              show_default=True, help="Gradient methods take the task (model, data) from the runs' meta.")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Model file (.npz) to write.")
@click.option("--ridge", type=float, default=None, help="Ridge strength; default: chosen by cross-validation.")
@click.option("--cv-folds", type=int, default=3, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device for fitting, e.g. cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False), default=None,
              help="tracin-cp: a run store collected with --checkpoint-steps (default: replay a fitting run).")
@_user_errors
def fit(runs: str, method: str, out: str, ridge: float | None, cv_folds: int, device: str, dtype: str,
        checkpoints: str | None) -> None:
    """Fit a simulator on RUNS (a run store directory or an interchange .npz)."""
    from simfluence.simulators import make_simulator

    run_set = load_runs(runs)
    if checkpoints and not method.startswith("tracin-cp"):
        raise ValueError(f"--checkpoints: only tracin-cp uses checkpoints, not '{method}'")
    params = {}
    if method in ("linear", "linear-identity", "additive"):
        params = {"ridge": ridge, "cv_folds": cv_folds, "device": device, "dtype": dtype}
    elif method in GRADIENT_METHODS:
        params = {"device": device, "dtype": dtype, **({"checkpoints": checkpoints} if checkpoints else {})}
    simulator = make_simulator(method, **params).fit(run_set)
    simulator.save(out)
    info = {key: value for key, value in simulator.fit_info.items() if key != "cv_scores"}
    click.echo(f"fitted {method} on {run_set!r}: {json.dumps(info)}")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("heldout", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_user_errors
def evaluate(model: str, heldout: str, as_json: bool) -> None:
    """Score MODEL on HELDOUT runs beside the mean-trajectory and constant baselines."""
    from simfluence.evaluate import evaluate as evaluate_simulator
    from simfluence.simulators import Simulator

    result = evaluate_simulator(Simulator.load(model), load_runs(heldout), source=heldout)
    click.echo(json.dumps(result.as_dict()) if as_json else result.table())


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("curricula", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Trajectories file (.npz).")
@_user_errors
def simulate(model: str, curricula: str, out: str) -> None:
    """Simulate trajectories for CURRICULA.npz.

    The file holds ``curricula`` int [R, T, B] and ``initial_losses`` float [R, M] (an interchange
    file works too: its step-0 losses are used). Writes ``trajectories`` float32 [R, T + 1, M]
    and ``test_ids``.
    """
    from simfluence.simulators import Simulator

    simulator = Simulator.load(model)
    arrays = read_npz_arrays(curricula, ("curricula",))
    if "initial_losses" in arrays:
        initial = arrays["initial_losses"]
    elif "losses" in arrays:
        initial = arrays["losses"][:, 0]
    else:
        raise RunDataError(curricula, "initial_losses", "is missing", "add the losses before training, [runs, test]")
    trajectories = simulator.simulate(arrays["curricula"], initial, source=curricula)
    with atomic_path(out, suffix=".npz") as temporary:
        np.savez(temporary, trajectories=trajectories, test_ids=simulator.test_ids.astype(str))
    click.echo(f"wrote {out}: trajectories {trajectories.shape}")


@main.command()
@click.argument("runs", type=click.Path(exists=True))
@click.option("--heldout", type=int, required=True, help="Number of held-out runs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write NAME-train.npz and NAME-heldout.npz (default: beside RUNS).")
@_user_errors
def split(runs: str, heldout: int, seed: int, out_dir: str | None) -> None:
    """Split RUNS at random into fitting and held-out interchange files."""
    from simfluence.evaluate import split_runs

    path = Path(runs)
    fitting, held_out = split_runs(load_runs(path), heldout, seed)
    directory = Path(out_dir) if out_dir else path.parent
    stem = path.stem if path.suffix == ".npz" else path.name
    for suffix, part in (("train", fitting), ("heldout", held_out)):
        target = directory / f"{stem}-{suffix}.npz"
        save_runs(part, target)
        click.echo(f"wrote {target}: {part!r}")


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got '{text}'") from None


def _task_options(options: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs; values are JSON where they parse (numbers, lists), else strings."""
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"--option: expected KEY=VALUE, got '{option}'")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


@main.command()
def tasks() -> None:
    """List the built-in tasks."""
    from simfluence.collect import list_tasks

    for info in list_tasks():
        click.echo(f"{info.name:<14} {info.description}")
        click.echo(f"{'':<14} data: {info.source}")


@main.command()
@click.argument("task")
@click.option("--runs", "num_runs", type=int, required=True, help="Runs the store should hold.")
@click.option("--steps", "num_steps", type=int, required=True, help="Optimizer steps per run.")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Run store directory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (with --executor ray).")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes (or Ray tasks at once).")
@click.option("--eval-every", type=int, default=1, show_default=True, help="Record test losses every k steps.")
@click.option("--checkpoint-steps", default=None,
              help="Comma-separated steps after which to keep every run's weights (0: the start), for tracin-cp.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Task setting, e.g. lr_schedule=cosine, warmup_steps=10, learning_rate=0.05 (repeatable).")
@_user_errors
def collect(task: str, num_runs: int, num_steps: int, out: str, seed: int, executor: str, address: str | None,
            workers: int, eval_every: int, checkpoint_steps: str | None, options: tuple[str, ...]) -> None:
    """Collect real training runs of TASK on random curricula into a run store (resumable)."""
    from simfluence.collect import collect as collect_runs, get_task

    eval_steps = None if eval_every == 1 else sorted(set(range(0, num_steps + 1, eval_every)) | {num_steps})
    steps = _integers(checkpoint_steps, "--checkpoint-steps") if checkpoint_steps else None
    store = collect_runs(get_task(task, **_task_options(options)), out, num_runs, num_steps, seed,
                         eval_steps=eval_steps, workers=workers, executor=executor, address=address,
                         checkpoint_steps=steps)
    click.echo(f"{store!r}")


@main.command()
@click.argument("task")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: benchmark-TASK).")
@click.option("--quick", is_flag=True, help="Small sizes for a smoke run (CI).")
@click.option("--runs", "num_runs", type=int, default=None)
@click.option("--steps", "num_steps", type=int, default=None)
@click.option("--heldout", "num_heldout", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True)
@click.option("--methods", default=None, help="Comma-separated subset of methods (default: all).")
@_user_errors
def benchmark(task: str, out: str | None, quick: bool, num_runs: int | None, num_steps: int | None,
              num_heldout: int | None, seed: int, workers: int, methods: str | None) -> None:
    """Fit and score every method on held-out runs of TASK; writes benchmark.md/.json and a plot."""
    from simfluence.benchmark import BenchmarkConfig, benchmark_markdown, run_benchmark

    overrides = {key: value for key, value in (("num_runs", num_runs), ("num_steps", num_steps),
                                               ("num_heldout", num_heldout)) if value is not None}
    if methods:
        overrides["methods"] = tuple(method.strip() for method in methods.split(","))
    overrides.update(task=task, out_dir=out or f"benchmark-{task}", seed=seed, workers=workers)
    config = BenchmarkConfig.quick(**overrides) if quick else BenchmarkConfig(**overrides)
    result = run_benchmark(config)
    click.echo(benchmark_markdown(result))
    click.echo(f"wrote {config.out_dir}/benchmark.md, benchmark.json, trajectories.png")


if __name__ == "__main__":
    main()
