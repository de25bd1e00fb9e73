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


def pytest_configure(config):
    """Under pytest-xdist (``-n auto``: the suite's default, see pyproject.toml), each worker process gets its
    share of the cores as intra-op threads, so that the workers do not each spread over every core."""
    import os
    if os.environ.get("PYTEST_XDIST_WORKER"):
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
