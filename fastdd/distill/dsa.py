"""DSA: gradient matching with differentiable siamese augmentation (Zhao & Bilen)."""

from __future__ import annotations

from dataclasses import dataclass

from fastdd.distill.dc import DC, GradientMatchingConfig


@dataclass
class DSAConfig(GradientMatchingConfig):
    dsa: bool = True


class DSA(DC):
    """DC with the same augmentation on the real and synthetic batch of a class, and augmentation in the inner loop."""

    name = "dsa"
    config_class = DSAConfig
