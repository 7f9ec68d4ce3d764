"""Fixtures for the peer tests; the tiny tasks live in tests/peer_tasks.py."""

import pytest

from peer_tasks import SIZES
from simfluence.collect import UniformSampler
from simfluence.tasks import DigitsMLP

pytest.importorskip("trak")
pytest.importorskip("kronfluence")
pytest.importorskip("captum")


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def digits():
    return DigitsMLP(**SIZES)


@pytest.fixture(scope="session")
def curricula(digits):
    """int32 [3, 20, 4]: three 20-step runs."""
    sampler = UniformSampler(digits.default_pool(), digits.batch_size)
    return sampler.sample_many(20, seeds=range(3))
