"""Fixtures for the collection tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models train fastest on one thread, and are not slowed by a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
