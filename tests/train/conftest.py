import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # CPU float results depend on the thread count (reduction order), and on a shared 2-core machine
    # two threads that wait for each other are 10x slower than one: pin it for training tests.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
