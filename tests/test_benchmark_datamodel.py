"""benchmarks/datamodel.py: its leave-one-out shortcut and features against direct computation."""

import numpy as np
from benchmark_scripts import load_benchmark

from simfluence.runs.log import PAD

datamodel = load_benchmark("datamodel")


def test_leave_one_out_equals_refitting_without_each_run():
    rng = np.random.default_rng(0)
    features, targets, new = rng.normal(size=(12, 7)), rng.normal(size=(12, 3)), rng.normal(size=(4, 7))
    strength = np.array([0.3])
    predicted, error = datamodel.loo_ridge(features, targets, new, strength)
    scale = np.trace((features - features.mean(0)) @ (features - features.mean(0)).T) / 12

    def fit(x, y):  # intercept unpenalised: ridge on centred data, intercept from the means
        mx, my = x.mean(0), y.mean(0)
        w = np.linalg.solve((x - mx).T @ (x - mx) + strength[0] * scale * np.eye(x.shape[1]), (x - mx).T @ (y - my))
        return lambda z: my + (z - mx) @ w

    np.testing.assert_allclose(predicted, fit(features, targets)(new), rtol=1e-10)
    residuals = [fit(np.delete(features, r, 0), np.delete(targets, r, 0))(features[r:r + 1])[0] - targets[r]
                 for r in range(12)]
    np.testing.assert_allclose(error, (np.array(residuals) ** 2).mean(0), rtol=1e-10)


def test_features_count_occurrences_and_skip_padding():
    curricula = np.array([[[0, 1], [1, PAD], [2, 2]]])                 # [R=1, T=3, B=2]
    np.testing.assert_array_equal(datamodel.curriculum_features(curricula, 4, "counts", None), [[1, 2, 2, 0]])
    rates = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(datamodel.curriculum_features(curricula, 4, "rates", rates), [[0.5, 1.5, 3.0, 0]])
    blocks = datamodel.curriculum_features(curricula, 4, "blocks", None)
    assert blocks.shape == (1, 20) and blocks.sum() == 5
