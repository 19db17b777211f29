import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: a second intra-op thread buys nothing, and on a shared 2-core machine
    # OpenMP's spin-waiting made the overfit test 7x slower (18 s vs 2.4 s) when other work ran.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
