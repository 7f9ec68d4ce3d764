"""Rollout machinery: empty steps hold the loss, column subsets and the generic path agree, chunks agree."""

import numpy as np
import pytest
from query_cases import GenericPath, query_curriculum

from simfluence.query import influence_over_time, leave_one_out, simulate_curricula
from simfluence.runs import PAD, RunDataError


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
    import simfluence.query.rollout

    curriculum, initial = query_curriculum(runs)
    whole = influence_over_time(fitted["linear"], curriculum, initial)
    monkeypatch.setattr(simfluence.query.rollout, "CHUNK_BYTES", 1)  # one curriculum per rollout
    np.testing.assert_array_equal(influence_over_time(fitted["linear"], curriculum, initial).final_delta,
                                  whole.final_delta)
    with pytest.raises(RunDataError, match="index out of range"):
        simulate_curricula(fitted["linear"], curriculum[None] + 100, initial)
