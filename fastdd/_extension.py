"""Loads the compiled extension ``fastdd._C`` once and says what it provides.

Importing ``fastdd._C`` registers the ``torch.ops.fastdd`` operators (schemas and their CPU, and optionally CUDA,
kernels). When it is missing or broken, fastdd still works through the pure-PyTorch references; ``load_error()``
explains why, for ``fastdd info`` and for the error raised when a compiled backend is requested explicitly.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch  # noqa: F401  (loads libtorch, which fastdd._C links against)


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("fastdd._C"), None
    except (ImportError, OSError) as error:  # not built, or built against another torch (undefined symbols)
        return None, f"{type(error).__name__}: {error}"


def has_cpp() -> bool:
    """True when ``fastdd._C`` imported, i.e. the ``torch.ops.fastdd`` operators have CPU kernels."""
    return _load()[0] is not None


def has_cuda_kernels() -> bool:
    """True when ``fastdd._C`` was built with its CUDA kernels (it says nothing about a GPU being present)."""
    module = _load()[0]
    return module is not None and bool(getattr(module, "cuda_kernels", 0))


def load_error() -> str | None:
    """Why ``fastdd._C`` could not be imported (exception type and message), or None when it loaded."""
    return _load()[1]
