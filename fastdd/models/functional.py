"""Run a network with its parameters taken from one flat vector (trajectory matching, batched students)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


def flat_parameters(net: nn.Module) -> torch.Tensor:
    """All parameters of `net` concatenated in `net.parameters()` order: [P].

    Same as `torch.nn.utils.parameters_to_vector(net.parameters())`, so the result is still attached to the
    parameters' autograd graph; call `.detach()` for a snapshot.
    """
    return torch.nn.utils.parameters_to_vector(net.parameters())


@dataclass(frozen=True)
class ParameterLayout:
    """Where each parameter of a network lives in its flat vector (see `flat_parameters`).

    Attributes:
        names: parameter names in `net.parameters()` order (as in `named_parameters()`).
        shapes, numels, offsets: per parameter; parameter i is flat[offsets[i] : offsets[i] + numels[i]].
        numel: P, the total length of the flat vector.
        buffer_names: names of the net's buffers (e.g. BatchNorm running statistics).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int
    buffer_names: tuple[str, ...]

    @classmethod
    def from_module(cls, net: nn.Module) -> ParameterLayout:
        """Read the layout of `net`'s current parameters."""
        names, shapes, numels, offsets = [], [], [], []
        offset = 0
        for name, param in net.named_parameters():
            names.append(name)
            shapes.append(param.shape)
            numels.append(param.numel())
            offsets.append(offset)
            offset += param.numel()
        buffers = tuple(name for name, _ in net.named_buffers())
        return cls(tuple(names), tuple(shapes), tuple(numels), tuple(offsets), offset, buffers)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` [P] shaped like the parameters: {name: Tensor[shape]} (no copies; autograd flows)."""
        if flat.dim() != 1 or flat.shape[0] != self.numel:
            raise ValueError(f"expected a flat parameter vector of shape [{self.numel}], got {list(flat.shape)}")
        return {
            name: chunk.view(shape) for name, chunk, shape in zip(self.names, flat.split(self.numels), self.shapes)
        }


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, ParameterLayout]" = weakref.WeakKeyDictionary()


def parameter_layout(net: nn.Module) -> ParameterLayout:
    """The `ParameterLayout` of `net`, computed on first use and cached for the module's lifetime.

    The cache assumes the set and shapes of parameters do not change after the first call.
    """
    layout = _LAYOUTS.get(net)
    if layout is None:
        layout = _LAYOUTS[net] = ParameterLayout.from_module(net)
    return layout


def functional_forward(
    net: nn.Module, flat_params: torch.Tensor, x: torch.Tensor, *, layout: ParameterLayout | None = None
) -> torch.Tensor:
    """`net(x)` with the parameters unflattened from `flat_params` instead of the module's own.

    Args:
        net: the architecture; its own parameters are neither read nor changed.
        flat_params: [P] in `net.parameters()` order (the layout of `flat_parameters(net)`).
        x: the input, e.g. images [B, C, H, W].
        layout: `parameter_layout(net)` by default (cached per module).
    Returns:
        net's output for x, e.g. logits [B, K]; differentiable (also twice, for Hessian-vector products) with
        respect to both `flat_params` and `x`.

    Buffers come from the module. In train mode, BatchNorm normalises with the batch statistics and its running
    statistics are NOT updated (they are given to the net as throwaway copies); in eval mode it uses the module's
    running statistics. GroupNorm ("instancenorm") has no buffers, so train and eval modes agree.
    """
    if layout is None:
        layout = parameter_layout(net)
    tensors = layout.unflatten(flat_params)
    if net.training and layout.buffer_names:
        for name in layout.buffer_names:
            tensors[name] = net.get_buffer(name).clone()
    return functional_call(net, tensors, (x,), tie_weights=False)
