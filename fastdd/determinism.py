"""Deterministic mode: the same seed gives a bit-identical result on GPU as it already does on CPU.

On CPU every fastdd op and every torch kernel it uses is deterministic. On CUDA some are not: torch's float atomics
(``index_add_``, scatters, some convolution algorithms) and fastdd's own scatter kernels (the Triton adjoint of
``diff_augment``, the CUDA backward of ``nearest_synthetic``) add in whatever order the threads arrive. Deterministic
mode switches torch to its deterministic algorithms and makes ``fastdd.ops`` pick order-fixed backends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# cuBLAS needs a fixed workspace to be deterministic; it reads this variable when it creates its first handle.
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"


def deterministic_enabled() -> bool:
    """Whether torch's deterministic algorithms are on (fastdd's ops follow the same switch)."""
    return torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Run the block with torch's deterministic algorithms on (``enabled``), restoring the previous mode after.

    Also sets ``CUBLAS_WORKSPACE_CONFIG`` (unless already set) so cuBLAS matmuls are deterministic; that takes
    effect only if no cuBLAS handle exists yet, which holds when a command enters this before its first GPU work.
    ``enabled=False`` leaves everything as it is.
    """
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
