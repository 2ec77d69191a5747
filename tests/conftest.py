import os

# The Triton interpreter must be chosen before any Triton kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def generator():
    """A seeded generator: tests never touch the global RNG."""
    g = torch.Generator()
    g.manual_seed(0)
    return g
