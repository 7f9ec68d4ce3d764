"""Fixtures of the query tests: synthetic linear runs and every simulator kind fitted on them.

The helpers (kinds, the query curriculum, explicit rollouts) live in tests/query_cases.py.
"""

import pytest
from query_cases import KINDS
from synthetic import linear_runs


@pytest.fixture(scope="module")
def runs():
    # alpha_offset 0.9: the true per-step alpha is far from 1, so effects do not add up.
    return linear_runs(num_train=24, num_test=5, num_runs=30, num_steps=25, batch=3, seed=3, alpha_offset=0.9)[0]


@pytest.fixture(scope="module")
def fitted(runs):
    # Sums over the batch (batch_mean=False) keep the closed forms of these tests simple; the
    # batch-mean weighting of edited steps has its own test (test_attribution.py).
    return {kind: cls(ridge=0.05, dtype="float64", batch_mean=False).fit(runs) for kind, cls in KINDS.items()}
