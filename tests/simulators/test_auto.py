"""auto: its choice rule on constructed fold scores, and on real fits against an independent reading of its table."""

import numpy as np
import pytest
from small_tasks import digits_runs
from synthetic import linear_runs, trajectory_runs

from simfluence.simulators import make_simulator
from simfluence.simulators.auto import CANDIDATES, choose_candidate
from simfluence.simulators.base import one_standard_error_choice, run_folds


def _folds(all_steps, final, ranking):
    """``[F, 3]`` fold scores as ``auto`` keeps them."""
    return np.stack([all_steps, final, ranking], axis=1).astype(np.float64)


REFERENCE = _folds([1.0, 1.2, 0.8], [1.0, 1.1, 0.9], [0.5, 0.6, 0.4])
NEAR = _folds([1.06, 1.1, 0.85], [0.95, 1.2, 0.9], [0.7, 0.8, 0.6])           # a little more error, within noise; ranks better
WORSE_FINAL = _folds([1.01, 1.21, 0.81], [1.3, 1.4, 1.2], [0.9, 0.9, 0.9])    # final error beyond the folds' noise
BASELINE = _folds([2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [np.nan] * 3)


def test_the_best_ranking_within_one_standard_error_of_the_least_error_wins():
    kinds = ["linear-identity", "hybrid", "linear", "mean-trajectory"]
    scores = dict(zip(kinds, (REFERENCE, NEAR, WORSE_FINAL, BASELINE)))
    assert choose_candidate(kinds, scores) == ("hybrid", "linear-identity")
    del scores["hybrid"]
    assert choose_candidate([k for k in kinds if k != "hybrid"], scores) == ("linear-identity", "linear-identity")
    # equal rankings: the earlier kind; a fold without a ranking (too few runs): not allowed to switch
    assert choose_candidate(["linear-identity", "linear"], {"linear-identity": REFERENCE, "linear": REFERENCE + 0})[0] \
        == "linear-identity"
    unranked = NEAR.copy()
    unranked[0, 2] = np.nan
    assert choose_candidate(["linear-identity", "hybrid"], {"linear-identity": REFERENCE, "hybrid": unranked})[0] \
        == "linear-identity"


def test_a_baseline_of_least_error_is_kept():
    # the baseline errs least, and hybrid is within one standard error of it and ranks: the baseline stays
    offset = np.array([[-0.02, -0.02, np.nan], [0.01, 0.01, np.nan], [0.0, 0.0, np.nan]])
    scores = {"mean-trajectory": NEAR + offset, "hybrid": NEAR}
    excess = NEAR[:, :2] - scores["mean-trajectory"][:, :2]
    assert (excess.mean(axis=0) <= excess.std(axis=0, ddof=1) / np.sqrt(3)).all()
    assert choose_candidate(["hybrid", "mean-trajectory"], scores) == ("mean-trajectory", "mean-trajectory")


def test_one_standard_error_choice_counts_from_any_reference():
    errors = np.stack([NEAR[:, :2], REFERENCE[:, :2], WORSE_FINAL[:, :2]], axis=1)     # [F, 3, 2]
    assert one_standard_error_choice(errors, [0.7, 0.5, 0.9], reference=1) == 0
    assert one_standard_error_choice(errors, [np.nan, 0.5, 0.9], reference=1) == 1
    with pytest.raises(ValueError, match="scores"):
        one_standard_error_choice(errors, [0.7, 0.5], reference=1)
    with pytest.raises(ValueError, match="fold_errors"):
        one_standard_error_choice(errors, [0.7, 0.5, 0.9], reference=3)


def test_the_choice_on_real_fits_follows_the_rule_read_from_its_table():
    runs = linear_runs(num_runs=15, num_steps=20, seed=4, noise=1e-3)[0]
    auto = make_simulator("auto").fit(runs)
    table = {row["method"]: row for row in auto.fit_info["cv_table"]}
    assert set(table) == set(CANDIDATES)
    assert table["hybrid"]["cv_mse"] is None and "task" in table["hybrid"]["skipped"]   # no task to replay
    scored = {kind: row for kind, row in table.items() if row["cv_mse"] is not None}
    least = min(scored, key=lambda kind: scored[kind]["cv_mse"])
    assert auto.fit_info["least_error"] == least
    allowed = []
    for kind, row in scored.items():
        excess = np.array([row["fold_mse"], row["fold_final_mse"]]) \
            - np.array([scored[least]["fold_mse"], scored[least]["fold_final_mse"]])        # [2, F]
        noise = excess.std(axis=1, ddof=1) / np.sqrt(excess.shape[1])
        if (excess.mean(axis=1) <= noise).all() and row["cv_spearman"] is not None:
            allowed.append(kind)
    expected = max(allowed, key=lambda kind: scored[kind]["cv_spearman"])
    assert auto.chosen_ == expected, table
    # the fold scores are the candidate's own on each fold, computed here another way
    folds = run_folds(runs.num_runs, auto.config.cv_folds, auto.config.seed)
    fold = np.sort(folds[1])
    model = make_simulator("linear-identity").fit(runs.select(np.setdiff1d(np.arange(runs.num_runs), fold)))
    held = runs.select(fold)
    predicted = model.simulate(held.curricula, held.initial_losses).astype(np.float64)
    np.testing.assert_allclose(table["linear-identity"]["fold_mse"][1],
                               np.mean((predicted[:, 1:] - held.losses[:, 1:]) ** 2), rtol=1e-5)
    np.testing.assert_allclose(table["linear-identity"]["fold_final_mse"][1],
                               np.mean((predicted[:, -1] - held.losses[:, -1]) ** 2), rtol=1e-5)
    order = lambda values: np.argsort(np.argsort(values))                   # noqa: E731  ranks (no ties here)
    ranks = [np.corrcoef(order(predicted[:, -1, m]), order(held.losses[:, -1, m]))[0, 1] for m in range(runs.num_test)]
    np.testing.assert_allclose(table["linear-identity"]["fold_spearman"][1], np.mean(ranks), rtol=1e-6)


def test_hybrid_is_a_candidate_where_the_task_replays():
    _, runs = digits_runs(num_runs=9, num_steps=15)
    auto = make_simulator("auto", candidates=("hybrid", "linear-identity", "mean-trajectory")).fit(runs)
    row = next(row for row in auto.fit_info["cv_table"] if row["method"] == "hybrid")
    assert row["cv_mse"] is not None and len(row["fold_spearman"]) == auto.config.cv_folds
    assert auto.chosen_ in ("hybrid", "linear-identity")


def test_runs_without_consecutive_steps_skip_the_transition_kinds():
    from simfluence.runs import RunSet
    from simfluence.simulators import capabilities

    full = trajectory_runs(num_runs=12, num_steps=20, seed=5)[0]
    steps = np.arange(0, 21, 4)                                   # recorded every 4th step, as --eval-every 4
    sparse = RunSet.create(full.curricula, full.losses[:, steps], full.train_ids, full.test_ids, eval_steps=steps,
                           meta=full.meta)
    auto = make_simulator("auto").fit(sparse)
    table = {row["method"]: row for row in auto.fit_info["cv_table"]}
    for kind in ("linear-identity", "linear", "hybrid"):
        assert capabilities(kind).transitions and "no two consecutive" in table[kind]["skipped"]
    assert table["linear-trajectory"]["cv_mse"] is not None and auto.chosen_ in ("linear-trajectory", "mean-trajectory")
    assert not capabilities("linear-trajectory").transitions and capabilities("tracin-cp-scaled").transitions
    assert not capabilities("tracin-cp").transitions
