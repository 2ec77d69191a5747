"""(Re)initialise a network from an explicit `torch.Generator` with PyTorch's default initialisation laws."""

from __future__ import annotations

import math

import torch
from torch import nn

_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def init_parameters(net: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Initialise every parameter and buffer of `net` in place and return `net`.

    The laws are the ones PyTorch modules use by default:
      - Conv2d / Linear weight: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in));
        bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with fan_in = in_channels * kernel area (or in_features).
      - BatchNorm / GroupNorm / LayerNorm: weight 1, bias 0; BatchNorm running mean 0, variance 1, count 0.
    Random draws are taken module by module in `net.modules()` order, weight before bias, from `generator`
    (or from the global RNG when it is None). For a net whose modules are registered in construction order this
    reproduces PyTorch's own init bit for bit, and the same generator state always gives the same parameters.

    Raises TypeError for a module that owns parameters or buffers but is not one of the layers above, so a new
    layer type cannot silently keep uninitialised memory.
    """
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, _NORM_LAYERS):
            module.reset_parameters()
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise TypeError(f"init_parameters does not know how to initialise a {type(module).__name__} layer")
    return net
