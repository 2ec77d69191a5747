"""fastdd: fast, trustworthy dataset distillation."""

__version__ = "0.1.0"

from fastdd.errors import FastddError, FastddWarning

__all__ = ["FastddError", "FastddWarning", "__version__"]
