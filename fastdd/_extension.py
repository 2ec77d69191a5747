"""Loads the compiled extension ``fastdd._C`` once and says what it provides.

Importing ``fastdd._C`` registers the ``torch.ops.fastdd`` operators (schemas and their CPU, and optionally CUDA,
kernels). When it is missing or broken, fastdd still works through the pure-PyTorch references; ``load_error()``
explains why, for ``fastdd info`` and for the error raised when a compiled backend is requested explicitly.
"""

from __future__ import annotations

import functools
import importlib
import json
import warnings
from pathlib import Path
from types import ModuleType

import torch  # loads libtorch, which fastdd._C links against

from fastdd.errors import FastddWarning

# Written by setup.py beside fastdd._C: the torch the extension was compiled against.
BUILD_RECORD = Path(__file__).with_name("_C_build.json")
REBUILD_HINT = ("rebuild it against this torch with `pip install --no-build-isolation -e .` (or `python setup.py "
                "build_ext --inplace`)")


def built_against() -> str | None:
    """The torch version ``fastdd._C`` was compiled against (from its build record), or None when unrecorded."""
    try:
        return str(json.loads(BUILD_RECORD.read_text())["torch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    """Import ``fastdd._C`` unless its build record names another torch (its ABI may not match: loading it could
    fail or crash); when it is refused or fails for a reason other than not being built, say so once."""
    recorded = built_against()
    if recorded is not None and recorded != torch.__version__:
        reason = f"fastdd._C was built against torch {recorded}, and this is torch {torch.__version__}"
        warnings.warn(f"{reason}; fastdd uses its pure-PyTorch reference ops (slower); {REBUILD_HINT}.",
                      FastddWarning, stacklevel=2)
        return None, reason
    try:
        return importlib.import_module("fastdd._C"), None
    except ModuleNotFoundError as error:  # not built: the references serve, `fastdd info` says why
        return None, f"{type(error).__name__}: {error}"
    except (ImportError, OSError) as error:  # built against another torch (undefined symbols), or damaged
        reason = f"{type(error).__name__}: {error}"
        warnings.warn(f"fastdd._C could not be loaded ({reason.splitlines()[0]}); fastdd uses its pure-PyTorch "
                      f"reference ops (slower); {REBUILD_HINT}.", FastddWarning, stacklevel=2)
        return None, reason


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
