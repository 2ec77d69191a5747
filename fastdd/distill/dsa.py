"""DSA: gradient matching with differentiable siamese augmentation (Zhao & Bilen)."""

from __future__ import annotations

from fastdd.config import DSAConfig
from fastdd.distill.dc import DC


class DSA(DC):
    """DC with the same augmentation on the real and synthetic batch of a class, and augmentation in the inner loop."""

    name = "dsa"
    config_class = DSAConfig
