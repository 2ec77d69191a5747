"""Random binary masks on images, as used by Masked Temperature Scaling (MTS) and Masked Distillation Training (MDT).

An image of ``H x W`` pixels is cut into a grid of ``ceil(H / patch) x ceil(W / patch)`` square cells (``patch = 1``:
every pixel is a cell). A mask zeroes exactly ``round(ratio * cells)`` cells per image (Python's ``round``), chosen
uniformly without replacement and independently per image, and shared by all channels of the image. Images are
normalised with the dataset's mean and std, so the masked value 0 is the dataset's mean colour. When ``patch`` does not
divide ``H`` or ``W``, the cells of the last row / column are cut off at the border.

The calibration authors' code masks differently: every value of every channel independently, kept when a uniform draw
exceeds the ratio (``rand_like(x) > r``), so the count of masked values varies per image (:func:`element_mask`,
``unit="element"``; the default ``unit="pixel"`` is the exact count above).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdd.config.trust import DEFAULT_MASK_RATIO  # noqa: F401  (MTS and MDT read it here)

DEFAULT_MASK_PATCH: int = 1
MASK_UNITS = ("pixel", "element")


def mask_like(
    shape: Sequence[int],
    ratio: float,
    *,
    generator: torch.Generator,
    patch: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random binary mask for a batch of images of ``shape`` ``[N, C, H, W]``.

    The random keys are drawn on the generator's device and moved to ``device``, so one seed gives one mask on every
    device. ``ratio = 0`` returns all ones without drawing from ``generator``.

    Args:
        shape: ``(N, C, H, W)`` of the images to mask (``C`` is ignored: the mask is shared over channels).
        ratio: share of the cells to zero, in ``[0, 1)``.
        generator: the source of every random choice.
        patch: side of a square cell in pixels, ``>= 1``.
        device: where the mask lives (default CPU).
    Returns:
        ``[N, 1, H, W]`` float32 mask of 0s and 1s, with exactly ``round(ratio * cells)`` zero cells per image.
    """
    n, height, width = _check(shape, ratio, patch)
    device = torch.device("cpu") if device is None else torch.device(device)
    if ratio == 0:
        return torch.ones(n, 1, height, width, device=device)
    rows, cols = -(-height // patch), -(-width // patch)
    cells = rows * cols
    masked = round(ratio * cells)
    keys = torch.rand(n, cells, generator=generator, device=generator.device).to(device)
    # The ``masked`` cells with the smallest keys are a uniform random subset, drawn for all images at once.
    chosen = keys.argsort(dim=1)[:, :masked]
    grid = torch.ones(n, cells, device=device).scatter_(1, chosen, 0.0).view(n, 1, rows, cols)
    if patch > 1:
        grid = grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)[:, :, :height, :width]
    return grid.contiguous()


def random_mask(images: torch.Tensor, ratio: float, *, generator: torch.Generator, patch: int = 1) -> torch.Tensor:
    """``images`` multiplied by a fresh :func:`mask_like` mask (masked pixels become 0, the normalised mean).

    Differentiable with respect to ``images``: the mask is a constant factor, so the gradient is the mask.
    ``ratio = 0`` returns ``images`` itself and draws nothing from ``generator``.

    Args:
        images: ``[N, C, H, W]`` floating-point images (normalised).
        ratio: share of the cells to zero per image, in ``[0, 1)``.
        generator: the source of every random choice.
        patch: side of a square cell in pixels, ``>= 1``.
    Returns:
        ``[N, C, H, W]`` masked images, same dtype and device as ``images``.
    """
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point, got {images.dtype}")
    _check(images.shape, ratio, patch)
    if ratio == 0:
        return images
    mask = mask_like(images.shape, ratio, generator=generator, patch=patch, device=images.device)
    return images * mask.to(images.dtype)


def element_mask(images: torch.Tensor, ratio: float, *, generator: torch.Generator) -> torch.Tensor:
    """``images`` with every value (each channel of each pixel) zeroed independently with probability ``ratio``: kept
    where a uniform draw in ``[0, 1)`` exceeds ``ratio``, as the calibration authors' ``rand_like(x) > r``.

    ``ratio = 0`` returns ``images`` itself and draws nothing. Differentiable with respect to ``images``.

    Args:
        images: ``[N, C, H, W]`` floating-point images (normalised).
        ratio: probability of zeroing a value, in ``[0, 1)``.
        generator: the source of the uniform draws (one per value, on the generator's device).
    Returns:
        ``[N, C, H, W]`` masked images, same dtype and device as ``images``.
    """
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point, got {images.dtype}")
    _check(images.shape, ratio, 1)
    if ratio == 0:
        return images
    keep = element_mask_like(images.shape, ratio, generator=generator, device=images.device)
    return images * keep.to(images.dtype)


def element_mask_like(
    shape: Sequence[int], ratio: float, *, generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor:
    """The {0, 1} float32 mask of :func:`element_mask` for images of ``shape`` ``[N, C, H, W]``: ``[N, C, H, W]``,
    1 where a uniform draw (on the generator's device) exceeds ``ratio``."""
    _check(shape, ratio, 1)
    keep = torch.rand(tuple(shape), generator=generator, device=generator.device) > ratio
    return keep.to(device=device if device is not None else keep.device, dtype=torch.float32)


def mask_images(
    images: torch.Tensor, ratio: float, *, generator: torch.Generator, unit: str = "pixel", patch: int = 1
) -> torch.Tensor:
    """``images`` under a fresh random mask of ``unit`` ``"pixel"`` (:func:`random_mask`, exact count, shared over
    channels) or ``"element"`` (:func:`element_mask`, each value independently)."""
    if unit == "pixel":
        return random_mask(images, ratio, generator=generator, patch=patch)
    if unit == "element":
        return element_mask(images, ratio, generator=generator)
    raise ValueError(f"unit must be one of {', '.join(MASK_UNITS)}, got {unit!r}")


def _check(shape: Sequence[int], ratio: float, patch: int) -> tuple[int, int, int]:
    """Validate the arguments; return ``(N, H, W)``."""
    if len(shape) != 4 or min(shape) < 0 or min(shape[2:]) < 1:
        raise ValueError(f"images must be [N, C, H, W] with H, W >= 1, got shape {tuple(shape)}")
    if not 0 <= ratio < 1:
        raise ValueError(f"the mask ratio must lie in [0, 1), got {ratio}")
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be an integer >= 1, got {patch!r}")
    return int(shape[0]), int(shape[2]), int(shape[3])
