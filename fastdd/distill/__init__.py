"""Distillation methods on one Distiller interface, and the runner that drives them."""

from __future__ import annotations

from fastdd.config import DistillConfig, DMConfig, DSAConfig, GradientMatchingConfig, TrajectoryConfig
from fastdd.config.options import normalize_choice
from fastdd.distill.base import Distiller
from fastdd.distill.batched_students import batched_match_gradients
from fastdd.distill.dc import DC, loops_for_ipc
from fastdd.distill.dm import DM
from fastdd.distill.dsa import DSA
from fastdd.distill.gradient_distance import gradient_distance
from fastdd.distill.mtt import MTT, TESLA, TESLACompat
from fastdd.distill.runner import run_distillation
from fastdd.distill.trajectory import match_gradients
from fastdd.errors import FastddError

DISTILLERS: dict[str, type[Distiller]] = {cls.name: cls for cls in (DC, DSA, DM, MTT, TESLA, TESLACompat)}


def get_distiller(method: str) -> type[Distiller]:
    """The Distiller class registered as ``method``; an unknown name raises FastddError listing the known ones."""
    try:
        return DISTILLERS[normalize_choice(method)]
    except KeyError:
        raise FastddError(
            f"unknown method {method!r}; choose one of {', '.join(sorted(DISTILLERS))}."
        ) from None


__all__ = [
    "DC",
    "DISTILLERS",
    "DM",
    "DMConfig",
    "DSA",
    "DSAConfig",
    "DistillConfig",
    "Distiller",
    "GradientMatchingConfig",
    "MTT",
    "TESLA",
    "TESLACompat",
    "TrajectoryConfig",
    "batched_match_gradients",
    "get_distiller",
    "gradient_distance",
    "loops_for_ipc",
    "match_gradients",
    "run_distillation",
]
