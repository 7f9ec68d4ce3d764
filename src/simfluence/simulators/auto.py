"""``auto``: choose the simulator family by cross-validation over the fitting runs.

No family wins everywhere: on small SGD tasks the one-step ``linear-identity`` or ``linear``
recurrences (effects that scale with the current loss) predict held-out runs best, while on AdamW
fine-tuning with a warm-up/decay schedule the step-aware ``linear-trajectory`` does, and
where the curriculum barely matters the mean trajectory is hard to beat. ``auto`` fits each
candidate on K-1 folds of the *fitting* runs (each candidate choosing its own
hyper-parameters by its own cross-validation inside those folds), scores the rolled-out
all-steps MSE on the remaining fold, picks the candidate with the least total error, and
refits it on all fitting runs. Held-out runs are never looked at. The table of fold errors is
kept in ``fit_info["cv_table"]`` (and printed by ``simfluence fit``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simfluence.runs.log import RunSet
from simfluence.simulators.base import Simulator, register

CANDIDATES = ("linear-trajectory", "linear-identity", "linear", "mean-trajectory")
MIN_RUNS = 4
"""Fewer fitting runs leave a fold too few to fit a candidate with its own cross-validation:
then the first candidate is used without a choice."""


@register
class AutoSimulator(Simulator):
    """The candidate family with the least cross-validated all-steps MSE on the fitting runs.

    Args:
        candidates: simulator kinds to choose from (default :data:`CANDIDATES`); each is built
            with its default settings.
        cv_folds: folds of fitting runs for the choice.
        seed: the folds' shuffle.

    Fitted state: ``chosen_`` (the kind) and ``model_`` (the refitted simulator), which
    ``simulate`` delegates to.
    """

    kind = "auto"

    def __init__(self, candidates: tuple[str, ...] | list[str] = CANDIDATES, cv_folds: int = 3, seed: int = 0,
                 chosen: str | None = None, chosen_params: dict | None = None):
        super().__init__()
        from simfluence.simulators import SIMULATORS

        candidates = tuple(candidates)
        unknown = [kind for kind in candidates if kind not in SIMULATORS or kind == self.kind]
        if not candidates or unknown:
            raise ValueError(f"candidates: unknown or not allowed {unknown}; choose from "
                             f"{sorted(k for k in SIMULATORS if k != self.kind)}")
        if isinstance(cv_folds, bool) or int(cv_folds) != cv_folds or cv_folds < 2:
            raise ValueError(f"cv_folds: expected an integer >= 2, got {cv_folds!r}")
        self.candidates, self.cv_folds, self.seed = candidates, int(cv_folds), int(seed)
        # Set by load() only: which candidate the saved file holds.
        self._saved_choice = (chosen, chosen_params)

    fitted_params = ("chosen", "chosen_params")

    def _params(self) -> dict[str, Any]:
        fitted = hasattr(self, "model_")
        return {"candidates": list(self.candidates), "cv_folds": self.cv_folds, "seed": self.seed,
                "chosen": self.chosen_ if fitted else None,
                "chosen_params": self.model_._params() if fitted else None}

    def _fit(self, runs: RunSet) -> None:
        from simfluence.simulators import make_simulator
        from simfluence.simulators.linear import all_steps_mse

        table: list[dict[str, Any]] = []
        if runs.num_runs >= MIN_RUNS and len(self.candidates) > 1:
            folds = np.array_split(np.random.default_rng(self.seed).permutation(runs.num_runs),
                                   min(self.cv_folds, runs.num_runs))
            for kind in self.candidates:
                errors = []
                for fold in folds:
                    train = runs.select(np.setdiff1d(np.arange(runs.num_runs), fold))
                    held = runs.select(np.sort(fold))
                    model = make_simulator(kind).fit(train)
                    errors.append(all_steps_mse(model.simulate(held.curricula, held.initial_losses), held))
                table.append({"method": kind, "cv_mse": float(np.mean(errors)), "fold_mse": errors})
            chosen = min(table, key=lambda row: row["cv_mse"])["method"]
        else:
            chosen = self.candidates[0]
        self.chosen_ = chosen
        self.model_ = make_simulator(chosen).fit(runs)
        self.fit_info.update({"chosen": chosen, "cv_table": table,
                              **{f"{chosen}.{key}": value for key, value in self.model_.fit_info.items()
                                 if key not in self.fit_info and key != "cv_table"}})

    def _simulate(self, curricula: np.ndarray, initial: np.ndarray) -> np.ndarray:
        return self.model_._simulate(curricula, initial)

    def _arrays(self) -> dict[str, np.ndarray]:
        return self.model_._arrays()

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        from simfluence.simulators import SIMULATORS

        chosen, params = self._saved_choice
        if chosen not in self.candidates:
            raise ValueError(f"the chosen simulator {chosen!r} is not among the candidates")
        cls = SIMULATORS[chosen]
        model = cls(**cls._without_retired(params or {}, "config", "params.chosen_params"))
        model.train_ids, model.test_ids, model.mean_change = self.train_ids, self.test_ids, self.mean_change
        model.fit_digests, model.fit_info = self.fit_digests, {}
        model._restore(arrays)
        self.chosen_, self.model_ = chosen, model
