"""Shared fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny float64 ops: on a shared, busy 2-core
    machine every small parallel op waits on a descheduled worker (tens of ms each); the
    results are the same."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
