"""Pure-PyTorch reference of differentiable siamese augmentation (DSA), one function per transform.

Written for clarity and differentiable by autograd; it is the oracle in tests and the fallback backend. Every
function takes images ``x`` [N, C, H, W] and per-transform parameters whose leading dimension is either N (one
transform per image) or 1 (the same transform for every image), and returns [N, C, H, W] (possibly x itself
when the transform is the identity, e.g. an unflipped image).
Everything is vectorised over the batch: no Python loop touches individual images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdd.ops._dispatch import HALF_DTYPES

if TYPE_CHECKING:
    from fastdd.ops.augment import AugmentParams


def _per_image(values: Tensor, x: Tensor) -> Tensor:
    """[N'] parameters -> [N', 1, 1, 1] on x's device and dtype, ready to broadcast against [N, C, H, W]."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def brightness(x: Tensor, delta: Tensor) -> Tensor:
    """Add ``delta`` [N'] to every pixel of its image: x + delta."""
    return x + _per_image(delta, x)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each pixel's deviation from its own channel mean by ``factor`` [N']; no-op on 1-channel images."""
    if x.shape[1] == 1:
        return x
    pixel_mean = x.mean(dim=1, keepdim=True)
    return (x - pixel_mean) * _per_image(factor, x) + pixel_mean


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each image's deviation from its mean over (C, H, W) by ``factor`` [N']."""
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * _per_image(factor, x) + image_mean


def crop(x: Tensor, shift: Tensor) -> Tensor:
    """Integer translation with zero fill: ``out[..., r, c] = x[..., r + shift[0], c + shift[1]]`` (0 outside).

    ``shift`` [N', 2] integer holds (row, column) offsets. Exact values: no interpolation.
    """
    n, channels, height, width = x.shape
    if shift.shape[0] == 1:
        # One shift for all images: negative padding crops one side while the other is zero-filled.
        rows, cols = shift[0].tolist()
        rows, cols = max(-height, min(height, rows)), max(-width, min(width, cols))
        return F.pad(x, (-cols, cols, -rows, rows))
    shift = shift.to(x.device)
    rows = torch.arange(height, device=x.device) + shift[:, 0:1]  # [N, H]
    cols = torch.arange(width, device=x.device) + shift[:, 1:2]  # [N, W]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    source = rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]  # [N, H, W]
    index = source.view(n, 1, height * width).expand(n, channels, height * width)
    gathered = x.reshape(n, channels, height * width).gather(2, index).view(n, channels, height, width)
    return gathered * inside.unsqueeze(1).to(x.dtype)


def cutout(x: Tensor, center: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero a ``size`` = (h, w) rectangle at ``center`` [N', 2] integer (row, column), clipped at the borders.

    Rows ``center[0] - h // 2 .. center[0] - h // 2 + h - 1`` (and likewise columns) are zeroed.
    """
    height, width = x.shape[-2:]
    center = center.to(x.device)
    top = center[:, 0:1] - size[0] // 2
    left = center[:, 1:2] - size[1] // 2
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    in_rows = (rows >= top) & (rows < top + size[0])  # [N', H]
    in_cols = (cols >= left) & (cols < left + size[1])  # [N', W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep.unsqueeze(1).to(x.dtype)


def flip(x: Tensor, flipped: Tensor) -> Tensor:
    """Mirror left-right the images whose ``flipped`` [N'] flag is True."""
    n, channels, height, width = x.shape
    if flipped.shape[0] == 1:
        return x.flip(3) if bool(flipped[0]) else x
    # A column gather is faster on CPU than torch.where over a broadcast condition, forward and backward.
    cols = torch.arange(width, device=x.device)
    source = torch.where(flipped.to(x.device)[:, None], width - 1 - cols, cols)  # [N, W]
    return x.gather(3, source.view(n, 1, 1, width).expand(n, channels, height, width))


def _resample(x: Tensor, theta: Tensor, align_corners: bool) -> Tensor:
    """Bilinear resampling through ``F.affine_grid``; theta [N', 2, 3] maps output to input coordinates.

    A shared theta builds one grid and expands it (a view), which keeps grid_sample parallel over the batch.
    """
    n, channels, height, width = x.shape
    grid = F.affine_grid(theta, [theta.shape[0], channels, height, width], align_corners=align_corners)
    grid = grid.expand(n, height, width, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


def scale(x: Tensor, factors: Tensor, align_corners: bool) -> Tensor:
    """Resample at (sx * u, sy * v) for output coordinates (u, v) in [-1, 1]; ``factors`` [N', 2] = (sx, sy).

    A factor above 1 shrinks the content (zoom out, zero border); below 1 enlarges it.
    """
    sx, sy = factors.to(device=x.device, dtype=x.dtype).unbind(1)
    zero = torch.zeros_like(sx)
    theta = torch.stack([sx, zero, zero, zero, sy, zero], dim=1).view(-1, 2, 3)
    return _resample(x, theta, align_corners)


def rotate(x: Tensor, angle: Tensor, align_corners: bool) -> Tensor:
    """Rotate by ``angle`` [N'] radians about the image centre; positive = counter-clockwise as displayed."""
    angle = angle.to(device=x.device, dtype=x.dtype)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(-1, 2, 3)
    return _resample(x, theta, align_corners)


def augment_reference(x: Tensor, params: AugmentParams) -> Tensor:
    """Apply ``params.families`` to x [N, C, H, W] in order; ``params.batch`` is 1 or N (checked by the caller).

    bfloat16 and float16 images are augmented in float32 and the result rounded back to their dtype, as the compiled
    backends do.
    """
    if x.dtype in HALF_DTYPES:
        return augment_reference(x.float(), params).to(x.dtype)
    for family in params.families:
        if family == "color":
            x = brightness(x, params.brightness)
            x = saturation(x, params.saturation)
            x = contrast(x, params.contrast)
        elif family == "crop":
            x = crop(x, params.crop_shift)
        elif family == "cutout":
            x = cutout(x, params.cutout_center, params.cutout_size)
        elif family == "flip":
            x = flip(x, params.flip)
        elif family == "scale":
            x = scale(x, params.scale, params.align_corners)
        elif family == "rotate":
            x = rotate(x, params.rotation, params.align_corners)
        else:  # AugmentParams validates families, so this is a bug here.
            raise AssertionError(f"unhandled augmentation family {family!r}")
    return x
