"""VGG11 in the small-image form used for cross-architecture evaluation of distilled data."""

from __future__ import annotations

import torch
from torch import nn

from fastdd.models.layers import as_image_size, check_input, check_norm, first_conv_padding, make_norm

# Configuration "A" of the VGG paper: conv widths, "M" = 2x2 max-pool.
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG11 convs (3x3, padding 1) -> norm -> ReLU with 2x2 max-pools, global average pool, one Linear (512 -> K).

    Small-image adaptations: no 4096-wide fully connected layers; a max-pool is left out once the feature map is
    1 px on a side (so 8x8 inputs keep three pools and never reach an empty map); the 28-px rule pads the first
    conv by 3 (28 -> 32). The final adaptive average pool makes `feature_dim` 512 for every image size.

    Args:
        channels: input channels C.  num_classes: logits K.  image_size: (H, W) or an int.
        norm: "instancenorm" (GroupNorm, one group per channel; the benchmark default), "batchnorm" or "none".
    """

    feature_dim = 512

    def __init__(
        self, channels: int, num_classes: int, image_size: tuple[int, int] | int, norm: str = "instancenorm"
    ) -> None:
        super().__init__()
        check_norm(norm)
        self.channels, self.num_classes, self.norm = channels, num_classes, norm
        self.image_size = as_image_size(image_size)
        h, w = self.image_size
        layers: list[nn.Module] = []
        in_channels = channels
        for item in _VGG11:
            if item == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    h, w = h // 2, w // 2
                continue
            padding = first_conv_padding(self.image_size, 1) if not layers else 1
            h, w = h + 2 * padding - 2, w + 2 * padding - 2
            layers += [nn.Conv2d(in_channels, item, 3, padding=padding), make_norm(norm, item), nn.ReLU()]
            in_channels = item
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features before the head: [B, C, H, W] -> [B, 512]."""
        check_input(x, (self.channels, *self.image_size), "VGG11")
        return self.features(x).flatten(-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: [B, C, H, W] -> [B, num_classes]."""
        return self.classifier(self.embed(x))
