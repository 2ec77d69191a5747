"""What a dataset loader returns: the pixels of both splits before any normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# Where loaders of on-disk datasets look when no data_root is given (relative to the working directory).
DEFAULT_DATA_ROOT = Path("data")


@dataclass
class RawSplits:
    """Train and test splits as stored on disk.

    Attributes:
        train_images: ``[N, C, H, W]``, ``uint8`` in [0, 255] or float in [0, 1].
        train_labels: ``[N]`` int64.
        test_images: ``[M, C, H, W]``, same dtype and size as ``train_images``.
        test_labels: ``[M]`` int64.
        class_names: one name per class, in label order.
        source: where the pixels were read from (a folder or file, or what ships them), for provenance.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    source: str = ""


def unit_pixels(images: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """Pixels as float32 in [0, 1], optionally resized (bilinear, antialiased) to ``image_size`` x ``image_size``.

    Args:
        images: ``[N, C, H, W]`` uint8 or float in [0, 1].
        image_size: target side, or None to keep ``H, W``.

    Returns:
        ``[N, C, S, S]`` (or ``[N, C, H, W]``) float32 in [0, 1]; a new tensor.
    """
    unit = images.float().div_(255) if images.dtype == torch.uint8 else images.to(torch.float32, copy=True)
    if image_size is not None and tuple(unit.shape[2:]) != (image_size, image_size):
        unit = F.interpolate(unit, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        unit.clamp_(0, 1)
    return unit


def channel_mean_std(unit_images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation over all pixels of all images.

    Args:
        unit_images: ``[N, C, H, W]`` float.

    Returns:
        ``(mean, std)``, each a tuple of ``C`` floats.
    """
    channels = unit_images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    # float64 sums over chunks: exact enough for [0, 1] pixels without a float64 copy of the whole set.
    for chunk in unit_images.split(4096):
        chunk = chunk.double()
        total += chunk.sum(dim=(0, 2, 3)).cpu()
        total_sq += chunk.square().sum(dim=(0, 2, 3)).cpu()
    count = unit_images.numel() // channels
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
