"""A 2-D convolution whose double backward is three plain convolution calls.

Trajectory matching differentiates every student step's gradient once more (a Hessian-vector product per step).
For ``y = conv(x, W)`` with upstream gradient ``gy`` the first backward is ``gx = conv_input_grad(gy, W)`` and
``gW = conv_weight_grad(x, gy)``; with cotangents ``(ggx, ggW, ggb)`` for ``(gx, gW, gb)`` its backward is::

    d gy = conv(ggx, W) + conv(x, ggW) + ggb      (one convolution of [ggx, x] with [W, ggW] when groups == 1)
    d W  = conv_weight_grad(ggx, gy)
    d x  = conv_input_grad(gy, ggW)

PyTorch's built-in double backward of a convolution computes ``d W`` as a convolution of the transposed
activations with ``gy`` as a batch-sized kernel, which oneDNN runs 2-3x slower than its weight-gradient kernel;
here each term is the kernel made for it. Values equal ``F.conv2d``'s derivatives up to float rounding, and the
double backward is itself differentiable (through ``aten::convolution_backward``'s own formula).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

_convolution_backward = torch.ops.aten.convolution_backward.default


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with a cheaper double backward.

    Args:
        x: [N, C_in, H, W] input.
        weight: [C_out, C_in / groups, kH, kW].
        bias: [C_out] or None.
        stride, padding, dilation: ints or (h, w) pairs, as in ``F.conv2d`` (string paddings are not taken).
        groups: as in ``F.conv2d``.

    Returns:
        [N, C_out, H_out, W_out], differentiable any number of times w.r.t. x, weight and bias. Under
        ``torch.autocast`` the inputs are cast to the autocast dtype first, as autocast casts ``F.conv2d``'s, so the
        result is in that dtype and the gradients reach x, weight and bias in their own dtypes.
    """
    if isinstance(padding, str):
        raise ValueError(f"fastdd.models.conv.conv2d takes numeric paddings, got {padding!r}")
    geometry = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As autocast treats F.conv2d: the inputs in its lower precision. The op itself then runs without autocast,
        # so that its backward passes (which run outside the autocast region) see the dtypes its forward saw.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _Convolution.apply(x, weight, bias, geometry)
    return _Convolution.apply(x, weight, bias, geometry)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _input_grad(grad_out: Tensor, x: Tensor, weight: Tensor, geometry) -> Tensor:
    stride, padding, dilation, groups = geometry
    return _convolution_backward(
        grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False]
    )[0]


def _weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor, geometry) -> Tensor:
    stride, padding, dilation, groups = geometry
    return _convolution_backward(
        grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False]
    )[1]


def _forward(x: Tensor, weight: Tensor, geometry, bias: Tensor | None = None) -> Tensor:
    stride, padding, dilation, groups = geometry
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _engine_needs(tensor: Tensor) -> bool:
    """Whether the running backward pass uses the gradient of ``tensor`` (which requires grad).

    ``ctx.needs_input_grad`` only says that an input requires grad; ``torch.autograd.grad(loss, theta)`` does not
    need the gradient of a first layer's input images, and a built-in convolution skips it. The engine query is a
    private PyTorch function (the one ``torch.utils.checkpoint`` uses); without it, every gradient is computed.
    """
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:
        return True
    try:
        return bool(will_execute(get_gradient_edge(tensor).node))
    except (RuntimeError, TypeError):
        return True


class _Convolution(torch.autograd.Function):
    generate_vmap_rule = True  # batched students run functional_forward under torch.func.vmap

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, geometry) -> Tensor:
        return _forward(x, weight, geometry, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, geometry = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        want_x, want_weight, want_bias, _ = ctx.needs_input_grad
        want_x = want_x and _engine_needs(x)
        want_weight = want_weight and _engine_needs(weight)
        if not torch.is_grad_enabled():  # no create_graph: one kernel call, bias gradient included
            stride, padding, dilation, groups = ctx.geometry
            bias_sizes = [weight.shape[0]] if want_bias else None
            grad_x, grad_weight, grad_bias = _convolution_backward(
                grad_out, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
                [want_x, want_weight, want_bias],
            )
            return grad_x, grad_weight, grad_bias, None
        grad_x = grad_weight = None
        if want_x or want_weight:
            grad_x, grad_weight = _ConvolutionBackward.apply(x, weight, grad_out, ctx.geometry, want_x, want_weight)
        grad_bias = grad_out.sum((0, 2, 3)) if want_bias else None
        return grad_x, grad_weight, grad_bias, None


class _ConvolutionBackward(torch.autograd.Function):
    """(x, W, gy) -> (gx, gW); the entries not asked for are None."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, grad_out: Tensor, geometry, want_x: bool, want_weight: bool):
        stride, padding, dilation, groups = geometry
        grad_x, grad_weight, _ = _convolution_backward(
            grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [want_x, want_weight, False]
        )
        return grad_x, grad_weight

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, grad_out, geometry, _, _ = inputs
        ctx.save_for_backward(x, weight, grad_out)
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad_grad_x: Tensor | None, grad_grad_weight: Tensor | None):
        x, weight, grad_out = ctx.saved_tensors
        geometry = ctx.geometry
        groups = geometry[3]
        d_x = d_weight = d_grad_out = None
        if grad_grad_x is not None and grad_grad_weight is not None and groups == 1:
            if ctx.needs_input_grad[2]:
                stacked_x, stacked_weight = torch.cat([grad_grad_x, x], 1), torch.cat([weight, grad_grad_weight], 1)
                d_grad_out = _forward(stacked_x, stacked_weight, geometry)
        elif ctx.needs_input_grad[2]:
            if grad_grad_x is not None:
                d_grad_out = _forward(grad_grad_x, weight, geometry)
            if grad_grad_weight is not None:
                term = _forward(x, grad_grad_weight, geometry)
                d_grad_out = term if d_grad_out is None else d_grad_out + term
        if grad_grad_x is not None and ctx.needs_input_grad[1]:
            d_weight = _weight_grad(grad_out, grad_grad_x, weight, geometry)
        if grad_grad_weight is not None and ctx.needs_input_grad[0]:
            d_x = _input_grad(grad_out, x, grad_grad_weight, geometry)
        return d_x, d_weight, d_grad_out, None, None, None
