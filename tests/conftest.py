import pyro
import pytest
import torch

# Tiny networks run far faster on one thread than on two competing ones.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Every test starts from an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
