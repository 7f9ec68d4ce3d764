"""``auto``: choose the simulator family by cross-validation over the fitting runs.

No family wins everywhere: on small SGD tasks the one-step ``linear-identity`` recurrence and
its gradient-prior ``hybrid`` predict held-out runs best, while on AdamW fine-tuning with a
warm-up/decay schedule the step-aware ``gradient-trajectory`` does, and where the curriculum
barely matters the mean trajectory is hard to beat. ``auto`` fits each candidate on K-1 folds of
the *fitting* runs (each candidate choosing its own hyper-parameters by its own cross-validation
inside those folds) and scores it on the remaining fold: rolled-out all-steps MSE, final-step MSE
and across-run Spearman of the final losses (mean over test examples). Then it chooses
(:func:`choose_candidate`):

* the candidate with the least all-steps MSE summed over the folds is the reference; a baseline
  (the mean trajectory) as the reference is chosen outright;
* otherwise, among the candidates whose all-steps and final-step MSE exceed the reference's by at
  most one standard error over the folds (the reference included), the one that ranks the
  folds' runs best: near-equal errors are noise, which curriculum helps is what users ask.

The chosen candidate is refitted on all fitting runs. Held-out runs are never looked at. The table
of fold scores is kept in ``fit_info["cv_table"]`` (and printed by ``simfluence fit``).

Candidates that read the task (``gradient-trajectory``, ``hybrid``) take the one the runs' meta
names; where it cannot be built (runs of a user's own model) or cannot be replayed (``hybrid``'s
prior replays plain SGD, not the Hugging Face Trainer), they are skipped and their row in the
table says why. So are the candidates fitted on one-step transitions (``capabilities.transitions``)
when the runs record no two consecutive steps (collected with ``--eval-every k > 1``): the
trajectory kinds and the mean trajectory remain.

Measured on 6 held-out splits of each built-in SGD task (docs/benchmarks.md), the rule with
``hybrid`` among the candidates raised the default's across-run Spearman on digits-mlp (0.73 ->
0.78) and text-minilm (0.64 -> 0.68) at about the same error (all-steps 0.145x -> 0.133x and 0.259x
-> 0.265x the mean trajectory's); the least-error rule with ``hybrid`` added chose it on half the
digits-mlp splits, by noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from simfluence.errors import SimfluenceError, UsageError
from simfluence.progress import progress_bar
from simfluence.runs.log import RunSet
from simfluence.simulators.base import Capabilities, Simulator, register, run_folds
from simfluence.simulators.config import SimulatorConfig, integer, setting

CANDIDATES = ("linear-trajectory", "gradient-trajectory", "hybrid", "linear-identity", "linear", "mean-trajectory")
MIN_RUNS = 4
"""Fewer fitting runs leave a fold too few to fit a candidate with its own cross-validation:
then the first candidate is used without a choice."""


@dataclass(frozen=True)
class AutoConfig(SimulatorConfig):
    """Settings of ``auto``."""

    candidates: tuple[str, ...] = setting(CANDIDATES, "Simulator kinds to choose from, each with its default "
                                          "settings.")
    cv_folds: int = setting(3, "Folds of fitting runs for the choice.")
    seed: int = setting(0, "The folds' shuffle.")

    def validate(self) -> None:
        """Check that the candidates are registered kinds (not ``auto``) and the folds."""
        from simfluence.simulators.base import simulator_kinds

        allowed = [kind for kind in simulator_kinds() if kind != "auto"]
        candidates = tuple(self.candidates) if isinstance(self.candidates, (list, tuple)) else ()
        unknown = [kind for kind in candidates if kind not in allowed]
        if not candidates or unknown:
            raise UsageError(f"candidates: unknown or not allowed {unknown}; choose from {allowed}")
        self._set("candidates", candidates)
        self._set("cv_folds", integer("cv_folds", self.cv_folds, 2))
        self._set("seed", integer("seed", self.seed, 0))


@register
class AutoSimulator(Simulator):
    """The candidate family chosen by cross-validation on the fitting runs (module docstring).

    Args:
        candidates: simulator kinds to choose from (default :data:`CANDIDATES`); each is built
            with its default settings.
        cv_folds: folds of fitting runs for the choice.
        seed: the folds' shuffle.

    Fitted state: ``chosen_`` (the kind) and ``model_`` (the refitted simulator), which
    ``simulate`` delegates to.
    """

    kind = "auto"
    capabilities = Capabilities("learned", cross_validation=True)

    config_class = AutoConfig
    config: AutoConfig
    fitted_params = ("chosen", "chosen_params")

    def __init__(self, config: AutoConfig | None = None, **settings: Any):
        super().__init__(config, **settings)
        self._saved_model: Simulator | None = None  # set by load() only: the chosen candidate, not yet restored

    def _fitted_settings(self) -> dict[str, Any]:
        return {"chosen": self.chosen_, "chosen_params": self.model_._params()} if hasattr(self, "model_") else {}

    def _load_fitted_settings(self, values: dict[str, Any]) -> None:
        from simfluence.simulators import make_simulator

        chosen = values.get("chosen")
        if chosen is None:
            return
        if chosen not in self.config.candidates:
            raise UsageError(f"chosen: {chosen!r} is not among the candidates {list(self.config.candidates)}")
        params = values.get("chosen_params") or {}
        if not isinstance(params, dict):
            raise UsageError(f"chosen_params: expected the settings of '{chosen}', got {params!r}")
        self._saved_model = make_simulator(chosen, **params)

    def _fit(self, runs: RunSet) -> None:
        from simfluence.simulators import make_simulator

        table: list[dict[str, Any]] = []
        skipped = {kind: reason for kind in self.config.candidates if (reason := _cannot_fit(kind, runs))}
        usable = [kind for kind in self.config.candidates if kind not in skipped]
        if not usable:
            raise UsageError(f"candidates: none can be fitted on these runs ({skipped})")
        if runs.num_runs >= MIN_RUNS and len(usable) > 1:
            folds = run_folds(runs.num_runs, self.config.cv_folds, self.config.seed)
            rows: dict[str, list] = {kind: [] for kind in usable}
            for kind, fold in progress_bar([(kind, fold) for kind in usable for fold in folds], desc="fit auto",
                                           unit="fold fit", leave=False):
                fitting = runs.select(np.setdiff1d(np.arange(runs.num_runs), fold))
                rows[kind].append(fold_scores(make_simulator(kind).fit(fitting), runs.select(np.sort(fold))))
            scores = {kind: np.array(rows[kind]) for kind in usable}   # [folds, 3]: all-steps, final MSE, ranking
            chosen, least = choose_candidate(usable, scores)
            for kind in self.config.candidates:
                if kind in skipped:
                    table.append({"method": kind, "cv_mse": None, "skipped": skipped[kind]})
                    continue
                mean = scores[kind].mean(axis=0)
                table.append({"method": kind, "cv_mse": float(mean[0]), "cv_final_mse": float(mean[1]),
                              "cv_spearman": None if np.isnan(mean[2]) else float(mean[2]),
                              "fold_mse": scores[kind][:, 0].tolist(), "fold_final_mse": scores[kind][:, 1].tolist(),
                              "fold_spearman": [None if np.isnan(value) else float(value)   # JSON has no NaN
                                                for value in scores[kind][:, 2]]})
            self.fit_info["least_error"] = least
        else:
            chosen = usable[0]
            table = [{"method": kind, "cv_mse": None, "skipped": reason} for kind, reason in skipped.items()]
        self.chosen_ = chosen
        self.model_ = make_simulator(chosen).fit(runs)
        self.fit_info.update({"chosen": chosen, "cv_table": table,
                              **{f"{chosen}.{key}": value for key, value in self.model_.fit_info.items()
                                 if key not in self.fit_info and key != "cv_table"}})

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        return self.model_._simulate(curricula, initial)

    @property
    def expected_estimator(self) -> str:
        """The chosen candidate's (``auto`` declares no closed form of its own)."""
        self._check_fitted()
        return self.model_.expected_estimator

    def _expected(self, weights: np.ndarray, num_steps: int, batch_size: int, initial: np.ndarray) -> np.ndarray:
        return self.model_._expected(weights, num_steps, batch_size, initial)

    def _sampled_expected(self, pools: np.ndarray, num_steps: int, batch: int, initial: np.ndarray, draws: int,
                          seed: int, source: str, rows: np.ndarray | None = None) -> np.ndarray:
        return self.model_._sampled_expected(pools, num_steps, batch, initial, draws, seed, source, rows)

    def _arrays(self) -> dict[str, np.ndarray]:
        return self.model_._arrays()

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        model = self._saved_model
        if model is None:
            raise ValueError("the file does not say which candidate was chosen")
        model.train_ids, model.test_ids, model.mean_change = self.train_ids, self.test_ids, self.mean_change
        model.fit_digests, model.fit_info = self.fit_digests, {}
        model._restore(arrays)
        self.chosen_, self.model_ = model.kind, model


def fold_scores(model: Simulator, held: RunSet) -> list[float]:
    """``model``'s all-steps MSE, final-step MSE and across-run Spearman on ``held``.

    As :func:`~simfluence.evaluate.score` defines them; the ranking is NaN where it is undefined
    (a baseline's constant predictions, fewer than 3 held-out runs).
    """
    from simfluence.evaluate import score

    metrics = score(model.simulate(held.curricula, held.initial_losses), held)
    return [metrics.mse, metrics.final_mse, metrics.across_run_spearman]


def choose_candidate(kinds: list[str], scores: dict[str, np.ndarray]) -> tuple[str, str]:
    """The chosen kind and the one of least cross-validated all-steps MSE (module docstring).

    ``scores[kind]`` ``[F, 3]``: each fold's all-steps MSE, final-step MSE and across-run Spearman.
    The least-error kind is kept when it is a baseline (it ranks no curricula); otherwise the kind
    that ranks the folds' runs best among those whose two errors are within one standard error of
    its (:func:`~simfluence.simulators.base.one_standard_error_choice`), ties to the earlier kind.
    """
    from simfluence.simulators.base import capabilities, one_standard_error_choice

    least = min(kinds, key=lambda kind: float(scores[kind][:, 0].mean()))
    if not capabilities(least).attribution:
        return least, least
    stacked = np.stack([scores[kind] for kind in kinds], axis=1)             # [F, kinds, 3]
    ranking = np.where([capabilities(kind).attribution for kind in kinds], stacked[:, :, 2].mean(axis=0), np.nan)
    return kinds[one_standard_error_choice(stacked[:, :, :2], ranking, kinds.index(least))], least


def _cannot_fit(kind: str, runs: RunSet) -> str | None:
    """Why candidate ``kind`` cannot be fitted on ``runs`` (``None``: it can).

    Kinds fitted on one-step transitions need two consecutive recorded steps (runs collected with
    ``--eval-every k > 1`` have none). Kinds that read the task take the one the runs' meta names
    (auto builds them without one); runs recorded from a user's own model name none, and a Trainer
    task can only serve kinds that declare ``trainer_tasks``.
    """
    from simfluence.simulators.base import capabilities
    from simfluence.simulators.linear import transition_pairs
    from simfluence.tasks.registry import task_for_runs

    declared = capabilities(kind)
    if declared.transitions and transition_pairs(runs.eval_steps).size == 0:
        return (f"fits one-step transitions, and these runs record losses only at steps "
                f"{runs.eval_steps[:4].tolist()}...: no two consecutive ones")
    if declared.task == "none":
        return None
    try:
        task = task_for_runs(None, None, runs.meta, "")
    except SimfluenceError as error:   # no task in the meta, an unknown task, a missing extra
        return f"needs the task: {error}"
    if task.runner != "torch" and not declared.trainer_tasks:
        return f"cannot replay task '{task.name}' (trains with the Hugging Face Trainer)"
    return None
