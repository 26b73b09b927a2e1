"""Shared test settings: tiny models run fastest (and steadiest on a loaded machine) on one thread."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
