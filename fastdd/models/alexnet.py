"""AlexNet in the small-image form used for cross-architecture evaluation of distilled data."""

from __future__ import annotations

import torch
from torch import nn

from fastdd.models.layers import as_image_size, check_input, first_conv_padding

# (out_channels, kernel, followed by a 2x2 max-pool); every conv preserves the spatial size.
_CONVS = ((128, 5, True), (192, 5, True), (256, 3, False), (192, 3, False), (192, 3, True))


class AlexNet(nn.Module):
    """Five convs (128-192-256-192-192 channels, kernels 5-5-3-3-3) with ReLU and three 2x2 max-pools, one Linear.

    There are no normalisation layers (as in the small-image AlexNet of the dataset-distillation benchmarks).
    Convs keep the spatial size (padding kernel // 2); the 28-px rule pads the first conv by 2 more pixels, so a
    28x28 input is seen as 32x32. The three pools take 32 px to 4x4 (feature_dim 3072) and 8 px to 1x1
    (feature_dim 192); images smaller than 8 px on a side raise ValueError.

    Args:
        channels: input channels C.  num_classes: logits K.  image_size: (H, W) or an int.
    Attributes: feature_shape (192, h, w); feature_dim = 192 * h * w, the size of `embed(x)`.
    """

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] | int) -> None:
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.image_size = as_image_size(image_size)
        h, w = self.image_size
        layers: list[nn.Module] = []
        in_channels = channels
        for index, (out_channels, kernel, pool) in enumerate(_CONVS):
            padding = kernel // 2
            if index == 0:
                padding = first_conv_padding(self.image_size, padding)
            h, w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
            layers += [nn.Conv2d(in_channels, out_channels, kernel, padding=padding), nn.ReLU()]
            if pool:
                h, w = h // 2, w // 2
                if h == 0 or w == 0:
                    raise ValueError(
                        f"AlexNet needs images of at least 8x8 px, got {self.image_size[0]}x{self.image_size[1]}"
                    )
                layers.append(nn.MaxPool2d(2, 2))
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.feature_shape = (in_channels, h, w)
        self.feature_dim = in_channels * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the head: [B, C, H, W] -> [B, feature_dim]."""
        check_input(x, (self.channels, *self.image_size), "AlexNet")
        return self.features(x).flatten(-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: [B, C, H, W] -> [B, num_classes]."""
        return self.classifier(self.embed(x))
