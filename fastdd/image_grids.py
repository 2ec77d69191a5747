"""Image grids people can read: small images upscaled, and for a synthetic set one row per class with its name."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# Images are upscaled (nearest neighbour, by a whole factor) until their longer side reaches this many pixels.
READABLE_SIDE = 64
_PADDING = 2


def default_scale(side: int) -> int:
    """The whole upscaling factor that brings an image side to at least ``READABLE_SIDE`` pixels (1 for larger)."""
    return max(1, math.ceil(READABLE_SIDE / max(side, 1)))


def image_grid_array(images: torch.Tensor, *, nrow: int | None = None, scale: int | None = None) -> "np.ndarray":
    """``images`` (``[K, C, H, W]``, values in [0, 1]) as one grid, ``nrow`` images per row (default 10), each image
    upscaled ``scale`` times (default :func:`default_scale`).

    Returns:
        A uint8 array ``[H', W', 3]`` (one-channel images become gray RGB), ``[H', W', C]`` for other ``C``.
    """
    from torchvision.utils import make_grid

    images = images.detach().to("cpu", torch.float32).clamp(0, 1)
    factor = scale if scale is not None else default_scale(max(images.shape[-2:]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    grid = make_grid(images, nrow=nrow or 10, padding=_PADDING, pad_value=1.0)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array


def labelled_grid_image(
    images: torch.Tensor, row_names: Sequence[str], *, per_row: int, scale: int | None = None
) -> "Image.Image":
    """A grid of ``images`` (``[K, C, H, W]`` in [0, 1], ``per_row`` a row) with ``row_names[i]`` written left of
    row ``i`` (e.g. one row per class of a class-major synthetic set)."""
    from PIL import Image, ImageDraw, ImageFont

    grid = Image.fromarray(image_grid_array(images, nrow=per_row, scale=scale))
    rows = math.ceil(images.shape[0] / per_row)
    row_height = (grid.height - _PADDING) / max(rows, 1)
    try:
        font = ImageFont.load_default(size=max(10, min(24, int(row_height * 0.4))))
    except TypeError:  # Pillow without FreeType sizes: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    width = max(int(draw.textlength(str(name), font=font)) for name in row_names) + 2 * _PADDING + 4
    canvas = Image.new(grid.mode, (grid.width + width, grid.height), color=255 if grid.mode == "L" else (255,) * 3)
    canvas.paste(grid, (width, 0))
    draw = ImageDraw.Draw(canvas)
    ink = 0 if canvas.mode == "L" else (0, 0, 0)
    for row, name in enumerate(row_names[:rows]):
        centre = _PADDING + row_height * row + row_height / 2
        draw.text((_PADDING + 2, centre), str(name), fill=ink, font=font, anchor="lm")
    return canvas
