"""Backend choice shared by the compiled ops of fastdd.ops: which backends can run some tensors, and auto's pick."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from fastdd import _extension
from fastdd.precision import HALF_DTYPES, compute_dtype  # noqa: F401 (the ops import them from here)

BACKENDS = ("auto", "reference", "cpp", "triton")

# The compiled kernels (C++, CUDA, Triton) are written for these dtypes; others go to the reference. Half precision
# (what torch.autocast hands the ops) follows fastdd.precision's rule: loaded as is, computed in compute_dtype,
# results stored in the input's dtype; the references upcast the same way.
KERNEL_DTYPES = (torch.float32, torch.float64, *HALF_DTYPES)


@functools.cache
def triton_module(name: str) -> tuple[ModuleType | None, str | None]:
    """``(fastdd.kernels.<name>, None)``, or ``(None, why it could not be imported)``."""
    try:
        return importlib.import_module(f"fastdd.kernels.{name}"), None
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"


def unavailable_reason(backend: str, tensor: Tensor, *, triton_kernel: str, cuda_kernel: bool) -> str | None:
    """Why ``backend`` cannot run an op on tensors like ``tensor``, or None when it can.

    Args:
        backend: ``"reference"``, ``"cpp"`` or ``"triton"``.
        tensor: the op's main input (its dtype and device decide).
        triton_kernel: the op's module name under ``fastdd.kernels``.
        cuda_kernel: whether ``csrc/cuda`` has a kernel for the op (otherwise ``cpp`` is CPU-only).
    """
    if backend == "reference":
        return None
    if tensor.dtype not in KERNEL_DTYPES:
        return (
            f"its kernels support float32, float64, bfloat16 and float16, got {tensor.dtype}; use backend='reference'"
        )
    device = tensor.device.type
    if backend == "cpp":
        if not _extension.has_cpp():
            return (
                f"the compiled extension fastdd._C did not load ({_extension.load_error()}); build it with "
                "`python setup.py build_ext --inplace` or reinstall fastdd"
            )
        if device == "cuda" and not cuda_kernel:
            return "fastdd._C has a CPU kernel only for this op; use backend='triton' on CUDA"
        if device == "cuda" and not _extension.has_cuda_kernels():
            return "fastdd._C was built without CUDA kernels; rebuild it with a CUDA toolkit or use backend='triton'"
        if device not in ("cpu", "cuda"):
            return f"fastdd._C has no kernel for {device} tensors"
        return None
    if device != "cuda" and not (device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"Triton kernels need CUDA tensors (got {device}), or TRITON_INTERPRET=1 set before fastdd imports them"
    module, error = triton_module(triton_kernel)
    if module is None:
        return f"fastdd.kernels.{triton_kernel} could not be imported ({error})"
    return None


def choose_backend(op: str, backend: str, tensor: Tensor, *, triton_kernel: str, cuda_kernel: bool) -> str:
    """The backend ``op`` runs for ``tensor``: ``backend`` itself, or auto's choice (CUDA tensor: triton, then cpp
    when it has a CUDA kernel; CPU tensor: cpp; else reference).

    Raises ValueError for an unknown name and RuntimeError, with the reason, for a backend that cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown {op} backend {backend!r}; valid backends are {', '.join(BACKENDS)}")

    def reason(name: str) -> str | None:
        return unavailable_reason(name, tensor, triton_kernel=triton_kernel, cuda_kernel=cuda_kernel)

    if backend == "auto":
        preferred: Sequence[str] = ("triton", "cpp") if tensor.device.type == "cuda" else ("cpp",)
        return next((name for name in preferred if reason(name) is None), "reference")
    why = reason(backend)
    if why is not None:
        raise RuntimeError(f"{op} backend {backend!r} is unavailable: {why}")
    return backend
