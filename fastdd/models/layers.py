"""Pieces shared by the model families: normalisation layers by name, the 28-px padding rule, input checks."""

from __future__ import annotations

import torch
from torch import nn

from fastdd.errors import FastddError

NORMS = ("instancenorm", "batchnorm", "none")


def check_norm(norm: str) -> None:
    """Raise `FastddError` unless `norm` is one of `NORMS`."""
    if norm not in NORMS:
        raise FastddError(f"Unknown norm {norm!r}; choose one of {', '.join(NORMS)}.")


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalisation layer for `channels`-channel feature maps [B, channels, H, W] -> same shape.

    "instancenorm" is GroupNorm with one group per channel and a per-channel affine, the dataset-distillation
    convention (unlike nn.InstanceNorm2d it has no running statistics, so train and eval modes agree).
    """
    check_norm(norm)
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def first_conv_padding(image_size: tuple[int, int], padding: int) -> int:
    """Padding of a net's first convolution under the 28-px rule.

    A 28x28 input gets 2 extra pixels of padding on every side (28 -> 32 for a size-preserving conv), so a net
    built for 32 px sees the same feature-map sizes as on CIFAR (e.g. 4x4 after three 2x2 pools). Any other
    image size keeps `padding`.
    """
    return padding + 2 if tuple(image_size) == (28, 28) else padding


def as_image_size(image_size: tuple[int, int] | int) -> tuple[int, int]:
    """`image_size` as a (H, W) tuple of positive ints; an int means a square image."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or a pair (H, W) of positive ints, got {image_size!r}")
    return size  # type: ignore[return-value]


def check_input(x: torch.Tensor, expected: tuple[int, int, int], model: str) -> None:
    """Raise ValueError unless the last three dims of `x` are `expected` = (C, H, W).

    Only trailing dims are checked so the check also holds per-sample under torch.func.vmap.
    """
    if tuple(x.shape[-3:]) != expected:
        raise ValueError(
            f"{model} was built for inputs [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(x.shape)}"
        )
