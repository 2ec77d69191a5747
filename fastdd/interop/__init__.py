"""Synthetic sets and other dataset-distillation tools: sets they wrote read into fastdd sets (`import_synthetic_set`),
fastdd sets written in the layouts they read (`export_synthetic_set`), and the pixel conventions each follows."""

from fastdd.interop.conventions import NORMALIZATIONS, normalization_statistics
from fastdd.interop.exporting import EXPORT_FORMATS, export_synthetic_set
from fastdd.interop.importing import (
    IMPORT_FORMATS,
    SOFT_LABEL_FORMS,
    import_synthetic_set,
)

__all__ = [
    "EXPORT_FORMATS",
    "IMPORT_FORMATS",
    "NORMALIZATIONS",
    "SOFT_LABEL_FORMS",
    "export_synthetic_set",
    "import_synthetic_set",
    "normalization_statistics",
]
