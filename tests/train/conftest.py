"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """One torch thread and a fixed seed for the test, restored after: figures that do not depend on the host's
    cores (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
