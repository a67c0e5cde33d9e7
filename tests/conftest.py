"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: intra-op threads only add overhead (and thrash on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
