"""The field's yardstick as one call: LDS of simulators, peers and metagradients on the same retrainings.

:func:`run_lds` collects (or reuses) ``num_runs`` fitting runs of a task (keeping every
run's final weights, which TRAK ensembles over: equal budgets), fits the simulators,
computes the peers' scores and the reference run's metagradients, retrains the
counterfactuals of both protocols of :mod:`simfluence.lds` for real, and writes

* ``lds.json``: every method's LDS per protocol (mean, bootstrap interval, per-example
  values), its cost in training-run equivalents and seconds, the noise ceiling, and for
  simulators the trajectory errors on the retrained subset runs beside the mean trajectory;
* ``lds.md``: the same as a Markdown table, and the best simfluence method of each protocol
  against each peer, paired over test examples (:func:`peer_comparisons`);
* ``lds.png``: a bar chart with the bootstrap intervals.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from simfluence.collect.curricula import derive_seed, pool_sampler
from simfluence.errors import UsageError
from simfluence.lds import (
    SUBSETS,
    Counterfactuals,
    Method,
    OccurrenceMethod,
    ScoreMethod,
    SimulatorMethod,
    bootstrap_mean,
    paired_difference,
    removal_counterfactuals,
    score_method,
    subset_counterfactuals,
)
from simfluence.peers import PEERS as PEER_CLASSES
from simfluence.runs.atomic import write_text_atomic
from simfluence.runs.log import RunSet
from simfluence.simulators import capabilities, make_simulator, simulator_kinds

SIMULATORS = tuple(simulator_kinds(attribution=True))
"""The simulators that attribute (every registered kind but the baselines)."""
PEERS = tuple(PEER_CLASSES)
METAGRADIENT = "metagradient"
TRAK_HYBRID = "gradient-trajectory+trak"
"""``gradient-trajectory`` with TRAK's scores of the fitting runs' final weights as a second prior
(its ``checkpoints`` setting): the simulator and TRAK at the same training budget, in one model."""
ALL_METHODS = SIMULATORS + PEERS + (METAGRADIENT, TRAK_HYBRID)
DEFAULT_METHODS = ("linear-trajectory", "linear", "additive", "featurized", "hybrid", "tracin-cp", "trak", "ekfac",
                   "tracin", METAGRADIENT)
CORE_METHODS = ("linear-trajectory", "linear", "additive", "featurized", "hybrid", "tracin-cp", METAGRADIENT)
"""Methods without the ``peers`` extra."""


@dataclass
class LDSConfig:
    """Settings of one LDS comparison; :meth:`quick` shrinks it for a smoke run (CI).

    Attributes:
        num_runs: fitting runs of the simulators, and TRAK's ensemble size (equal budgets).
        num_subsets / fraction / draws: the subset protocol (``m``, ``alpha``, curricula a
            simulator without a closed-form expected rollout averages over per subset: its
            estimate of the subset's expected loss; the kinds with one (``expected_rollout``)
            use the exact expectation, on digits-mlp +0.03 LDS over 16 draws).
        removal_fractions: fractions of the reference run's examples removed per set; a
            ``single`` protocol (one example per set) is added with ``single=True``.
        num_removals: sets per removal protocol.
        trak_models: TRAK's ensemble: the final weights of the first this many fitting runs
            (``None``: all ``num_runs``, equal budgets; fewer for big models, where each costs
            about a minute of projection on the CPU).
        cache: keep the retrained counterfactuals in the on-disk cache (``$SIMFLUENCE_CACHE``)
            and reuse them when the same counterfactuals of the same task come again (e.g. the
            same command with other methods); their training seconds are the original ones.
    """

    task: str = "digits-mlp"
    out_dir: str = "lds"
    num_runs: int = 48
    num_steps: int = 100
    num_subsets: int = 50
    fraction: float = 0.5
    draws: int = 16
    removal_fractions: tuple[float, ...] = (0.01, 0.05, 0.10)
    single: bool = True
    num_removals: int = 50
    methods: tuple[str, ...] = DEFAULT_METHODS
    bootstrap: int = 1000
    seed: int = 0
    workers: int = 1
    task_options: dict[str, Any] = field(default_factory=dict)
    trak_models: int | None = None
    cache: bool = True

    @classmethod
    def quick(cls, **overrides) -> LDSConfig:
        """A small configuration for a smoke run (CI); ``overrides`` replace any field."""
        return cls(**{"num_runs": 16, "num_steps": 50, "num_subsets": 20, "draws": 4, "num_removals": 20,
                      "bootstrap": 200, **overrides})

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first field that is out of range."""
        unknown = sorted(set(self.methods) - set(ALL_METHODS))
        if unknown:
            raise UsageError(f"methods: unknown {unknown}; choose from {list(ALL_METHODS)}")
        for name in ("num_runs", "num_steps", "draws", "bootstrap"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise UsageError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_subsets", "num_removals"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 3:
                raise UsageError(f"{name}: must be an integer >= 3 (a rank correlation needs 3)")
        if self.trak_models is not None and not 1 <= self.trak_models <= self.num_runs:
            raise UsageError(f"trak_models: must lie in 1..num_runs ({self.num_runs}), got {self.trak_models!r}")
        if not 0 < self.fraction < 1 or not all(0 < f < 1 for f in self.removal_fractions):
            raise UsageError("fraction / removal_fractions: must lie strictly between 0 and 1")


def _fit_simulators(config: LDSConfig, task, runs: RunSet, store_path: Path, progress: bool) -> list[Method]:
    methods: list[Method] = []
    for name in (name for name in config.methods if name in SIMULATORS or name == TRAK_HYBRID):
        kind = "gradient-trajectory" if name == TRAK_HYBRID else name
        declared = capabilities(kind)
        # The TRAK hybrid reads the final weights the collection kept (equal budgets, as TRAK).
        settings = {"checkpoints": str(store_path)} if name == TRAK_HYBRID else {}
        simulator = make_simulator(kind, task=task, **settings) if declared.task != "none" else make_simulator(kind)
        # Equal budgets: a gradient method reads checkpoints of `replay_runs` training runs, not the logged runs.
        consumed = runs.num_runs if declared.replay_runs is None else declared.replay_runs
        start = time.perf_counter()
        simulator.fit(runs)
        seconds = time.perf_counter() - start
        methods.append(SimulatorMethod(name, simulator, consumed, seconds))
        if progress:
            print(f"  fitted {name:<18} {seconds:6.1f} s")
    return methods


def _peer_checkpoints(name: str, task, reference: np.ndarray):
    """What EK-FAC (the reference run's final model) and TracIn-CP (4 checkpoints along it) read.

    TRAK ensembles the fitting runs' final weights instead (:func:`~simfluence.peers.fitting.fitting_run_trak`).
    """
    from simfluence.peers import trajectory_checkpoints

    if name == "ekfac":
        return trajectory_checkpoints(task, reference, [reference.shape[0]])
    return trajectory_checkpoints(task, reference, 4)


def _peer_methods(config: LDSConfig, task, store, runs: RunSet, reference: np.ndarray,
                  progress: bool) -> list[Method]:
    names = [name for name in config.methods if name in PEERS]
    if not names:
        return []
    from simfluence.peers import get_peer, peer_settings
    from simfluence.peers.fitting import fitting_run_trak

    methods: list[Method] = []
    for name in names:
        if name == "trak":   # the fitting runs' ensemble: computed once per machine, shared with the TRAK hybrid
            trak = fitting_run_trak(task, runs, store.root, models=config.trak_models, disk_cache=config.cache,
                                    progress=progress)
            methods.append(ScoreMethod(name, trak.scores, float(trak.models), trak.seconds,
                                       {"settings": trak.settings, "models": trak.models, "cached": trak.cached}))
            if progress:
                took = f"{trak.seconds:6.1f} s" if math.isfinite(trak.seconds) else "   n/a  "
                print(f"  scored {name:<18} {took}{' (cached)' if trak.cached else ''}")
            continue
        settings = peer_settings(name, task)
        result = get_peer(name, **settings).attribute(task, _peer_checkpoints(name, task, reference), progress=progress)
        cost = result.cost
        methods.append(ScoreMethod(name, result.scores, cost.trainings, cost.method_seconds,
                                   {**cost.as_dict(), "settings": settings}))
        if progress:
            print(f"  scored {name:<18} {cost.method_seconds:6.1f} s")
    return methods


def _metagradient_method(task, reference: np.ndarray, progress: bool) -> Method:
    from simfluence.func.metagradients import metagradients

    start = time.perf_counter()
    result = metagradients(task, reference, progress=progress)
    # The replay of the reference run is one training run; the backward pass is its own cost.
    return OccurrenceMethod(METAGRADIENT, result, 1.0, time.perf_counter() - start)


def _trajectory_errors(methods: list[Method], subsets: Counterfactuals, runs: RunSet) -> dict[str, dict]:
    """All-steps and final MSE of each simulator on the retrained subset runs, beside the mean trajectory."""
    from simfluence.query import simulate_curricula

    assert subsets.trajectories is not None   # the subset protocol keeps them
    true = subsets.trajectories.astype(np.float64)                     # [m, T + 1, M]

    def errors(predicted: np.ndarray) -> dict[str, float]:              # [m or 1, T + 1, M]
        return {"mse": float(np.mean((predicted[:, 1:] - true[:, 1:]) ** 2)),
                "final_mse": float(np.mean((predicted[:, -1] - true[:, -1]) ** 2))}

    out = {}
    if runs.every_step:  # the fitting runs' mean trajectory, [1, T + 1, M]
        out["mean-trajectory"] = errors(runs.losses.astype(np.float64).mean(axis=0, keepdims=True))
    for method in methods:
        if isinstance(method, SimulatorMethod):
            out[method.name] = errors(simulate_curricula(method.simulator, subsets.trained, subsets.initial_losses))
    return out


def _check_trainer_methods(task: str, methods: tuple[str, ...]) -> None:
    """Refuse, in one line, methods that cannot run on a Trainer task's runs.

    The peers replay its checkpoints through the Trainer itself and metagradients differentiate
    the Trainer's own AdamW steps; simulator kinds that read the task replay plain SGD.
    """
    from simfluence.benchmark import sgd_replaying

    refused = sgd_replaying(methods)
    if refused:
        excluded = set(sgd_replaying(SIMULATORS))
        allowed = [name for name in SIMULATORS if name not in excluded] + [*PEERS, METAGRADIENT, TRAK_HYBRID]
        raise UsageError(f"methods: task '{task}' trains with AdamW through the Hugging Face Trainer, which "
                         f"{refused} cannot follow (they replay plain SGD steps); choose from {allowed}")


def runnable_methods(task, methods: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """``methods`` that ``task`` can run, and those left out.

    A Trainer task cannot run the simulator kinds that replay plain SGD: the default methods
    leave them out (second value); methods the caller chose are refused in one line instead.
    """
    if task.runner != "trainer":
        return methods, []
    if methods == DEFAULT_METHODS:
        from simfluence.benchmark import sgd_replaying

        left_out = sgd_replaying(methods)
        return tuple(name for name in methods if name not in left_out), left_out
    _check_trainer_methods(task.name, methods)
    return methods, []


def run_lds(config: LDSConfig, progress: bool = True) -> dict:
    """Run the comparison of the module docstring; returns the JSON record."""
    from simfluence.collect import collect
    from simfluence.tasks import get_task

    config.validate()
    out = Path(config.out_dir)
    task = get_task(config.task, **config.task_options)
    trainer = task.runner == "trainer"
    chosen, left_out = runnable_methods(task, config.methods)     # before collecting anything
    config = replace(config, methods=chosen)
    if progress and left_out:
        print(f"  {task.name} trains through the Hugging Face Trainer: leaving out {', '.join(left_out)}")
    # TRAK and the TRAK hybrid read the fitting runs' final weights. A Trainer task's model is big (minilm-finetune:
    # 91 MB a state), so its collection keeps them only when one of them is asked for.
    keep = not trainer or "trak" in config.methods or TRAK_HYBRID in config.methods
    store = collect(task, out / "runs", config.num_runs, config.num_steps, config.seed, workers=config.workers,
                    checkpoint_steps=(config.num_steps,) if keep else (), progress=progress)
    runs = store.load()
    kind = (runs.meta.get("sampler") or {}).get("kind", "uniform")
    pool = task.default_pool()
    reference = pool_sampler(kind, pool, runs.batch_size).sample(config.num_steps, derive_seed(config.seed, 10**6))

    if progress:
        print(f"retraining counterfactuals of {task.name} ({config.num_subsets} subsets, "
              f"{len(config.removal_fractions) + config.single} removal protocols)")
    protocols = [subset_counterfactuals(task, config.num_steps, num_subsets=config.num_subsets,
                                        fraction=config.fraction, draws=config.draws, kind=kind,
                                        batch_size=runs.batch_size, pool=pool, seed=config.seed, progress=progress,
                                        workers=config.workers, cache=config.cache)]
    # Removal sets are fractions of the whole pool (as MAGIC removes from the training set); an
    # example the reference never trains on is among them with its real effect, none.
    sizes = ([1] if config.single else []) + [max(1, round(f * pool.size)) for f in config.removal_fractions]
    for size in dict.fromkeys(sizes):
        protocols.append(removal_counterfactuals(task, reference, size, num_sets=config.num_removals, pool=pool,
                                                 seed=derive_seed(config.seed, size), progress=progress,
                                                 workers=config.workers, cache=config.cache))

    methods = _fit_simulators(config, task, runs, out / "runs", progress)
    methods += _peer_methods(config, task, store, runs, reference, progress)
    if METAGRADIENT in config.methods:
        methods.append(_metagradient_method(task, reference, progress))

    records = [score_method(method, counterfactuals, config.bootstrap, config.seed)
               for counterfactuals in protocols for method in methods]
    ceilings = {c.protocol: bootstrap_mean(c.ceiling(), config.bootstrap, seed=config.seed).as_dict()
                for c in protocols if c.repeat is not None}
    seconds_per_run = protocols[0].train_seconds / (protocols[0].num_sets * (2 if protocols[0].repeat is not None
                                                                              else 1))
    result = {"config": {**asdict(config), "methods": list(config.methods)}, "task": task.name,
              "num_train": task.num_train, "num_test": task.num_test, "num_steps": config.num_steps,
              "removal_sizes": {c.protocol: int(c.masks[0].sum()) for c in protocols[1:]},
              "seconds_per_training_run": seconds_per_run,
              "costs": [method_cost(m.name, m.family, m.training_runs, m.seconds, seconds_per_run)
                        for m in methods],
              "noise_ceiling": ceilings, "scores": records,
              "trajectory_errors": _trajectory_errors(methods, protocols[0], runs)}
    result["paired"] = peer_comparisons(result, config.bootstrap, config.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "lds.json", json.dumps(result, indent=1))
    write_text_atomic(out / "lds.md", lds_markdown(result))
    plot_lds(result, out / "lds.png")
    return result


def peer_comparisons(result: dict, num_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Per protocol, the best simfluence method (by mean LDS) minus each peer, paired over test examples.

    Simfluence methods are the simulators, the TRAK hybrid and metagradients; peers the
    maintained libraries' methods (:data:`PEERS`). Each record: ``protocol``, ``method``,
    ``peer``, the :func:`~simfluence.lds.paired_difference` fields (``mean``, ``low``,
    ``high``, ``count``, ``undefined``) and ``verdict``: ``"above"`` / ``"below"`` when the
    interval excludes 0, else ``"tied"``. The best method is picked on the same test examples,
    so its lead is slightly optimistic when several methods are close.
    """
    records: dict[tuple[str, str], dict] = {(r["method"], r["protocol"]): r for r in result["scores"]}
    comparisons = []
    for protocol in _protocols(result):
        ours = [r for (name, p), r in records.items() if p == protocol and name not in PEERS and r["mean"] is not None]
        peers = [r for (name, p), r in records.items() if p == protocol and name in PEERS]
        if not ours or not peers:
            continue
        best = max(ours, key=lambda r: r["mean"])
        for peer in peers:
            first, second = (np.asarray([math.nan if v is None else v for v in r["per_example"]], dtype=np.float64)
                             for r in (best, peer))
            score = paired_difference(first, second, num_resamples=num_resamples, seed=seed).as_dict()
            verdict = ("tied" if score["low"] is None or score["low"] <= 0 <= score["high"]
                       else "above" if score["low"] > 0 else "below")
            comparisons.append({"protocol": protocol, "method": best["method"], "peer": peer["method"], **score,
                                "verdict": verdict})
    return comparisons


def method_cost(name: str, family: str, training_runs: float, seconds: float, seconds_per_run: float) -> dict:
    """A method's cost record: its training runs, its own seconds and both in training-run equivalents.

    Unknown seconds (NaN: scores read from a cache entry that kept none) are ``None`` (JSON null),
    and so are the run equivalents they would enter.
    """
    known = math.isfinite(seconds)
    return {"method": name, "family": family, "training_runs": training_runs,
            "seconds": seconds if known else None,
            "run_equivalents": training_runs + seconds / seconds_per_run if known else None}


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _protocols(result: dict) -> list[str]:
    return list(dict.fromkeys(record["protocol"] for record in result["scores"]))


def protocol_label(result: dict, protocol: str) -> str:
    """``subsets α=0.5``, ``remove 1``, ``remove 10 (5 %)``: how tables and plots name a protocol."""
    if protocol == SUBSETS:
        return f"subsets α={result['config']['fraction']}"
    size = result["removal_sizes"][protocol]
    return f"remove {size}" if size == 1 else f"remove {size} ({100 * size / result['num_train']:.3g} %)"


def lds_markdown(result: dict) -> str:
    """One row per method: LDS per protocol with its interval, cost, trajectory errors."""
    protocols = _protocols(result)
    by = {(r["method"], r["protocol"]): r for r in result["scores"]}
    header = ["method", *[f"LDS {protocol_label(result, p)}" for p in protocols], "run equivalents", "seconds",
              "subset-run MSE", "final MSE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    trajectory = result["trajectory_errors"]
    for cost in result["costs"]:
        name = cost["method"]
        cells = [name]
        for p in protocols:
            r = by[(name, p)]
            cells.append(f"{_cell(r['mean'], 2)} [{_cell(r['low'], 2)}, {_cell(r['high'], 2)}]")
        errors = trajectory.get(name, {})
        cells += [_cell(cost["run_equivalents"]), _cell(cost["seconds"]), _cell(errors.get("mse")),
                  _cell(errors.get("final_mse"))]
        lines.append("| " + " | ".join(cells) + " |")
    if "mean-trajectory" in trajectory:
        errors = trajectory["mean-trajectory"]
        lines.append("| mean-trajectory (baseline) | " + " | ".join(["n/a"] * len(protocols)) +
                     f" | {result['config']['num_runs']} | 0 | {_cell(errors['mse'])} | {_cell(errors['final_mse'])} |")
    ceiling = result["noise_ceiling"].get(SUBSETS)
    text = [f"# LDS: {result['task']}", "",
            f"{result['num_train']} training and {result['num_test']} test examples, {result['num_steps']} steps; "
            f"{result['config']['num_subsets']} subsets, {result['config']['num_removals']} sets per removal "
            "protocol; mean Spearman over test examples with a 95 % bootstrap interval. "
            f"One training run takes {result['seconds_per_training_run']:.3g} s here; "
            "run equivalents = training runs consumed + own seconds / that.", ""]
    if ceiling:
        text += [f"Noise ceiling of the subset protocol (two curricula per subset): {_cell(ceiling['mean'], 2)} "
                 f"[{_cell(ceiling['low'], 2)}, {_cell(ceiling['high'], 2)}].", ""]
    paired = result.get("paired") or peer_comparisons(result)
    if paired:
        lines += ["", "Best simfluence method of each protocol minus each peer, paired over test examples "
                  "(95 % bootstrap interval; the best is picked on the same examples):", "",
                  "| protocol | simfluence method | peer | LDS difference | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {protocol_label(result, c['protocol'])} | {c['method']} | {c['peer']} | "
                  f"{_cell(c['mean'], 2)} [{_cell(c['low'], 2)}, {_cell(c['high'], 2)}] | {c['verdict']} |"
                  for c in paired]
    return "\n".join(text + lines + [""])


def plot_lds(result: dict, path: Path) -> Path:
    """Grouped bar chart: LDS per protocol (groups) and method (bars), bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = _protocols(result)
    methods = [cost["method"] for cost in result["costs"]]
    by = {(r["method"], r["protocol"]): r for r in result["scores"]}
    width = 0.8 / max(1, len(methods))
    columns = min(4, max(1, len(methods)))   # legend below the axes, so many methods never squeeze them
    legend_rows = math.ceil((len(methods) + 1) / columns)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(protocols) * max(2.0, 0.35 * len(methods))),
                                    3.4 + 0.22 * legend_rows))
    for k, method in enumerate(methods):
        means, low, high = (np.array([by[(method, p)][key] for p in protocols], dtype=float)  # None -> NaN
                            for key in ("mean", "low", "high"))
        x = np.arange(len(protocols)) + (k - (len(methods) - 1) / 2) * width
        ax.bar(x, means, width, yerr=np.stack([means - low, high - means]), capsize=2, label=method,
               color=plt.cm.tab20(k % 20))
    ceiling = result["noise_ceiling"].get(SUBSETS)
    if ceiling and ceiling["mean"] is not None:
        ax.hlines(ceiling["mean"], -0.45, 0.45, colors="black", linestyles="dashed", label="noise ceiling")
    ax.set_xticks(np.arange(len(protocols)))
    ax.set_xticklabels([protocol_label(result, p) for p in protocols])
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylabel("LDS (mean Spearman)")
    ax.set_title(f"{result['task']}: linear datamodeling score vs real retraining", fontsize=10)
    ax.legend(fontsize=7, ncol=columns, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
