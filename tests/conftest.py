"""Shared fixtures."""

import pytest
import torch

from simfluence import RunSet
from synthetic import linear_runs


@pytest.fixture
def small_runs() -> RunSet:
    return linear_runs()[0]


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one thread, and are not slowed by a busy machine.

    Directories of such tests use it for every test (``pytestmark`` or an autouse wrapper).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
