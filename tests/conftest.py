"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Unit tests run many tiny ops: one torch thread is faster and steadier than several
    (no OpenMP hand-offs, no spin-waiting when the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
