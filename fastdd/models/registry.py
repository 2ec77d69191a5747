"""Build any fastdd network by name, with parameters drawn from an explicit generator."""

from __future__ import annotations

import torch
from torch import nn

from fastdd.errors import FastddError
from fastdd.models.alexnet import AlexNet
from fastdd.models.convnet import ConvNet
from fastdd.models.init import init_parameters
from fastdd.models.layers import as_image_size
from fastdd.models.vgg import VGG11

MODELS = ("convnet", "convnetd4", "convnetd5", "alexnet", "vgg11", "resnet18")

_CONVNET_DEPTHS = {"convnet": 3, "convnetd4": 4, "convnetd5": 5}
CONVNET_MODELS = tuple(_CONVNET_DEPTHS)  # the ConvNet family (the models batched students can run)


def default_convnet_depth(image_size: tuple[int, int]) -> int:
    """ConvNet depth for an image size, so the last feature map is 2x2 to 4x4 px.

    3 for 16-63 px (the 28/32 px standard), 4 for 64-127 px (ConvNetD4), 5 from 128 px (ConvNetD5), and 2 below
    16 px (8x8 digits: a third block would leave a 1x1 map that instance normalisation flattens to zero).
    """
    side = min(image_size)
    if side < 16:
        return 2
    if side < 64:
        return 3
    return 4 if side < 128 else 5


def build_model(
    name: str,
    *,
    channels: int,
    num_classes: int,
    image_size: tuple[int, int] | int,
    width: int = 128,
    depth: int | None = None,
    norm: str = "instancenorm",
    pooling: str = "avgpool",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A freshly initialised network mapping images [B, channels, H, W] to logits [B, num_classes].

    Args:
        name: one of `MODELS` (case-insensitive). "convnet" has the depth `default_convnet_depth(image_size)`
            (3 at 28/32 px) unless `depth` is given;
            "convnetd4"/"convnetd5" are depth 4/5 (a different `depth` is an error).
        channels, num_classes, image_size: input channels, logits, and (H, W) (an int means square).
        width, pooling: ConvNet family only (conv channels; "avgpool" | "maxpool" | "none").
        depth: ConvNet family only; giving it for another model is an error.
        norm: "instancenorm" | "batchnorm" | "none" for ConvNet, VGG11 and ResNet18; AlexNet has no norm layers.
        generator: source of the initial parameters. The net is built on the meta device and every parameter
            and buffer is then initialised with PyTorch's default laws (see `init_parameters`), drawing from
            `generator`; the same generator state gives bit-identical parameters and the global RNG is not
            touched. With None the same laws draw from the global RNG (a fresh default-initialised net).
            Tensors are created on `torch.get_default_device()` with the default dtype; the generator must live
            on that device.

    Every returned net has `embed(x) -> [B, net.feature_dim]` (features before the final Linear layer).
    Raises FastddError for an unknown name, norm or pooling, or a `depth` that does not fit the name, and
    ValueError when the image is too small for the architecture.
    """
    key = name.lower()
    if key not in MODELS:
        raise FastddError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    size = as_image_size(image_size)
    if key in _CONVNET_DEPTHS:
        if depth is None:
            depth = default_convnet_depth(size) if key == "convnet" else _CONVNET_DEPTHS[key]
        elif key != "convnet" and depth != _CONVNET_DEPTHS[key]:
            raise FastddError(f"Model {key!r} has depth {_CONVNET_DEPTHS[key]}; drop depth={depth} or use 'convnet'.")
    elif depth is not None:
        raise FastddError(f"depth only applies to the ConvNet family; drop depth={depth} for {key!r}.")

    device = torch.get_default_device()
    with torch.device("meta"):
        if key in _CONVNET_DEPTHS:
            net: nn.Module = ConvNet(channels, num_classes, size, width=width, depth=depth, norm=norm, pooling=pooling)
        elif key == "alexnet":
            net = AlexNet(channels, num_classes, size)
        elif key == "vgg11":
            net = VGG11(channels, num_classes, size, norm=norm)
        else:
            from fastdd.models.resnet import ResNet18  # imports torchvision, which is slow to load

            net = ResNet18(channels, num_classes, size, norm=norm)
    return init_parameters(net.to_empty(device=device), generator)


def build_model_for(
    dataset,
    name: str,
    *,
    width: int = 128,
    depth: int | None = None,
    norm: str = "instancenorm",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """`build_model` sized for ``dataset``: anything with ``channels``, ``num_classes`` and ``image_size`` (H, W),
    such as a `fastdd.data.ImageDataset`."""
    return build_model(
        name,
        channels=dataset.channels,
        num_classes=dataset.num_classes,
        image_size=dataset.image_size,
        width=width,
        depth=depth,
        norm=norm,
        generator=generator,
    )
