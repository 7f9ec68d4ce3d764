"""Counterfactual queries against explicit rollouts of hand-edited curricula."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from simfluence.cli import main
from simfluence.query import (Edit, apply_edits, epoch_curricula, influence_over_time, leave_group_out,
                              leave_one_out, optimize, parse_edit, simulate_curricula, whatif)
from simfluence.runs import PAD, RunDataError, save_runs
from simfluence.simulators import AdditiveSimulator, LinearIdentitySimulator, LinearSimulator

from synthetic import linear_runs

KINDS = {"linear": LinearSimulator, "linear-identity": LinearIdentitySimulator, "additive": AdditiveSimulator}


@pytest.fixture(scope="module")
def runs():
    # alpha_offset 0.9: the true per-step alpha is far from 1, so effects do not add up.
    return linear_runs(num_train=24, num_test=5, num_runs=30, num_steps=25, batch=3, seed=3, alpha_offset=0.9)[0]


@pytest.fixture(scope="module")
def fitted(runs):
    return {kind: cls(ridge=0.05, dtype="float64").fit(runs) for kind, cls in KINDS.items()}


class GenericPath(LinearIdentitySimulator):
    """The same model with its own ``_simulate``, so queries take the generic ``simulate`` path."""

    kind = "linear-identity-generic"

    def _simulate(self, curricula, initial):
        return super()._simulate(curricula, initial)


def query_curriculum(runs):
    """A held-out-like curriculum with padding, a duplicate, and one step made of a single example."""
    curriculum = runs.curricula[0].copy()
    curriculum[2, 1] = PAD
    curriculum[4, 2] = curriculum[4, 0]
    curriculum[7] = [11, PAD, 11]  # removing example 11 empties step 8
    return curriculum, runs.initial_losses[0].astype(np.float64)


def explicit(simulator, curriculum, initial):
    """One plain ``simulate`` call; steps with nothing left to train on are deleted (loss held)."""
    keep = (curriculum != PAD).any(axis=1)
    trajectory = simulator.simulate(curriculum[keep], initial).astype(np.float64)
    position = np.concatenate([[0], np.cumsum(keep)])
    return trajectory[position]


@pytest.mark.parametrize("kind", list(KINDS))
def test_leave_one_out_equals_difference_of_explicit_rollouts(fitted, runs, kind):
    simulator = fitted[kind]
    curriculum, initial = query_curriculum(runs)
    result = leave_one_out(simulator, curriculum, initial)
    present = np.unique(curriculum[curriculum != PAD])
    assert np.array_equal(result.train_index, present)
    assert result.occurrences.sum() == (curriculum != PAD).sum()
    with_all = explicit(simulator, curriculum, initial)
    np.testing.assert_allclose(result.baseline, with_all, rtol=1e-6)
    for k, example in enumerate(present):
        without = explicit(simulator, np.where(curriculum == example, PAD, curriculum), initial)
        np.testing.assert_allclose(result.final_delta[k], without[-1] - with_all[-1], atol=1e-6)
        np.testing.assert_allclose(result.mean_delta[k], (without[1:] - with_all[1:]).mean(axis=0), atol=1e-6)
    helpful = result.top_helpful(3)
    assert helpful[0][1] == result.final_delta.mean(axis=1).max() and helpful[0][1] >= helpful[1][1]
    assert result.top_harmful(1, by="mean", column=2)[0][1] == result.mean_delta[:, 2].min()


def test_removing_everything_leaves_the_initial_loss(fitted, runs):
    initial = runs.initial_losses[0].astype(np.float64)
    curriculum = np.array([[3, 3], [3, PAD]])
    for simulator in (fitted["linear"], GenericPath(ridge=0.05).fit(runs)):
        result = leave_one_out(simulator, curriculum, initial)
        trajectory = simulator.simulate(curriculum, initial)
        np.testing.assert_allclose(result.final_delta[0], initial - trajectory[-1], atol=1e-6)
        np.testing.assert_allclose(result.mean_delta[0], initial - trajectory[1:].mean(axis=0), atol=1e-6)


def test_test_subset_and_generic_simulate_path_agree(fitted, runs):
    curriculum, initial = query_curriculum(runs)
    full = leave_one_out(fitted["linear-identity"], curriculum, initial)
    generic = GenericPath(ridge=0.05, dtype="float64")
    generic.__dict__.update({key: value for key, value in fitted["linear-identity"].__dict__.items()})
    subset = leave_one_out(generic, curriculum, initial, test_index=[4, 1])
    np.testing.assert_allclose(subset.final_delta, full.final_delta[:, [4, 1]], atol=1e-6)
    np.testing.assert_allclose(subset.baseline, full.baseline[:, [4, 1]], atol=1e-6)


def test_chunked_rollouts_match_one_chunk_and_bad_indices_fail(fitted, runs, monkeypatch):
    import simfluence.query

    curriculum, initial = query_curriculum(runs)
    whole = influence_over_time(fitted["linear"], curriculum, initial)
    monkeypatch.setattr(simfluence.query, "CHUNK_BYTES", 1)  # one curriculum per rollout
    np.testing.assert_array_equal(influence_over_time(fitted["linear"], curriculum, initial).final_delta,
                                  whole.final_delta)
    with pytest.raises(RunDataError, match="index out of range"):
        simulate_curricula(fitted["linear"], curriculum[None] + 100, initial)


def test_leave_group_out_interaction(fitted, runs):
    curriculum, initial = query_curriculum(runs)
    groups = {"a": [11, 3, 5], "b": [0, 1, 2, 23], "absent": [int(np.setdiff1d(np.arange(24), curriculum)[0])]}
    results = {kind: leave_group_out(fitted[kind], curriculum, initial, groups) for kind in KINDS}
    for kind, result in results.items():
        removed = np.where(np.isin(curriculum, groups["a"]), PAD, curriculum)
        expected = explicit(fitted[kind], removed, initial)[-1] - explicit(fitted[kind], curriculum, initial)[-1]
        np.testing.assert_allclose(result.final_delta[0], expected, atol=1e-6)
        singles = leave_one_out(fitted[kind], curriculum, initial)
        rows = np.isin(singles.train_index, groups["b"])
        np.testing.assert_allclose(result.final_sum[1], singles.final_delta[rows].sum(axis=0), atol=1e-6)
        assert np.all(result.final_delta[2] == 0) and np.all(result.final_sum[2] == 0)
    # Additive effects add up exactly; with alpha far from 1 they do not.
    np.testing.assert_allclose(results["additive"].final_interaction, 0, atol=1e-6)
    np.testing.assert_allclose(results["additive"].mean_interaction, 0, atol=1e-6)
    assert np.abs(results["linear"].final_interaction[:2]).max() > 1e-3
    assert np.abs(results["linear-identity"].final_interaction[:2]).max() > 1e-4
    with pytest.raises(ValueError, match=r"groups\['x'\]"):
        leave_group_out(fitted["linear"], curriculum, initial, {"x": [99]})


def test_apply_edits_by_hand():
    curriculum = np.array([[0, 1], [2, PAD], [3, 0]], dtype=np.int32)
    assert apply_edits(curriculum, [Edit("drop", 0)]).tolist() == [[PAD, 1], [2, PAD], [3, PAD]]
    assert apply_edits(curriculum, [Edit("insert", 5, (2,))]).tolist() == [[0, 1], [2, 5], [3, 0]]
    widened = apply_edits(curriculum, [Edit("insert", 5, (1,))])
    assert widened.tolist() == [[0, 1, 5], [2, PAD, PAD], [3, 0, PAD]]
    assert apply_edits(curriculum, [Edit("duplicate", 0)]).tolist() == [[0, 1, 0], [2, PAD, PAD], [3, 0, 0]]
    assert apply_edits(curriculum, [Edit("swap", steps=(1, 3))]).tolist() == [[3, 0], [2, PAD], [0, 1]]
    assert apply_edits(curriculum, [Edit("move", steps=(1, 3))]).tolist() == [[2, PAD], [3, 0], [0, 1]]
    shuffled = apply_edits(curriculum, [Edit("shuffle", seed=4)])
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, curriculum.tolist()))
    with pytest.raises(ValueError, match="outside the curriculum's steps 1..3"):
        apply_edits(curriculum, [Edit("insert", 1, (4,))])
    with pytest.raises(ValueError, match="example 0 is not in the curriculum"):
        apply_edits(curriculum, [Edit("drop", 0), Edit("duplicate", 0)])


def test_parse_edit_by_id_or_index():
    ids = np.array([f"train-{i}" for i in range(10)])
    assert parse_edit("drop:train-7", ids) == Edit("drop", 7)
    assert parse_edit("insert:3@12", ids) == Edit("insert", 3, (12,))
    assert parse_edit("shuffle:5", ids) == Edit("shuffle", seed=5)
    assert parse_edit("move:2,9", ids) == Edit("move", steps=(2, 9))
    for text, message in (("drop:nope", "unknown training id 'nope'"), ("insert:train-1", "insert:ID@STEP"),
                          ("flip:3", "KIND:ARGUMENT"), ("swap:1", "swap:STEP,STEP"), ("shuffle:x", "seed")):
        with pytest.raises(ValueError, match=message):
            parse_edit(text, ids)


def test_whatif_against_explicit_rollouts(fitted, runs):
    curriculum, initial = query_curriculum(runs)
    simulator = fitted["linear"]
    result = whatif(simulator, curriculum, initial, ["drop:train-11", "insert:train-3@8", "shuffle:1"],
                    test_index=[0, 2])
    edited = apply_edits(curriculum, [Edit("drop", 11), Edit("insert", 3, (8,)), Edit("shuffle", seed=1)])
    assert np.array_equal(result.curriculum, edited)
    np.testing.assert_allclose(result.after, explicit(simulator, edited, initial)[:, [0, 2]], atol=1e-6)
    np.testing.assert_allclose(result.before, explicit(simulator, curriculum, initial)[:, [0, 2]], atol=1e-6)
    # Additive: order never changes L_T, and a duplicate adds its B once more per occurrence.
    additive = fitted["additive"]
    _, b = additive.coefficients
    shuffled = whatif(additive, curriculum, initial, [Edit("shuffle", seed=2)])
    np.testing.assert_allclose(shuffled.final_change, 0, atol=1e-6)
    doubled = whatif(additive, curriculum, initial, [Edit("duplicate", 5)])
    np.testing.assert_allclose(doubled.final_change, (curriculum == 5).sum() * b[5], atol=1e-6)


def test_influence_over_time(fitted, runs):
    curriculum, initial = query_curriculum(runs)
    _, b = fitted["additive"].coefficients
    additive = influence_over_time(fitted["additive"], curriculum, initial)
    slots = curriculum != PAD
    np.testing.assert_allclose(additive.final_delta[slots], -b[curriculum[slots]], atol=1e-6)
    assert np.isnan(additive.final_delta[~slots]).all()
    simulator = fitted["linear"]
    result = influence_over_time(simulator, curriculum, initial, test_index=[1])
    with_all = explicit(simulator, curriculum, initial)[-1, 1]
    for step, slot in [(0, 0), (4, 2), (7, 0), (24, 1)]:
        edited = curriculum.copy()
        edited[step, slot] = PAD
        assert result.final_delta[step, slot, 0] == pytest.approx(explicit(simulator, edited, initial)[-1, 1]
                                                                  - with_all, abs=1e-6)
    step, example, delta = result.top_moments(1)[0]
    assert np.nanmax(np.abs(result.final_delta)) == abs(delta) and example in curriculum[step - 1]
    train_index, matrix = result.matrix()
    assert matrix.shape == (train_index.size, curriculum.shape[0])
    k = int(np.searchsorted(train_index, curriculum[4, 0]))
    assert matrix[k, 4] == pytest.approx(result.final_delta[4, 0, 0] + result.final_delta[4, 2, 0])
    assert np.isnan(matrix[k]).sum() == curriculum.shape[0] - (curriculum == curriculum[4, 0]).any(axis=1).sum()


def test_optimize_finds_known_optimum_of_additive_simulator(fitted, runs):
    simulator = fitted["additive"]
    _, b = simulator.coefficients
    targets = np.array([0, 3])
    initial = runs.initial_losses[0]
    result = optimize(simulator, initial, targets, budget=4, num_steps=10, batch_size=2, beam_width=2,
                      num_random=50)
    # T * B = 20 slots, 5 each for K = 4 examples: L_T = L_0 + 5 sum_{i in S} B_i, minimised by
    # the 4 examples with the most negative mean B over the targets, in any order.
    best = np.argsort(b[:, targets].mean(axis=1))[:4]
    assert set(result.order.tolist()) == set(best.tolist())
    expected = initial[targets].mean() + 5 * b[best][:, targets].sum(axis=0).mean()
    assert result.objective == pytest.approx(expected, abs=1e-6)
    assert result.objective < result.random_best
    assert result.random_curricula.shape == (50, 10, 2)
    np.testing.assert_array_equal(result.curriculum, epoch_curricula(result.order[None], 10, 2)[0])


def test_optimize_linear_beats_random_and_matches_simulate(fitted, runs):
    simulator = fitted["linear-identity"]
    initial = runs.initial_losses[0]
    result = optimize(simulator, initial, [1, 2], budget=6, num_steps=12, batch_size=3, num_random=100, seed=1)
    simulated = simulator.simulate(result.curriculum, initial)[-1, [1, 2]].mean()
    assert result.objective == pytest.approx(simulated, abs=1e-6)
    assert result.objective < result.random_best < result.random_median
    assert result.history[-1] == result.objective
    randoms = simulate_curricula(simulator, result.random_curricula, initial, [1, 2])[:, -1].mean(axis=1)
    np.testing.assert_allclose(result.random_objectives, randoms, atol=1e-6)
    with pytest.raises(ValueError, match="budget: 40 distinct examples do not fit"):
        optimize(simulator, initial, [1], budget=40, num_steps=12, batch_size=3)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_queries_end_to_end(fitted, runs, tmp_path):
    model = tmp_path / "model.npz"
    fitted["linear-identity"].save(model)
    save_runs(runs, tmp_path / "runs.npz")
    result = invoke("attribute", model, "--curriculum", tmp_path / "runs.npz", "--run", 2, "--test", "test-1",
                    "--top", 3, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    expected = leave_one_out(fitted["linear-identity"], runs.curricula[2], runs.initial_losses[2], [1])
    assert [row["index"] for row in record["helpful"]] == [i for i, _ in expected.top_helpful(3)]
    assert record["helpful"][0]["final_delta"] == pytest.approx(expected.top_helpful(1)[0][1])
    result = invoke("attribute", model, "--curriculum", tmp_path / "runs.npz", "--group", "g=train-1,train-2,5")
    assert result.exit_code == 0 and "interaction" in result.output, result.output

    result = invoke("optimize", model, "--test-set", "test-0,test-3", "--budget", 5, "--steps", 10,
                    "--initial", tmp_path / "runs.npz", "--random", 30, "--out", tmp_path / "best.npz",
                    "--plot", tmp_path / "opt.png")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "best.npz") as best:
        assert best["curriculum"].shape == (10, runs.batch_size) and best["objective"] < np.median(
            best["random_objectives"])
        first = int(best["order"][0])
    result = invoke("whatif", model, "--curriculum", tmp_path / "best.npz", "--edit", "shuffle:3", "--edit",
                    f"drop:{first}", "--test", "test-0", "--plot", tmp_path / "whatif.png")
    assert result.exit_code == 0 and "before" in result.output, result.output
    result = invoke("influence-over-time", model, "--curriculum", tmp_path / "runs.npz", "--test", "test-4",
                    "--top", 4, "--plot", tmp_path / "heat.png")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1 + 4 + 1
    for name in ("opt.png", "whatif.png", "heat.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (("attribute", "{model}", "--curriculum", "{runs}", "--test", "nope"), "--test: unknown test id 'nope'"),
    (("whatif", "{model}", "--curriculum", "{runs}", "--edit", "drop:nope"), "unknown training id 'nope'"),
    (("whatif", "{model}", "--curriculum", "{runs}", "--edit", "insert:3@999"), "step 999 is outside"),
    (("attribute", "{model}", "--curriculum", "{runs}", "--run", 99), "--run: 99 is out of range"),
    (("attribute", "{model}", "--curriculum", "{runs}", "--group", "nogroup"), "expected NAME=id"),
    (("influence-over-time", "{model}", "--curriculum", "{bare}", "--test", 0), "field 'initial_losses'"),
    (("optimize", "{model}", "--test-set", "0", "--budget", 999, "--steps", 5, "--initial", "{runs}"),
     "budget: 999"),
])
def test_cli_query_errors_are_one_line(fitted, runs, tmp_path, args, message):
    paths = {"model": tmp_path / "model.npz", "runs": tmp_path / "runs.npz", "bare": tmp_path / "bare.npz"}
    fitted["linear"].save(paths["model"])
    save_runs(runs, paths["runs"])
    np.savez(paths["bare"], curriculum=runs.curricula[0])
    result = invoke(*[str(a).format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output
