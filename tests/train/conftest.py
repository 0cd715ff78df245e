"""Training tests run single-threaded: tiny matmuls gain nothing from threads, and on a shared
2-core machine one thread keeps their run time steady."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
