"""How other dataset-distillation tools store pixels: which mean and standard deviation normalise a set's images.

fastdd keeps a set in its dataset's model space: ``(x - mean) / std`` of the [0, 1] pixels ``x`` with the dataset's
registered statistics, or ZCA-whitened. Other tools agree on ZCA (kornia's ``ZCAWhitening(eps=0.1)`` fitted on the
[0, 1] training images, as `fastdd.data.zca.ZCA` does) but not on the statistics: the MTT code and DD-Ranking
normalise CIFAR-100 with the CIFAR-10 statistics (their ``get_dataset``), while DC and DC-BENCH use CIFAR-100's own.
A normalisation is named here by whose statistics it uses:

- ``dataset``: the dataset's own (fastdd's registered values, which are DC's up to rounding);
- ``cifar10``: CIFAR-10's, whatever the dataset (three channels only);
- ``none``: the [0, 1] pixels themselves.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastdd.config.artifacts import NORMALIZATIONS
from fastdd.errors import FastddError

# The tools fastdd exports to, and the normalisation each expects for a dataset (the default: its own statistics).
_TOOL_NORMALIZATION = {
    "mtt": {"cifar100": "cifar10"},
    "ddranking": {"cifar100": "cifar10"},
    "dc-bench": {},
}

Statistics = tuple[tuple[float, ...], tuple[float, ...]]


def normalization_statistics(
    normalization: str, *, dataset_mean: Sequence[float], dataset_std: Sequence[float]
) -> Statistics | None:
    """The ``(mean, std)`` per channel that ``normalization`` divides by, or None for ``none``.

    Args:
        normalization: one of ``NORMALIZATIONS``.
        dataset_mean, dataset_std: the dataset's own statistics (its channel count decides ``cifar10``'s fit).
    Raises:
        FastddError: an unknown normalisation, or ``cifar10`` for a dataset without three channels.
    """
    if normalization == "none":
        return None
    if normalization == "dataset":
        return tuple(map(float, dataset_mean)), tuple(map(float, dataset_std))
    if normalization == "cifar10":
        from fastdd.data.registry import get_spec

        if len(dataset_mean) != 3:
            raise FastddError(f"--normalization cifar10 needs three-channel images; this dataset has "
                              f"{len(dataset_mean)} channel(s).")
        spec = get_spec("cifar10")
        return spec.mean, spec.std
    raise FastddError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}.")


def tool_normalization(tool: str, dataset: str) -> str:
    """The normalisation ``tool`` (``mtt``, ``ddranking``, ``dc-bench``) uses for ``dataset``."""
    return _TOOL_NORMALIZATION[tool].get(dataset, "dataset")


def unit_pixels_from(images: torch.Tensor, statistics: Statistics | None) -> torch.Tensor:
    """``[K, C, H, W]`` images normalised with ``statistics`` back to [0, 1] pixel space (a new tensor: float64 for
    float64 input, else float32)."""
    if statistics is None:
        return images.to(torch.float32, copy=True)
    mean, std = (torch.tensor(s, dtype=images.dtype).view(1, -1, 1, 1) for s in statistics)
    return (images * std + mean).to(torch.float32) if images.dtype != torch.float64 else images * std + mean


def normalized_with(unit_images: torch.Tensor, statistics: Statistics | None) -> torch.Tensor:
    """``[K, C, H, W]`` [0, 1]-space images normalised with ``statistics`` (a new float32 tensor)."""
    if statistics is None:
        return unit_images.to(torch.float32, copy=True)
    mean, std = (torch.tensor(s, dtype=unit_images.dtype).view(1, -1, 1, 1) for s in statistics)
    return ((unit_images - mean) / std).to(torch.float32)


def renormalized(images: torch.Tensor, source: Statistics | None, target: Statistics | None) -> torch.Tensor:
    """``[K, C, H, W]`` images normalised with ``source`` re-normalised with ``target`` (float32; computed in float64,
    and an exact copy when the two are the same, so a set goes out and back bit for bit)."""
    if source == target:
        return images.to(torch.float32, copy=True)
    return normalized_with(unit_pixels_from(images.to(torch.float64), source), target)


# Distilled images leave [0, 1] a little; a set of which fewer than this share of values lies in the wide band below,
# once its declared normalisation is undone, was normalised some other way.
PLAUSIBLE_SHARE = 0.9
PLAUSIBLE_BAND = (-0.5, 1.5)


def check_normalization(images: torch.Tensor, normalization: str, statistics: Statistics | None) -> dict[str, float]:
    """Check that ``images`` ``[K, C, H, W]`` look normalised as declared; return what was measured.

    Two mistakes are caught: [0, 1] pixels declared normalised (every value in [0, 1], none below: a normalised
    set has negative values wherever a pixel is darker than the mean), and values that, once the declared
    normalisation is undone, mostly fall outside [-0.5, 1.5].

    Returns:
        ``{"min", "max", "unit_share_in_band"}`` of the images as given and in [0, 1] space.
    Raises:
        FastddError: one sentence naming the likelier normalisation.
    """
    low, high = float(images.min()), float(images.max())
    unit = unit_pixels_from(images, statistics)
    share = float(((unit >= PLAUSIBLE_BAND[0]) & (unit <= PLAUSIBLE_BAND[1])).float().mean())
    measured = {"min": low, "max": high, "unit_share_in_band": share}
    if statistics is not None and low >= 0.0 and high <= 1.0:
        raise FastddError(f"the images all lie in [0, 1] (min {low:.3g}, max {high:.3g}), as unnormalised pixels do, "
                          f"but --normalization {normalization} says they were normalised; pass --normalization none "
                          "if they are [0, 1] pixels.")
    if share < PLAUSIBLE_SHARE:
        hint = ("pass --normalization dataset (or cifar10) if they were normalised" if statistics is None
                else "check --normalization (dataset, cifar10 or none)")
        raise FastddError(
            f"once --normalization {normalization} is undone only {100 * share:.0f} % of the pixel values lie in "
            f"[{PLAUSIBLE_BAND[0]}, {PLAUSIBLE_BAND[1]}] (values range {low:.3g} to {high:.3g}): the images were "
            f"normalised some other way; {hint}."
        )
    return measured
