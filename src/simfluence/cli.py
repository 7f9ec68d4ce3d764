"""The ``simfluence`` command line: a thin layer over the library.

Errors in the user's input (files, fields, arguments) print one line and exit with status 2:
the library raises them as :class:`~simfluence.errors.SimfluenceError` in its own terms, and
this layer names its flags. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from simfluence.errors import SimfluenceError, UsageError
from simfluence.runs import RunDataError, load_runs, save_runs
from simfluence.runs.atomic import atomic_path
from simfluence.runs.interchange import read_npz_arrays

POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
CV_FOLDS = click.IntRange(min=2)


class _SimulatorChoice(click.Choice):
    """The registered simulator kinds, looked up when first needed (importing them loads torch)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from simfluence.simulators import simulator_kinds

        return tuple(simulator_kinds())

    @choices.setter
    def choices(self, value) -> None:  # click's __init__ assigns; the registry is the source
        pass


def _user_errors(command):
    """Turn bad-input exceptions into a one-line message and exit status 2; warnings print as one line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return command(*args, **kwargs)
        except SimfluenceError as error:  # anything else is a bug: it keeps its traceback
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


@contextlib.contextmanager
def _as_flag(flag: str, argument: str) -> Iterator[None]:
    """Name the library's ``argument`` by its command-line ``flag`` in a :class:`UsageError` raised inside."""
    try:
        yield
    except UsageError as error:
        text = str(error)
        if text.startswith(argument) and text[len(argument):len(argument) + 1] in (":", " "):
            raise UsageError(flag + text[len(argument):]) from None
        raise UsageError(f"{flag}: {text}") from None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


class _OneLineGroup(click.Group):
    """Click's own usage errors (a bad option value, a missing argument) as one line too, exit status 2."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            # click's overloads of main cannot see standalone_mode through *args
            return super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else "simfluence"
            click.echo(f"error: {error.format_message()} (see '{command} --help')", err=True)
            sys.exit(2)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="simfluence")
def main() -> None:
    """Training data attribution by simulating training runs."""


@main.command()
@click.argument("runs", type=click.Path(exists=True))
@click.option("--method", type=_SimulatorChoice(), default="auto", show_default=True,
              help="auto: the family with the least cross-validated error on the fitting runs. Kinds that read "
                   "the task (gradient kinds, featurized, gptfluence, hybrid) take it (model, data) from the "
                   "runs' meta.")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Model file (.npz) to write.")
@click.option("--ridge", type=click.FloatRange(min=0), default=None,
              help="Ridge strength; default: chosen by cross-validation.")
@click.option("--cv-folds", type=CV_FOLDS, default=3, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device for fitting, e.g. cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="Default: float32.")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False), default=None,
              help="A run store collected with --checkpoint-steps: tracin-cp reads its checkpoints (default: replay "
                   "a fitting run); gradient-trajectory adds TRAK's scores of the fitting runs' final weights there "
                   "as a second prior.")
@click.option("--json", "as_json", is_flag=True, help="Print every fit detail as one JSON object instead.")
@_user_errors
def fit(runs: str, method: str, out: str, ridge: float | None, cv_folds: int, device: str, dtype: str,
        checkpoints: str | None, as_json: bool) -> None:
    """Fit a simulator on RUNS (a run store directory or an interchange .npz)."""
    from simfluence.func.devices import check_device
    from simfluence.simulators import capabilities, make_simulator, simulator_kinds

    check_device(device, "--device")
    _check_out(out)
    run_set = load_runs(runs)
    declared = capabilities(method)
    if checkpoints and not declared.checkpoints:
        raise UsageError(f"--checkpoints: '{method}' reads no checkpoints; "
                         f"{', '.join(simulator_kinds(checkpoints=True))} do")
    if ridge is not None and not declared.ridge:
        raise UsageError(f"--ridge: '{method}' has no ridge strength; it applies to "
                         f"{', '.join(simulator_kinds(ridge=True))}")
    params: dict[str, Any] = {}
    if declared.ridge:
        params["ridge"] = ridge
    if declared.cross_validation:
        params["cv_folds"] = cv_folds
    if declared.device:
        params["device"] = device
    if declared.precision and dtype:
        params["dtype"] = dtype
    if declared.checkpoints and checkpoints:
        params["checkpoints"] = checkpoints
    simulator = make_simulator(method, **params).fit(run_set)
    simulator.save(out)
    if as_json:
        click.echo(json.dumps({"method": method, "runs": runs, "num_runs": run_set.num_runs, "out": out,
                               **simulator.fit_info}, default=str))
        return
    table = simulator.fit_info.get("cv_table") if method == "auto" else None
    if table:
        for line in _cv_table_lines(table, simulator.fit_info):
            click.echo(line)
    click.echo(f"fitted {method} on {run_set.num_runs} runs of {run_set.num_steps} steps "
               f"({run_set.num_train} training, {run_set.num_test} test examples){_fit_summary(simulator.fit_info)}")
    click.echo(f"wrote {out}  (details: --json)")


def _cv_table_lines(table: list[dict], info: dict) -> list[str]:
    """``auto``'s cross-validation table as a person reads it: scored candidates by error, then skipped ones."""
    lines = ["cross-validation on the fitting runs (errors: lower is better; across-run Spearman: higher):",
             f"  {'method':<20} {'all-steps MSE':>13} {'final MSE':>10} {'across-run':>10}"]
    for row in sorted((row for row in table if row["cv_mse"] is not None), key=lambda row: row["cv_mse"]):
        final, ranking = row.get("cv_final_mse"), row.get("cv_spearman")
        lines.append(f"  {row['method']:<20} {row['cv_mse']:>13.4g} {'' if final is None else f'{final:.4g}':>10} "
                     f"{'n/a' if ranking is None else f'{ranking:.3f}':>10}")
    lines += [f"  {row['method']:<20} skipped: {row.get('skipped', 'not fitted')}" for row in table
              if row["cv_mse"] is None]
    chosen, least = info["chosen"], info.get("least_error", info["chosen"])
    lines.append(f"chose {chosen}" + ("" if chosen == least else
                                      f" (ranks runs best within one standard error of {least}'s errors)"))
    return lines


_SUMMARY_KEYS = (("ridge", "ridge {:.3g}"), ("scale", "scale {:.3g}"), ("space", "{} space"),
                 ("seconds", "{:.1f} s"))


def _fit_summary(info: dict) -> str:
    """``; ridge 0.5, 1.2 s``: the few fit details a person reads; the rest is behind ``--json``."""
    parts = []
    for key, template in _SUMMARY_KEYS:
        value = info.get(key)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            parts.append(template.format(value))
    return "; " + ", ".join(parts) if parts else ""


def _check_out(out: str) -> None:
    """Fail before the work, not after it, when ``--out`` cannot be written.

    Missing or read-only directory, a directory in its place: one line naming the path and the fix.
    """
    from simfluence.runs.atomic import check_writable

    try:
        check_writable(out)
    except SimfluenceError as error:
        raise UsageError(f"--out: {error}") from None


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
@click.argument("curricula", type=click.Path(exists=True))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Trajectories file (.npz).")
@click.option("--interval", type=float, default=None,
              help="Also write prediction intervals at this level, e.g. 0.9 (linear-bootstrap models).")
@_user_errors
def simulate(model: str, curricula: str, out: str, interval: float | None) -> None:
    """Simulate trajectories for CURRICULA.

    CURRICULA is runs (a store or an interchange .npz: every run's curriculum from its own losses
    before training), an .npz with ``curricula`` int [R, T, B] and ``initial_losses`` float [R, M],
    or one curriculum (``curriculum`` [T, B], ``initial_losses`` [M], as ``optimize --out`` writes).
    Writes ``trajectories`` float32 [R, T + 1, M] and ``test_ids``; with ``--interval``, also
    ``lower`` and ``upper`` of the same shape.
    """
    from simfluence.query import load_query_curriculum
    from simfluence.simulators import Simulator

    simulator = Simulator.load(model)
    arrays = read_npz_arrays(curricula, ()) if Path(curricula).is_file() else {}
    if "curricula" in arrays and "losses" not in arrays:  # curricula with their own starting losses
        if "initial_losses" not in arrays:
            raise RunDataError(curricula, "initial_losses", "is missing",
                               "add the losses before training, [runs, test]")
        steps, initial = arrays["curricula"], arrays["initial_losses"]
    elif "curriculum" in arrays:                      # one curriculum (optimize --out)
        curriculum, losses = load_query_curriculum(curricula, simulator)
        steps, initial = curriculum[None], losses[None]
    else:                                             # runs: a store or an interchange file
        runs = load_runs(curricula)
        simulator.check_compatible(runs, curricula)
        steps, initial = runs.curricula, runs.initial_losses
    bands = {}
    if interval is None:
        trajectories = simulator.simulate(steps, initial, source=curricula)
    elif not simulator.capabilities.intervals:
        raise UsageError(f"--interval: {model} is a '{simulator.kind}' model, which has no intervals "
                         "(fit one with --method linear-bootstrap)")
    else:
        bands["lower"], trajectories, bands["upper"] = simulator.simulate_interval(
            steps, initial, level=interval, source=curricula)
    with atomic_path(out, suffix=".npz") as temporary:
        # numpy's stubs let ``**bands`` fill ``allow_pickle`` (a bool): a false alarm
        np.savez(temporary, trajectories=trajectories, test_ids=simulator.test_ids.astype(str),
                 **bands)  # type: ignore[arg-type]
    arrays_written = ", ".join(["trajectories", *bands])
    click.echo(f"wrote {out}: {arrays_written}, each {trajectories.shape} [runs, steps + 1, test examples], "
               "and test_ids")


@main.command()
@click.argument("runs", type=click.Path(exists=True))
@click.option("--heldout", type=POSITIVE, required=True, help="Number of held-out runs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write NAME-train.npz and NAME-heldout.npz (default: beside RUNS).")
@_user_errors
def split(runs: str, heldout: int, seed: int, out_dir: str | None) -> None:
    """Split RUNS at random into fitting and held-out interchange files."""
    from simfluence.evaluate import split_runs

    path = Path(runs)
    with _as_flag("--heldout", "num_heldout"):
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
        raise UsageError(f"{option}: expected comma-separated integers, got '{text}'") from None


def _task_options(options: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs; values are JSON where they parse (numbers, lists), else strings."""
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise UsageError(f"--option: expected KEY=VALUE, got '{option}'")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--split", "which", type=click.Choice(["train", "test"]), default="test", show_default=True,
              help="Training or test examples.")
@click.option("--head", type=NON_NEGATIVE, default=20, show_default=True, help="Ids to list (0: all).")
@_user_errors
def ids(source: str, which: str, head: int) -> None:
    """List the example ids of a saved simulator or of runs (store or .npz), one per line with its index.

    Queries (``attribute``, ``whatif``, ``optimize``, ``influence-over-time``, ``report --test``)
    take these ids.
    """
    from simfluence.simulators import Simulator

    if Path(source).is_file() and _is_simulator(source):
        names = getattr(Simulator.load(source), f"{which}_ids")
    else:
        names = getattr(load_runs(source), f"{which}_ids")
    shown = names if head == 0 else names[:head]
    for index, name in enumerate(shown):
        click.echo(f"{index:>6}  {name}")
    if len(shown) < len(names):
        click.echo(f"... {len(names) - len(shown)} more {which} ids (--head 0 lists all)")


def _is_simulator(path: str) -> bool:
    """Whether ``path`` is a saved simulator (an .npz with a ``config`` member), not an interchange file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return "config.npy" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


@main.command()
def tasks() -> None:
    """List the built-in tasks."""
    from simfluence.tasks import list_tasks

    for info in list_tasks():
        click.echo(f"{info.name:<16} {info.description}")
        click.echo(f"{'':<16} data: {info.source}")
        needs = f"pip install 'simfluence[{','.join(info.extras)}]'" if info.extras else "the base install only"
        click.echo(f"{'':<16} needs: {needs}")


@main.command()
@click.argument("task")
@click.option("--runs", "num_runs", type=POSITIVE, required=True, help="Runs the store should hold.")
@click.option("--steps", "num_steps", type=POSITIVE, required=True, help="Optimizer steps per run.")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Run store directory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (with --executor ray).")
@click.option("--workers", type=POSITIVE, default=1, show_default=True, help="Worker processes (or Ray tasks at once).")
@click.option("--eval-every", type=POSITIVE, default=1, show_default=True, help="Record test losses every k steps.")
@click.option("--checkpoint-steps", default=None,
              help="Comma-separated steps after which to keep every run's weights (0: the start), for tracin-cp.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Task setting, e.g. lr_schedule=cosine, warmup_steps=10, learning_rate=0.05 (repeatable).")
@click.option("--device", default=None,
              help="Where to train, for tasks trained by the Hugging Face Trainer (minilm-finetune): cpu or cuda.")
@click.option("--chunk-size", type=POSITIVE, default=None,
              help="Runs per chunk of work (default: the runs spread evenly over the workers, at most 64).")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="Torch threads per worker.")
@click.option("--no-vectorize", is_flag=True,
              help="Train a chunk's runs one by one (the reference loop) instead of at once with torch.func.vmap.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def collect(task: str, num_runs: int, num_steps: int, out: str, seed: int, executor: str, address: str | None,
            workers: int, eval_every: int, checkpoint_steps: str | None, options: tuple[str, ...],
            device: str | None, chunk_size: int | None, threads: int, no_vectorize: bool, quiet: bool) -> None:
    """Collect real training runs of TASK on random curricula into a run store (resumable)."""
    from simfluence.collect import collect as collect_runs
    from simfluence.tasks import get_task

    task_options = _task_options(options)
    if device is not None:
        if get_task(task).runner != "trainer":
            raise UsageError(f"--device: task '{task}' trains on the CPU with the vectorised trainer; --device is for "
                             "tasks trained by the Hugging Face Trainer (minilm-finetune)")
        task_options["device"] = device
    eval_steps = None if eval_every == 1 else sorted(set(range(0, num_steps + 1, eval_every)) | {num_steps})
    steps = _integers(checkpoint_steps, "--checkpoint-steps") if checkpoint_steps else None
    store = collect_runs(get_task(task, **task_options), out, num_runs, num_steps, seed,
                         eval_steps=eval_steps, workers=workers, executor=executor, address=address,
                         vectorize=not no_vectorize, chunk_size=chunk_size, threads=threads,
                         checkpoint_steps=steps, progress=not quiet)
    click.echo(f"{store!r}")


@main.command()
@click.argument("task")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: out/benchmark-TASK).")
@click.option("--quick", is_flag=True, help="Small sizes for a smoke run (CI): 24 runs of 50 steps, 6 held out.")
@click.option("--runs", "num_runs", type=POSITIVE, default=None,
              help="Runs to collect (reused if the store already holds them). [48; --quick 24]")
@click.option("--steps", "num_steps", type=POSITIVE, default=None, help="Steps per run. [100; --quick 50]")
@click.option("--heldout", "num_heldout", type=POSITIVE, default=None,
              help="Runs held out for scoring; the rest are fitting runs. [8; --quick 6]")
@click.option("--seed", type=int, default=0, show_default=True, help="Collection and split seed.")
@click.option("--workers", type=POSITIVE, default=1, show_default=True, help="Processes collecting runs.")
@click.option("--methods", default=None,
              help="Comma-separated subset of methods (default: all). The slow ones to leave out first: "
                   "linear-pairwise (L-BFGS refits), linear-bootstrap (16 refits), auto and linear-trajectory "
                   "(cross-validated grids), influence (Hessian).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record (benchmark.json) instead of the tables.")
@_user_errors
def benchmark(task: str, out: str | None, quick: bool, num_runs: int | None, num_steps: int | None,
              num_heldout: int | None, seed: int, workers: int, methods: str | None, as_json: bool) -> None:
    """Fit and score every method on held-out runs of TASK; writes benchmark.md/.json and a plot."""
    from simfluence.benchmark import BenchmarkConfig, benchmark_markdown, run_benchmark

    overrides: dict[str, Any] = {key: value for key, value in (("num_runs", num_runs), ("num_steps", num_steps),
                                                               ("num_heldout", num_heldout)) if value is not None}
    if methods:
        overrides["methods"] = tuple(method.strip() for method in methods.split(","))
    overrides.update(task=task, out_dir=out or f"out/benchmark-{task}", seed=seed, workers=workers)
    config = BenchmarkConfig.quick(**overrides) if quick else BenchmarkConfig(**overrides)
    result = run_benchmark(config, progress=not as_json)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(benchmark_markdown(result))
    click.echo(f"wrote {config.out_dir}/benchmark.md, benchmark.json, trajectories.png")


_FRACTION = click.FloatRange(min=0, max=1, min_open=True, max_open=True)


@main.command()
@click.argument("task")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: out/lds-TASK).")
@click.option("--quick", is_flag=True, help="Small sizes for a smoke run (CI): 16 runs, 20 subsets, 20 removals.")
@click.option("--runs", "num_runs", type=POSITIVE, default=None,
              help="Fitting runs of the simulators, also TRAK's number of models (equal budgets). [48]")
@click.option("--steps", "num_steps", type=POSITIVE, default=None, help="Steps per training run. [100]")
@click.option("--subsets", "num_subsets", type=click.IntRange(min=3), default=None,
              help="Random training subsets, each retrained for real. [50]")
@click.option("--fraction", type=_FRACTION, default=None, help="Share of the pool in each subset (alpha). [0.5]")
@click.option("--removals", "num_removals", type=click.IntRange(min=3), default=None,
              help="Removal sets per removal protocol. [50]")
@click.option("--removal-fractions", default=None,
              help="Comma-separated fractions of the pool removed per set, besides single examples. [0.01,0.05,0.1]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=POSITIVE, default=1, show_default=True,
              help="Processes collecting runs and, for Trainer tasks (minilm-finetune), retraining them.")
@click.option("--methods", default=None,
              help="Comma-separated methods: simulator kinds, peers (trak, ekfac, tracin; need the 'peers' extra), "
                   "metagradient and gradient-trajectory+trak (TRAK's scores of the fitting runs as a second prior; "
                   "the 'peers' extra). [linear-trajectory, linear, additive, featurized, hybrid, tracin-cp, trak, "
                   "ekfac, tracin, metagradient]; Trainer tasks: the peers, metagradient (through the Trainer's "
                   "AdamW) and the kinds that need no SGD replay (e.g. auto, linear-trajectory, linear-identity).")
@click.option("--trak-models", type=POSITIVE, default=None,
              help="TRAK's ensemble: the final weights of this many fitting runs. [all --runs]")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Keep the retrained counterfactuals in the on-disk cache ($SIMFLUENCE_CACHE) and reuse them "
                   "when the same ones come again (e.g. the same command with other --methods).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record (lds.json) instead of the table.")
@_user_errors
def lds(task: str, out: str | None, quick: bool, num_runs: int | None, num_steps: int | None,
        num_subsets: int | None, fraction: float | None, num_removals: int | None, removal_fractions: str | None,
        seed: int, workers: int, methods: str | None, trak_models: int | None, cache: bool, as_json: bool) -> None:
    """Linear datamodeling score of simulators, peers and metagradients on TASK against real retraining.

    Two protocols: random subsets of the training pool retrained from scratch, and removals
    of random examples from one reference run. Writes lds.md/.json and lds.png.
    """
    from simfluence.lds_benchmark import LDSConfig, lds_markdown, run_lds

    overrides: dict[str, Any] = {key: value for key, value in (("num_runs", num_runs), ("num_steps", num_steps),
                                                               ("num_subsets", num_subsets), ("fraction", fraction),
                                                               ("num_removals", num_removals),
                                                               ("trak_models", trak_models)) if value is not None}
    if methods:
        overrides["methods"] = tuple(method.strip() for method in methods.split(",") if method.strip())
    if removal_fractions:
        try:
            overrides["removal_fractions"] = tuple(float(part) for part in removal_fractions.split(",") if part.strip())
        except ValueError:
            raise UsageError(f"--removal-fractions: expected comma-separated numbers, got '{removal_fractions}'") \
                from None
    overrides.update(task=task, out_dir=out or f"out/lds-{task}", seed=seed, workers=workers, cache=cache)
    config = LDSConfig.quick(**overrides) if quick else LDSConfig(**overrides)
    config.validate()
    result = run_lds(config, progress=sys.stderr.isatty() and not as_json)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(lds_markdown(result))
    click.echo(f"wrote {config.out_dir}/lds.md, lds.json, lds.png")


# --- counterfactual queries (simfluence.query) -------------------------------------------
_CURRICULUM_HELP = ("Runs (store or interchange .npz: run --run N's curriculum and losses before training) or an "
                    ".npz with curriculum [T, B] and initial_losses [M] (e.g. from `optimize --out`).")


def _query_inputs(model: str, curriculum: str, run: int | None):
    from simfluence.query import load_query_curriculum
    from simfluence.simulators import Simulator

    simulator = Simulator.load(model)
    with _as_flag("--run", "run"):
        return (simulator, *load_query_curriculum(curriculum, simulator, run))


def _test_index(simulator, ids: tuple[str, ...], option: str = "--test"):
    """Indices of the test ids given (by id or index; comma lists allowed), or None for all."""
    from simfluence.query import resolve_id

    names = [name for text in ids for name in text.split(",") if name]
    if not names:
        return None
    return np.array([resolve_id(name, simulator.test_ids, option, "test") for name in names])


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--curriculum", "curriculum", type=click.Path(exists=True), required=True, help=_CURRICULUM_HELP)
@click.option("--run", type=NON_NEGATIVE, default=None, help="Run of a run file to query (default 0).")
@click.option("--test", "tests", multiple=True, help="Test id or index (repeatable; default all, averaged).")
@click.option("--group", "groups", multiple=True, help="NAME=id,id,...: remove the group at once (repeatable).")
@click.option("--top", type=POSITIVE, default=10, show_default=True, help="Examples listed per side.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_user_errors
def attribute(model: str, curriculum: str, run: int | None, tests: tuple[str, ...], groups: tuple[str, ...],
              top: int, as_json: bool) -> None:
    """Leave-one-out (or leave-group-out) effects on the final test loss, simulated by MODEL.

    delta = loss without the example(s) - loss with them: positive means they helped.
    """
    from simfluence.query import leave_group_out, leave_one_out, resolve_id

    simulator, steps, initial = _query_inputs(model, curriculum, run)
    test_index = _test_index(simulator, tests)
    train_ids = simulator.train_ids
    if groups:
        parsed = {}
        for text in groups:
            name, equals, members = text.partition("=")
            if not equals or not name or not members:
                raise UsageError(f"--group {text!r}: expected NAME=id,id,... (training ids or indices)")
            parsed[name] = [resolve_id(member, train_ids, f"--group {name}") for member in members.split(",")]
        grouped = leave_group_out(simulator, steps, initial, parsed, test_index)
        rows = [{"group": name, "size": int(members.size), "final_delta": grouped.final_delta[g].tolist(),
                 "final_sum_of_singles": grouped.final_sum[g].tolist(),
                 "final_interaction": grouped.final_interaction[g].tolist(),
                 "mean_delta": grouped.mean_delta[g].tolist(), "mean_interaction": grouped.mean_interaction[g].tolist()}
                for g, (name, members) in enumerate(zip(grouped.names, grouped.members))]
        if as_json:
            click.echo(json.dumps({"test_ids": simulator.test_ids[grouped.test_index].tolist(), "groups": rows}))
            return
        click.echo(f"{'group':<16} {'size':>4} {'final delta':>12} {'sum of singles':>15} {'interaction':>12}"
                   "   (mean over the selected test examples)")
        for g, row in enumerate(rows):
            click.echo(f"{row['group']:<16} {row['size']:>4} {grouped.final_delta[g].mean():>+12.3g} "
                       f"{grouped.final_sum[g].mean():>+15.3g} {grouped.final_interaction[g].mean():>+12.2e}")
        return
    result = leave_one_out(simulator, steps, initial, test_index, progress=not as_json)

    def listing(pairs):
        return [{"train_id": str(train_ids[i]), "index": i,
                 "occurrences": int(result.occurrences[np.searchsorted(result.train_index, i)]),
                 "final_delta": score,
                 "mean_delta": float(result.mean_delta[np.searchsorted(result.train_index, i)].mean())}
                for i, score in pairs]

    helpful, harmful = listing(result.top_helpful(top)), listing(result.top_harmful(top))
    if as_json:
        click.echo(json.dumps({"test_ids": simulator.test_ids[result.test_index].tolist(),
                               "baseline_final": result.baseline[-1].tolist(), "helpful": helpful,
                               "harmful": harmful}))
        return
    click.echo(f"{result.train_index.size} training examples in the curriculum; delta = final loss without - with, "
               f"mean over {result.test_index.size} test example(s); positive: the example helped")
    for title, rows in (("most helpful", helpful), ("most harmful", harmful)):
        click.echo(f"\n{title}:\n{'train id':<20} {'times':>5} {'final delta':>12} {'mean delta':>11}")
        for row in rows:
            click.echo(f"{row['train_id']:<20} {row['occurrences']:>5} {row['final_delta']:>+12.3g} "
                       f"{row['mean_delta']:>+11.3g}")


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--curriculum", "curriculum", type=click.Path(exists=True), required=True, help=_CURRICULUM_HELP)
@click.option("--run", type=NON_NEGATIVE, default=None, help="Run of a run file to edit (default 0).")
@click.option("--edit", "edits", multiple=True, required=True,
              help="drop:ID, insert:ID@STEP, duplicate:ID, shuffle:SEED, swap:S,S, move:FROM,TO (repeatable, "
                   "applied in order; steps count from 1).")
@click.option("--test", "tests", multiple=True, help="Test ids to show (default: the 5 that change most).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write before/after trajectories (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
@_user_errors
def whatif(model: str, curriculum: str, run: int | None, edits: tuple[str, ...], tests: tuple[str, ...],
           plot: str | None, as_json: bool) -> None:
    """Simulate a curriculum before and after edits."""
    from simfluence.query import whatif as simulate_whatif

    simulator, steps, initial = _query_inputs(model, curriculum, run)
    test_index = _test_index(simulator, tests)
    with _as_flag("--edit", "edit"):
        result = simulate_whatif(simulator, steps, initial, list(edits), test_index)
    columns = np.arange(result.test_index.size) if test_index is not None else \
        np.argsort(-np.abs(result.final_change), kind="stable")[:5]
    num_steps = result.before.shape[0] - 1
    shown = np.unique(np.linspace(0, num_steps, 6).round().astype(int))
    plotted = None
    if plot:
        from simfluence.report.static import plot_whatif

        plotted = str(plot_whatif(result, simulator.test_ids, plot, columns, simulator.train_ids))
    if as_json:
        click.echo(json.dumps({"edits": list(edits), "plot": plotted, "tests": [
            {"test_id": str(simulator.test_ids[result.test_index[c]]), "before": result.before[:, c].tolist(),
             "after": result.after[:, c].tolist(), "final_change": float(result.final_change[c])}
            for c in columns]}))
        return
    click.echo(f"edits: {', '.join(edits)}")
    for column in columns:
        click.echo(f"\n{simulator.test_ids[result.test_index[column]]}\n{'step':>6} {'before':>9} {'after':>9} "
                   f"{'change':>9}")
        for t in shown:
            before, after = result.before[t, column], result.after[t, column]
            click.echo(f"{t:>6} {before:>9.4g} {after:>9.4g} {after - before:>+9.3g}")
    if plotted:
        click.echo(f"\nwrote {plotted}")


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--test-set", "test_set", multiple=True, required=True,
              help="Target test ids or indices, comma-separated (repeatable).")
@click.option("--budget", type=POSITIVE, required=True, help="Distinct training examples K.")
@click.option("--steps", "num_steps", type=POSITIVE, required=True, help="Steps T of the curriculum.")
@click.option("--batch-size", type=POSITIVE, default=None, help="Examples per step (default: the fitting runs').")
@click.option("--initial", "initial", type=click.Path(exists=True), required=True,
              help="Where the losses before training come from: " + _CURRICULUM_HELP)
@click.option("--run", type=NON_NEGATIVE, default=None, help="Run of a run file whose losses before training to use.")
@click.option("--beam", type=POSITIVE, default=4, show_default=True, help="Beam width of the growth search.")
@click.option("--rounds", type=NON_NEGATIVE, default=20, show_default=True, help="Local-search rounds.")
@click.option("--random", "num_random", type=NON_NEGATIVE, default=200, show_default=True, help="Random curricula.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None, help="Curriculum file (.npz) to write.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the random-vs-optimised PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
@_user_errors
def optimize(model: str, test_set: tuple[str, ...], budget: int, num_steps: int, batch_size: int | None,
             initial: str, run: int | None, beam: int, rounds: int, num_random: int, seed: int, out: str | None,
             plot: str | None, as_json: bool) -> None:
    """Search a curriculum of BUDGET examples that minimises the simulated final loss on the test set."""
    from simfluence.query import optimize as search
    from simfluence.query import save_query_curriculum

    simulator, _, losses = _query_inputs(model, initial, run)
    targets = _test_index(simulator, test_set, "--test-set")
    with _as_flag("--budget", "budget"):
        result = search(simulator, losses, targets, budget, num_steps, batch_size, beam_width=beam, rounds=rounds,
                        num_random=num_random, seed=seed, progress=True)
    written = []
    if out:
        save_query_curriculum(out, result.curriculum, losses, simulator, order=result.order,
                              target_index=result.target_index, objective=np.float64(result.objective),
                              random_objectives=result.random_objectives)
        written.append(f"wrote {out}: curriculum {result.curriculum.shape}")
    if plot:
        from simfluence.report.static import plot_optimized

        written.append(f"wrote {plot_optimized(result, plot)}")
    if as_json:
        click.echo(json.dumps({"targets": simulator.test_ids[targets].tolist(),
                               "order": simulator.train_ids[result.order].tolist(), "objective": result.objective,
                               "random_best": result.random_best, "random_median": result.random_median,
                               "num_random": num_random, "out": out, "plot": plot}))
        return
    click.echo(f"targets: {', '.join(simulator.test_ids[targets])}")
    click.echo(f"order: {', '.join(simulator.train_ids[result.order])}")
    click.echo(f"simulated mean final loss: optimised {result.objective:.4f}, random curricula of the same budget "
               f"best {result.random_best:.4f}, median {result.random_median:.4f} ({num_random} curricula)")
    if result.objective < 0:
        click.echo("note: a negative simulated loss is the simulator extrapolating beyond its fitting runs; "
                   "trust the ranking, and retrain to check (simfluence.retrain)")
    for line in written:
        click.echo(line)


@main.command("influence-over-time")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--curriculum", "curriculum", type=click.Path(exists=True), required=True, help=_CURRICULUM_HELP)
@click.option("--run", type=NON_NEGATIVE, default=None, help="Run of a run file to query (default 0).")
@click.option("--test", "tests", multiple=True, required=True, help="Test id or index (repeatable: averaged).")
@click.option("--top", type=POSITIVE, default=10, show_default=True, help="Moments listed.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the steps x examples heat map.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
@_user_errors
def influence_over_time(model: str, curriculum: str, run: int | None, tests: tuple[str, ...], top: int,
                        plot: str | None, as_json: bool) -> None:
    """Effect on the final loss of each single occurrence (step, example) of the curriculum."""
    from simfluence.query import influence_over_time as occurrences

    simulator, steps, initial = _query_inputs(model, curriculum, run)
    result = occurrences(simulator, steps, initial, _test_index(simulator, tests), progress=True)
    plotted = None
    if plot:
        from simfluence.report.static import plot_influence_over_time

        plotted = str(plot_influence_over_time(result, simulator.train_ids, plot))
    if as_json:
        click.echo(json.dumps({"plot": plotted, "moments": [
            {"step": int(step), "train_id": str(simulator.train_ids[example]), "final_delta": float(delta)}
            for step, example, delta in result.top_moments(top)]}))
        return
    click.echo(f"{'step':>6} {'train id':<20} {'final delta':>12}   (without - with; positive: that appearance helped)")
    for step, example, delta in result.top_moments(top):
        click.echo(f"{step:>6} {simulator.train_ids[example]:<20} {delta:>+12.3g}")
    if plotted:
        click.echo(f"wrote {plotted}")


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("heldout", type=click.Path(exists=True))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="HTML file to write.")
@click.option("--test", "tests", multiple=True,
              help="Test id or index to show in detail (repeatable); default: 4 spread over difficulty.")
@click.option("--task-data/--no-task-data", default=True, show_default=True,
              help="Show examples' text or images from the task named in the runs (else ids only).")
@click.option("--runs", "num_runs", type=POSITIVE, default=3, show_default=True, help="Held-out runs plotted.")
@click.option("--top", type=POSITIVE, default=5, show_default=True, help="Helpful and harmful examples listed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def report(model: str, heldout: str, out: str, tests: tuple[str, ...], task_data: bool, num_runs: int, top: int,
           quiet: bool) -> None:
    """Write a self-contained HTML report of MODEL on HELDOUT runs: metrics, trajectories, influence."""
    from simfluence.report import write_report
    from simfluence.simulators import Simulator

    simulator = Simulator.load(model)
    chosen = _test_index(simulator, tests)
    try:
        path = write_report(simulator, load_runs(heldout), out, test_ids=None if chosen is None else
                            simulator.test_ids[chosen].tolist(), num_runs=num_runs, top=top,
                            use_task_data=task_data, source=heldout, progress=not quiet)
    except ImportError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
