"""Leave-one-out, leave-group-out, what-if and influence over time against explicit rollouts."""

import numpy as np
import pytest
from query_cases import KINDS, explicit, query_curriculum

from simfluence.query import Edit, apply_edits, influence_over_time, leave_group_out, leave_one_out, whatif
from simfluence.runs import PAD


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


def test_removals_under_a_batch_mean_loss_rescale_the_rest_of_the_batch(runs):
    """Additive, batch-mean: dropping i from a step of n leaves n/(n-1) x the others: delta = (S - n B_i) / (n - 1)."""
    additive = KINDS["additive"](ridge=0.05, dtype="float64").fit(runs)
    assert additive.config.batch_mean
    curriculum, initial = query_curriculum(runs)
    _, b = additive.coefficients
    result = influence_over_time(additive, curriculum, initial)
    n = runs.batch_size
    for step, slot in [(0, 0), (4, 2), (24, 1)]:
        batch = curriculum[step]
        total = b[batch[batch != PAD]].sum(axis=0)
        expected = (total - n * b[batch[slot]]) / (n - 1)
        np.testing.assert_allclose(result.final_delta[step, slot], expected, atol=1e-6)
    # A duplicate joins the batch mean of its step (a plain loop over steps as the reference).
    def final_change(c):
        return sum(n / (row != PAD).sum() * b[row[row != PAD]].sum(axis=0) for row in c if (row != PAD).any())

    example = int(curriculum[4, 0])
    doubled = whatif(additive, curriculum, initial, [Edit("duplicate", example)])
    edited = apply_edits(curriculum, [Edit("duplicate", example)])
    np.testing.assert_allclose(doubled.final_change, final_change(edited) - final_change(curriculum), atol=1e-6)
