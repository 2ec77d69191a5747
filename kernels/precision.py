"""The dtype rule of every Triton kernel of fastdd: bfloat16 and float16 inputs are loaded as they are, computed on
and accumulated in float32, and results are stored in the inputs' dtype; float32 and float64 inputs compute as they
are. Launchers allocate their intermediate buffers (statistics, partial sums, scatter targets) in the compute dtype.
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bfloat16 and float16, ``dtype`` itself otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype
