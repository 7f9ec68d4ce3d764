"""`fit` never changes a simulator's settings: fitting one object twice equals two fresh objects."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import linear_runs

from simfluence.simulators import make_simulator

FAST = {"linear": {}, "linear-identity": {}, "additive": {}, "mean-trajectory": {}, "constant": {},
        "linear-trajectory": {}, "auto": {}, "linear-bootstrap": {"replicas": 8}}


def _two_run_sets():
    first = linear_runs(num_train=20, num_test=4, num_runs=12, num_steps=12, batch=3, seed=11)[0]
    second = linear_runs(num_train=20, num_test=4, num_runs=14, num_steps=12, batch=3, seed=12,
                         alpha_offset=0.97)[0]
    return first, second


def _same(kind: str, params: dict, first, second) -> None:
    reused = make_simulator(kind, **params)
    before = reused.settings()
    reused.fit(first)
    reused.fit(second)
    fresh = make_simulator(kind, **params).fit(second)
    assert reused.settings() == before, f"{kind}: fit changed the settings"
    curricula, initial = second.curricula[:3], second.initial_losses[:3]
    np.testing.assert_allclose(reused.simulate(curricula, initial), fresh.simulate(curricula, initial),
                               rtol=1e-5, atol=1e-6, err_msg=kind)


@pytest.mark.parametrize("kind", sorted(FAST))
def test_fitting_twice_equals_a_fresh_fit(kind):
    """Settings unchanged, and simulations equal to a fresh object's fitted on the second runs only."""
    first, second = _two_run_sets()
    _same(kind, FAST[kind], first, second)


def test_gradient_methods_and_featurized_read_the_task_of_the_runs_they_are_fitted_on(tmp_path):
    """A second fit on runs of another task configuration must not reuse the first runs' task."""
    from simfluence.collect import collect
    from simfluence.runs import load_runs
    from simfluence.tasks import get_task

    first = load_runs(collect(get_task("digits-mlp", num_train=30, num_test=6, learning_rate=0.03),
                              tmp_path / "a", num_runs=3, num_steps=6, progress=False).root)
    second = load_runs(collect(get_task("digits-mlp", num_train=30, num_test=6, learning_rate=0.3),
                               tmp_path / "b", num_runs=3, num_steps=6, progress=False).root)
    for kind in ("grad-dot", "tracin-cp", "featurized"):
        _same(kind, {}, first, second)
