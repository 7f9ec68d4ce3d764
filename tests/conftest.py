"""Shared fixtures."""

import pytest

from simfluence import RunSet
from synthetic import linear_runs


@pytest.fixture
def small_runs() -> RunSet:
    return linear_runs()[0]
