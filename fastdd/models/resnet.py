"""ResNet18 in the small-image form used for cross-architecture evaluation of distilled data.

This module imports torchvision (about 2 s), so `fastdd.models` loads it only when a ResNet is built.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from fastdd.models.init import init_parameters
from fastdd.models.layers import as_image_size, check_input, check_norm, make_norm


class ResNet18(ResNet):
    """torchvision's ResNet18 with a small-image stem: 3x3 conv, stride 1, no max-pool.

    Stages of 64-128-256-512 channels (the last three start with stride 2), global average pool, one Linear
    (512 -> K). Spatial maps never become empty (a 1x1 map stays 1x1 under a stride-2 3x3 conv with padding 1),
    so any image size works; 32 px ends at 4x4, 8 px at 1x1 before the global pool.

    Args:
        channels: input channels C.  num_classes: logits K.  image_size: (H, W) or an int (checked on input).
        norm: "instancenorm" (GroupNorm, one group per channel), "batchnorm" (the usual choice for ResNet18 in
            the distillation literature) or "none" (convs have no bias, as in torchvision).

    Parameters follow PyTorch's default init laws (as the distillation benchmarks do), not torchvision's
    kaiming-normal init; names are torchvision's (`conv1`, `bn1`, `layer1`..`layer4`, `fc`).
    """

    feature_dim = 512

    def __init__(
        self, channels: int, num_classes: int, image_size: tuple[int, int] | int, norm: str = "instancenorm"
    ) -> None:
        check_norm(norm)
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=partial(make_norm, norm))
        self.channels, self.num_classes, self.norm = channels, num_classes, norm
        self.image_size = as_image_size(image_size)
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        init_parameters(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features before the head: [B, C, H, W] -> [B, 512]."""
        check_input(x, (self.channels, *self.image_size), "ResNet18")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: [B, C, H, W] -> [B, num_classes]."""
        return self.fc(self.embed(x))
