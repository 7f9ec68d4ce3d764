"""The linear datamodeling score: known answers on synthetic datamodels, the protocols, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from simfluence.cli import main
from simfluence.collect.train import train_run
from simfluence.tasks import get_task
from simfluence.lds import (Counterfactuals, OccurrenceMethod, ScoreMethod, bootstrap_mean, draw_subsets,
                            lds_per_example, remove_occurrences, removal_counterfactuals, subset_counterfactuals)
from simfluence.runs.log import PAD


def _synthetic(num_sets=60, num_train=40, num_test=30, seed=0):
    """A linear datamodel: y_j(z) = sum_{i in S_j} theta_i(z), exactly."""
    rng = np.random.default_rng(seed)
    masks = draw_subsets(np.arange(num_train), num_train, num_sets, 0.5, seed)
    theta = rng.normal(size=(num_train, num_test))
    actual = masks @ theta
    empty = np.zeros((num_sets, 1, 1), dtype=np.int32)
    return theta, Counterfactuals("subsets", masks, empty, empty[:, None], None, np.zeros(num_test), actual, None, 0.0)


def test_exact_scores_give_lds_one_and_random_scores_about_zero():
    theta, counterfactuals = _synthetic()
    exact = lds_per_example(ScoreMethod("exact", theta, 0, 0).predict(counterfactuals), counterfactuals.actual)
    np.testing.assert_allclose(exact, 1.0)
    rng = np.random.default_rng(1)
    random = lds_per_example(ScoreMethod("random", rng.normal(size=theta.shape), 0, 0).predict(counterfactuals),
                             counterfactuals.actual)
    assert abs(random.mean()) < 0.1
    # Any per-example positive rescaling and shift keeps the ranking, so LDS stays 1.
    rescaled = ScoreMethod("rescaled", theta * rng.uniform(1, 3, size=theta.shape[1]) + 5, 0, 0)
    np.testing.assert_allclose(lds_per_example(rescaled.predict(counterfactuals), counterfactuals.actual), 1.0)
    # Negated scores rank backwards.
    flipped = lds_per_example(ScoreMethod("flipped", -theta, 0, 0).predict(counterfactuals), counterfactuals.actual)
    np.testing.assert_allclose(flipped, -1.0)


def test_noisy_datamodel_lds_matches_the_known_correlation():
    """With y = Xθ + noise of variance equal to the signal's, Spearman ≈ (6/π)·asin(ρ/2), ρ = 1/√2."""
    rng = np.random.default_rng(2)
    theta, counterfactuals = _synthetic(num_sets=400, num_test=200)
    signal = counterfactuals.actual
    noisy = signal + rng.normal(size=signal.shape) * signal.std(axis=0)
    values = lds_per_example(ScoreMethod("exact", theta, 0, 0).predict(counterfactuals), noisy)
    expected = 6 / np.pi * np.arcsin(np.sqrt(0.5) / 2)
    assert abs(values.mean() - expected) < 0.02


def test_lds_marks_constant_columns_undefined_and_bootstrap_leaves_them_out():
    values = lds_per_example(np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]), np.array([[1.0, 3], [2, 2], [3, 1]]))
    assert values[0] == pytest.approx(1.0) and np.isnan(values[1])
    score = bootstrap_mean(values, 100)
    assert (score.mean, score.count, score.undefined) == (1.0, 1, 1)
    score = bootstrap_mean(np.random.default_rng(0).normal(size=500), 500)
    assert score.low < score.mean < score.high and score.high - score.low < 0.25
    with pytest.raises(ValueError, match="at least 3"):
        lds_per_example(np.zeros((2, 3)), np.zeros((2, 3)))


def test_remove_occurrences_matches_a_loop():
    rng = np.random.default_rng(3)
    reference = rng.integers(0, 10, size=(7, 3)).astype(np.int32)
    reference[2, 1] = PAD
    removed = rng.random((5, 10)) < 0.3
    edited = remove_occurrences(reference, removed)
    for j in range(5):
        for t in range(7):
            for b in range(3):
                value = reference[t, b]
                expected = PAD if value == PAD or removed[j, value] else value
                assert edited[j, t, b] == expected


def test_metagradient_predictions_pool_occurrences_and_reweight_batches(tiny_task):
    from simfluence.func.metagradients import metagradients

    reference = np.random.default_rng(4).integers(0, 30, size=(6, 4)).astype(np.int32)
    result = metagradients(tiny_task, reference)
    method = OccurrenceMethod("metagradient", result, 1, 0)
    removed = np.zeros((3, 30), dtype=bool)
    removed[0, reference[0, 0]] = True                                 # one example
    removed[1, reference[2]] = True                                    # a whole batch: that step is skipped
    removed[2, 29 if 29 not in reference else 28] = True               # absent or not, drawn from the pool
    counterfactuals = Counterfactuals("removal-1", removed, remove_occurrences(reference, removed), None,
                                      reference, np.zeros(8), np.zeros((3, 8)), None, 0.0)
    predicted = method.predict(counterfactuals)
    g = result.occurrence
    # Removing example e: its occurrences lose weight 1, the rest of their batches gain n/(n - k) - 1.
    for j in range(3):
        delta = np.zeros(reference.shape)
        for t, row in enumerate(reference):
            gone = removed[j, row]
            if gone.all():
                delta[t] = -1
            elif gone.any():
                delta[t] = np.where(gone, -1, len(row) / (len(row) - gone.sum()) - 1)
        np.testing.assert_allclose(predicted[j], result.final_losses + np.einsum("tb,tbm->m", delta, g))
    counts = np.zeros((30, 8))
    for t, b in np.ndindex(reference.shape):
        counts[reference[t, b]] += g[t, b]
    np.testing.assert_allclose(method.predict(Counterfactuals("subsets", removed, reference[None], None, None,
                                                              np.zeros(8), np.zeros((3, 8)), None, 0.0)),
                               removed @ counts)


@pytest.fixture(scope="module")
def tiny_task():
    return get_task("digits-mlp", num_train=30, num_test=8)


def test_subset_protocol_trains_only_on_the_subset_and_matches_a_plain_run(tiny_task):
    subsets = subset_counterfactuals(tiny_task, 6, num_subsets=4, fraction=0.5, draws=2, seed=5)
    assert subsets.masks.sum(axis=1).tolist() == [15] * 4
    assert subsets.simulated.shape == (4, 2, 6, tiny_task.batch_size)
    for j in range(4):
        assert subsets.masks[j, subsets.trained[j]].all() and subsets.masks[j, subsets.simulated[j]].all()
    reference = train_run(tiny_task, subsets.trained[1]).losses
    np.testing.assert_allclose(subsets.actual[1], reference[-1], atol=1e-5)
    np.testing.assert_allclose(subsets.trajectories[1], reference, atol=1e-5)
    assert subsets.repeat is not None and not np.allclose(subsets.repeat, subsets.actual)
    assert subsets.ceiling().shape == (tiny_task.num_test,)


def test_removal_protocol_drops_every_occurrence_and_retrains(tiny_task):
    reference = np.random.default_rng(6).integers(0, 30, size=(8, 4)).astype(np.int32)
    removal = removal_counterfactuals(tiny_task, reference, 3, num_sets=3, seed=7)
    for j in range(3):
        removed = np.flatnonzero(removal.masks[j])
        assert removed.size == 3 and not np.isin(removal.trained[j], removed).any()
        kept = removal.trained[j] != PAD
        assert (removal.trained[j][kept] == reference[kept]).all()
    # Constant learning rate: skipping an emptied step is training on the remaining steps.
    kept_steps = removal.trained[0][(removal.trained[0] != PAD).any(axis=1)]
    np.testing.assert_allclose(removal.actual[0], train_run(tiny_task, kept_steps).losses[-1], atol=1e-5)


def test_cli_lds_quick_writes_table_json_and_plot(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIMFLUENCE_CACHE", str(cache))
    out = tmp_path / "lds"
    args = ["lds", "digits-mlp", "--quick", "--runs", "6", "--steps", "12", "--subsets", "6", "--removals", "4"]
    result = CliRunner().invoke(main, [*args, "--methods", "additive,linear", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "lds.json").read_text())
    protocols = {r["protocol"] for r in record["scores"]}
    assert "subsets" in protocols and any(p.startswith("removal-") for p in protocols)
    assert record["config"]["removal_fractions"] == [0.01, 0.05, 0.1]
    assert {c["method"] for c in record["costs"]} == {"additive", "linear"}
    assert "noise_ceiling" in record and (out / "lds.png").stat().st_size > 1000
    assert "| additive |" in result.output
    # One cached retraining per protocol (subsets, remove 1, 1 %, 5 %, 10 %). The same command with other
    # methods reads them back: the same ceiling, and the first command's training seconds, to the bit.
    entries = sorted(path.name for path in cache.glob("retrained-*.pt"))
    assert len(entries) == 5
    again = tmp_path / "again"
    result = CliRunner().invoke(main, [*args, "--methods", "additive", "--out", str(again)])
    assert result.exit_code == 0, result.output
    second = json.loads((again / "lds.json").read_text())
    assert sorted(path.name for path in cache.glob("retrained-*.pt")) == entries
    assert second["seconds_per_training_run"] == record["seconds_per_training_run"]
    assert second["noise_ceiling"] == record["noise_ceiling"]
    def additive(result):
        return [{**r, "predict_seconds": None} for r in result["scores"] if r["method"] == "additive"]

    assert additive(second) == additive(record)
    # Other counterfactuals (another seed) are retrained; --no-cache keeps nothing.
    result = CliRunner().invoke(main, [*args, "--methods", "additive", "--seed", "1", "--no-cache", "--out",
                                       str(tmp_path / "uncached")])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in cache.glob("retrained-*.pt")) == entries


def test_trak_hybrid_reads_the_final_weights_the_collection_kept(tmp_path, monkeypatch):
    pytest.importorskip("trak")
    from simfluence.lds_benchmark import TRAK_HYBRID, LDSConfig, run_lds

    monkeypatch.setenv("SIMFLUENCE_CACHE", str(tmp_path / "cache"))
    config = LDSConfig.quick(task="digits-mlp", out_dir=str(tmp_path / "lds"), num_runs=6, num_steps=12,
                             num_subsets=6, num_removals=4, removal_fractions=(0.05,), methods=(TRAK_HYBRID, "trak"))
    record = run_lds(config, progress=False)
    costs = {cost["method"]: cost for cost in record["costs"]}
    assert costs[TRAK_HYBRID]["training_runs"] == 6 and costs[TRAK_HYBRID]["family"] == "simulator"
    assert TRAK_HYBRID in record["trajectory_errors"]
    scores = [r for r in record["scores"] if r["method"] == TRAK_HYBRID]
    assert len(scores) == 3 and all(np.isfinite(r["mean"]) for r in scores)
    # Its TRAK prior was computed from those 6 runs' final weights and kept in the cache, once for both:
    # TRAK at the simulators' budget is the same ensemble.
    assert len(list((tmp_path / "cache").glob("trak-prior-*.pt"))) == 1
    assert costs["trak"]["training_runs"] == 6 and costs["trak"]["seconds"] > 0
    again = run_lds(replace(config, methods=("trak",)), progress=False)
    assert again["costs"][0]["seconds"] == costs["trak"]["seconds"]     # read back with its original cost
    assert [r["per_example"] for r in again["scores"]] == [r["per_example"] for r in record["scores"]
                                                          if r["method"] == "trak"]


@pytest.mark.parametrize("args, message", [
    (["--methods", "bogus"], "methods: unknown ['bogus']"),
    (["--fraction", "1.5"], "--fraction"),
    (["--subsets", "2"], "--subsets"),
    (["--removal-fractions", "0.05,x"], "--removal-fractions: expected comma-separated numbers"),
    (["--removal-fractions", "1.5"], "removal_fractions: must lie strictly between 0 and 1"),
])
def test_cli_lds_bad_options_give_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["lds", "digits-mlp", "--quick", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_lds_refuses_sgd_replays_of_trainer_tasks_before_collecting(tmp_path):
    from simfluence.lds_benchmark import LDSConfig, run_lds

    # The peers replay their checkpoints through the Trainer, metagradients its AdamW steps; tracin-cp replays SGD.
    with pytest.raises(ValueError, match=r"AdamW through the Hugging Face Trainer, which \['tracin-cp'\] cannot "
                                         r"follow .*'ekfac', 'tracin', 'metagradient', 'gradient-trajectory\+trak'\]$"):
        run_lds(LDSConfig.quick(task="minilm-finetune", out_dir=str(tmp_path / "x"),
                                methods=("linear-identity", "trak", "tracin-cp", "metagradient")), progress=False)
    with pytest.raises(ValueError, match=r"\['tracin-cp'\] cannot follow"):
        run_lds(LDSConfig.quick(task="minilm-finetune", out_dir=str(tmp_path / "x"), methods=("tracin-cp",)),
                progress=False)
    assert not (tmp_path / "x").exists()


def test_default_methods_on_a_trainer_task_leave_out_the_sgd_replays():
    from simfluence.benchmark import sgd_replaying
    from simfluence.lds_benchmark import DEFAULT_METHODS, runnable_methods
    from simfluence.tasks import get_task

    trainer_task = get_task("minilm-finetune")
    methods, left_out = runnable_methods(trainer_task, DEFAULT_METHODS)
    assert left_out and set(left_out) == set(sgd_replaying(DEFAULT_METHODS))
    assert set(methods) | set(left_out) == set(DEFAULT_METHODS) and "metagradient" in methods
    assert runnable_methods(trainer_task, methods) == (methods, [])          # what is left runs as chosen
    assert runnable_methods(get_task("digits-mlp"), DEFAULT_METHODS) == (DEFAULT_METHODS, [])


def test_a_simulator_predicts_a_uniform_subset_by_its_exact_expectation_else_by_its_draws():
    from simfluence.lds import SimulatorMethod
    from simfluence.simulators import make_simulator
    from synthetic import linear_runs

    runs = linear_runs(num_train=12, num_test=4, num_runs=8, num_steps=10, batch=2, seed=2)[0]
    simulator = make_simulator("linear-identity").fit(runs)
    masks = draw_subsets(np.arange(12), 12, 5, 0.5, seed=3)
    rng = np.random.default_rng(0)
    simulated = np.stack([rng.choice(np.flatnonzero(mask), (3, 10, 2)) for mask in masks]).astype(np.int32)
    initial = runs.initial_losses[0].astype(np.float64)
    subsets = Counterfactuals("subsets", masks, simulated[:, 0], simulated, None, initial, np.zeros((5, 4)), None,
                              0.0, sampler="uniform")
    method = SimulatorMethod("linear-identity", simulator, 8, 0.0)
    np.testing.assert_allclose(method.predict(subsets), simulator.simulate_expected(masks, 10, initial)[:, -1])
    # Another sampler: the mean over the drawn curricula.
    drawn = simulator.simulate(simulated.reshape(15, 10, 2), np.repeat(initial[None], 15, 0))[:, -1]
    other = Counterfactuals(**{**subsets.__dict__, "sampler": "epoch"})
    np.testing.assert_allclose(method.predict(other), drawn.reshape(5, 3, 4).mean(axis=1), rtol=1e-6)
    # A model in margin space: its control-variate expectation over as many draws as the counterfactuals hold.
    margin = make_simulator("linear-identity", space="margin").fit(runs)
    assert margin.expected_estimator == "control variate"
    np.testing.assert_allclose(SimulatorMethod("margin", margin, 8, 0.0).predict(subsets),
                               margin.simulate_expected(masks, 10, initial, draws=3)[:, -1])


def test_paired_difference_resamples_examples_together():
    from simfluence.lds import paired_difference

    rng = np.random.default_rng(0)
    base = rng.uniform(-0.5, 1.0, 200)             # hard and easy examples: a wide spread shared by both
    shifted = paired_difference(base + 0.03, base)
    assert shifted.mean == pytest.approx(0.03) and shifted.low == pytest.approx(0.03)
    assert shifted.high == pytest.approx(0.03)     # every resample moves both alike
    separate = bootstrap_mean(base + 0.03)
    assert separate.low < np.mean(base) < separate.high   # separately, the two intervals overlap
    with_nan = base.copy()
    with_nan[:5] = np.nan
    record = paired_difference(with_nan, base)
    assert (record.count, record.undefined, record.mean) == (195, 5, 0.0)
    with pytest.raises(Exception, match="paired values"):
        paired_difference(base, base[:10])


def test_peer_comparisons_pick_the_best_own_method_and_give_a_verdict():
    from simfluence.lds_benchmark import lds_markdown, peer_comparisons

    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 100)
    per_example = {"linear-identity": base + 0.05, "additive": base + 0.01, "trak": base,
                   "tracin": base + 0.05 + rng.normal(0, 0.01, 100), "ekfac": base + 0.2}

    def record(name, values):
        return {"method": name, "protocol": "subsets", "mean": float(values.mean()), "low": 0.0, "high": 1.0,
                "per_example": values.tolist()}

    result = {"scores": [record(name, values) for name, values in per_example.items()], "config": {"fraction": 0.5},
              "removal_sizes": {}, "costs": [{"method": name, "run_equivalents": 1.0, "seconds": 0.0}
                                             for name in per_example],
              "trajectory_errors": {}, "noise_ceiling": {}, "task": "t", "num_train": 10, "num_test": 100,
              "num_steps": 5, "seconds_per_training_run": 1.0}
    result["config"].update(num_subsets=3, num_removals=3, num_runs=2)
    verdicts = {c["peer"]: (c["method"], c["verdict"]) for c in peer_comparisons(result)}
    assert verdicts == {"trak": ("linear-identity", "above"), "tracin": ("linear-identity", "tied"),
                        "ekfac": ("linear-identity", "below")}
    assert "| subsets α=0.5 | linear-identity | trak | 0.05 [0.05, 0.05] | above |" in lds_markdown(result)


def test_unknown_seconds_are_null_not_nan_in_the_record():
    from simfluence.lds_benchmark import _cell, method_cost

    known = method_cost("additive", "simulator", 48.0, 2.0, 0.5)
    assert known["run_equivalents"] == 52.0 and known["seconds"] == 2.0
    unknown = method_cost("trak", "scores", 48.0, float("nan"), 0.5)
    assert unknown["seconds"] is None and unknown["run_equivalents"] is None
    assert "NaN" not in json.dumps(unknown) and _cell(unknown["seconds"]) == "n/a"    # the table's cell as before
