"""Several ConvNet students with their own parameters, run as one network: batched trajectory-matching students.

S students of one ConvNet architecture, each with its own flat parameter vector and its own minibatch, are
computed together: student s's channels occupy the s-th slice of an S-times-wider feature map, every convolution
is one grouped convolution (``groups=S``), the normalisation / ReLU / pooling epilogue is one call over all
S * width channels (per-channel ops do not mix students), and the head is one batched matmul. The result equals
running each student on its own (``fastdd.models.functional.functional_forward``) up to float rounding, and it is
differentiable (twice) w.r.t. every student's parameters and images, so ``S`` students cost a few large kernel
calls instead of ``S`` times as many small ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdd.models.conv import conv2d
from fastdd.models.convnet import ConvNet
from fastdd.models.functional import parameter_layout
from fastdd.ops.norm_relu_pool import instance_norm_relu_pool


def supports_batched_students(net: torch.nn.Module) -> bool:
    """True when :func:`batched_functional_forward` can run ``net``'s architecture: a ``ConvNet`` with norm
    "instancenorm" or "none" (BatchNorm's running buffers cannot be split between students)."""
    return isinstance(net, ConvNet) and net.norm in ("instancenorm", "none")


def batched_functional_forward(net: ConvNet, flat_params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits of S students of ``net``'s architecture, each on its own images.

    Args:
        net: a ``ConvNet`` with norm "instancenorm" or "none" (BatchNorm's running buffers cannot be split between
            students); its own parameters are not used.
        flat_params: [S, P] one flat parameter vector per student, in ``net.parameters()`` order.
        x: [S, B, C, H, W] student s's images in ``x[s]`` (the same B for every student).

    Returns:
        [S, B, num_classes], equal to ``stack([functional_forward(net, flat_params[s], x[s]) for s])``.
    """
    if not supports_batched_students(net):
        raise ValueError("batched students need a ConvNet with norm 'instancenorm' or 'none'")
    layout = parameter_layout(net)
    if flat_params.dim() != 2 or flat_params.shape[1] != layout.numel:
        raise ValueError(f"flat_params must be [S, {layout.numel}], got {tuple(flat_params.shape)}")
    students = flat_params.shape[0]
    if x.dim() != 5 or x.shape[0] != students or tuple(x.shape[2:]) != (net.channels, *net.image_size):
        raise ValueError(
            f"x must be [{students}, B, {net.channels}, {net.image_size[0]}, {net.image_size[1]}], got {tuple(x.shape)}"
        )
    params = {
        name: flat_params[:, offset : offset + numel].reshape(students, *shape)
        for name, offset, numel, shape in zip(layout.names, layout.offsets, layout.numels, layout.shapes)
    }
    batch = x.shape[1]
    h = x.transpose(0, 1).reshape(batch, students * net.channels, *net.image_size)
    for first in range(0, len(net.features), net.layers_per_block):
        conv, norm = net.features[first], net.features[first + 1]
        weight = params[f"features.{first}.weight"]
        h = conv2d(
            h, weight.reshape(-1, *weight.shape[2:]), params[f"features.{first}.bias"].reshape(-1),
            padding=conv.padding, groups=students,
        )
        if isinstance(norm, nn.GroupNorm):
            h = instance_norm_relu_pool(
                h, params[f"features.{first + 1}.weight"].reshape(-1), params[f"features.{first + 1}.bias"].reshape(-1),
                eps=norm.eps, pool=net.pooling == "avgpool",
            )
            if net.pooling == "maxpool":
                h = F.max_pool2d(h, 2)
        else:
            h = F.relu(h)
            if net.pooling != "none":
                h = net.features[first + 3](h)
    features = h.reshape(batch, students, -1).transpose(0, 1)  # [S, B, feature_dim]
    weight, bias = params["classifier.weight"], params["classifier.bias"]
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))
