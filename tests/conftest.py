import os

# The Triton interpreter must be chosen before any Triton kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Tests run many tiny ops: one thread avoids the cost of waking a second one (large when the machine is busy),
# and keeps timings stable. Bit-identity tests compare runs within this one setting.
torch.set_num_threads(1)


@pytest.fixture
def generator():
    """A seeded generator: tests never touch the global RNG."""
    g = torch.Generator()
    g.manual_seed(0)
    return g


@pytest.fixture(scope="session")
def digits():
    """The embedded digits dataset, loaded once (a module may define its own ``digits`` instead)."""
    from fastdd.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def experts(digits, tmp_path_factory):
    """The tiny trajectory-matching experts of tests/tiny_trajectory.py, trained once per session."""
    from tiny_trajectory import tiny_experts

    return tiny_experts(digits, tmp_path_factory.mktemp("experts"))
