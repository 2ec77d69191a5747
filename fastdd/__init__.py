"""fastdd: fast, trustworthy dataset distillation."""

__version__ = "0.1.0"

from fastdd.errors import FastddError

__all__ = ["FastddError", "__version__"]
