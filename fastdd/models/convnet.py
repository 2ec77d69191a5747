"""ConvNet: the standard backbone of dataset distillation (DC, DSA, DM, MTT, TESLA)."""

from __future__ import annotations

import torch
from torch import nn

from fastdd.errors import FastddError
from fastdd.models.conv import conv2d
from fastdd.models.layers import as_image_size, check_input, check_norm, first_conv_padding, make_norm
from fastdd.ops.norm_relu_pool import instance_norm_relu_pool

POOLINGS = ("avgpool", "maxpool", "none")


class ConvNet(nn.Module):
    """`depth` blocks of conv3x3 -> norm -> ReLU -> 2x2 pool, then one Linear layer to the class logits.

    Args:
        channels: input channels C.
        num_classes: number of output logits K.
        image_size: input (H, W), or an int for square images.
        width: channels of every conv layer (128 in the literature).
        depth: number of blocks (3 for 28/32 px, 4 for 64 px, 5 for 128 px).
        norm: "instancenorm" (GroupNorm with one group per channel, affine), "batchnorm" or "none".
        pooling: "avgpool" or "maxpool" (2x2, stride 2), or "none" (blocks keep the spatial size).

    Every conv has padding 1 (size-preserving), except under the 28-px rule: when H == W == 28 the first conv
    is padded by 3, so the map becomes 32x32 and three pools give 4x4 as on 32-px images. Each pool halves the
    map with floor division, so an 8x8 input reaches 1x1 after 3 blocks; an image smaller than 2**depth on
    either side raises ValueError.

    Modules are `features` (an nn.Sequential of the blocks) and `classifier` (the Linear head), so parameters
    are ordered conv weight, conv bias, norm weight, norm bias per block, then head weight and bias.

    Attributes:
        layers_per_block: 4 with pooling (conv, norm, ReLU, pool), else 3; block k is features[k * layers_per_block :].
        feature_shape: (width, h, w) of the last feature map.
        feature_dim: width * h * w, the size of `embed(x)` (2048 at 32 px and at 28 px with depth 3).

    Parameters come from PyTorch's default init (global RNG); use `fastdd.models.build_model(...,
    generator=g)` for a reproducible net.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int] | int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        pooling: str = "avgpool",
    ) -> None:
        super().__init__()
        check_norm(norm)
        if pooling not in POOLINGS:
            raise FastddError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")
        if depth < 1 or width < 1 or channels < 1 or num_classes < 1:
            raise ValueError(
                f"ConvNet needs positive sizes, got channels={channels}, num_classes={num_classes}, "
                f"width={width}, depth={depth}"
            )
        self.channels = channels
        self.num_classes = num_classes
        self.image_size = as_image_size(image_size)
        self.width, self.depth, self.norm, self.pooling = width, depth, norm, pooling

        h, w = self.image_size
        layers: list[nn.Module] = []
        in_channels = channels
        for block in range(depth):
            padding = first_conv_padding(self.image_size, 1) if block == 0 else 1
            h, w = h + 2 * padding - 2, w + 2 * padding - 2
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=padding), make_norm(norm, width), nn.ReLU()]
            if pooling != "none":
                h, w = h // 2, w // 2
                if h == 0 or w == 0:
                    raise ValueError(
                        f"ConvNet of depth {depth} needs images of at least {2**depth}x{2**depth} px, got "
                        f"{self.image_size[0]}x{self.image_size[1]} (the feature map is empty after block {block + 1})"
                    )
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avgpool" else nn.MaxPool2d(2, 2))
            in_channels = width
        self.features = nn.Sequential(*layers)
        # features[i : i + layers_per_block] is one block: conv, norm, ReLU (, pool).
        self.layers_per_block = 3 if pooling == "none" else 4
        self.feature_shape = (width, h, w)
        self.feature_dim = width * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the head: [B, C, H, W] -> [B, feature_dim]."""
        check_input(x, (self.channels, *self.image_size), "ConvNet")
        if self.norm != "instancenorm" or self.pooling == "maxpool" or x.dim() != 4:
            return self.features(x).flatten(-3)
        # conv, norm, ReLU (, pool) per block: the norm-ReLU-pool epilogue runs as one fused op, differentiable
        # twice, which is most of a trajectory-matching step's elementwise work; the convolution's double backward
        # is the cheaper one of fastdd.models.conv.
        for first in range(0, len(self.features), self.layers_per_block):
            conv, norm = self.features[first], self.features[first + 1]
            x = conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            x = instance_norm_relu_pool(x, norm.weight, norm.bias, eps=norm.eps, pool=self.pooling == "avgpool")
        return x.flatten(-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: [B, C, H, W] -> [B, num_classes]."""
        return self.classifier(self.embed(x))
