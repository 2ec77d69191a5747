"""Triton kernels of ``instance_norm_relu_pool``: forward, backward and double backward, one program per feature map.

Per (image, channel) map of M = H * W values, with z = (x - mean) * rstd, a = weight * z + bias, mask = [a > 0]:

    y = pool(relu(a))                                  pool: 2x2 average (floor) or the identity
    backward:  grad_a = mask * pool^T(grad_y),  grad_weight = sum(grad_a * z),  grad_bias = sum(grad_a),
               grad_x = L(weight * grad_a),      L(v) = rstd * (v - mean(v) - z * mean(v * z))

L is the Jacobian of z w.r.t. x, and it is symmetric. The double backward differentiates
``<gg_x, grad_x> + gg_weight * grad_weight + gg_bias * grad_bias`` w.r.t. grad_y, x and weight (the mask is
piecewise constant, so bias has no second-order term). With u = L(gg_x) and grad_z = weight * grad_a:

    d/d grad_y = pool(mask * (weight * u + gg_weight * z + gg_bias)),   d/d weight = sum(u * grad_a),
    d/d x      = L(t) - rstd^2 * q * z / M,
    t = gg_weight * grad_a - rstd * (gg_x * mean(grad_z * z) + mean(gg_x * z) * grad_z),
    q = <gg_x, grad_z - mean(grad_z) - z * mean(grad_z * z)>

(the q term is the derivative of rstd, the t term that of z in L). These are the formulas of the C++ ops
``fastdd::instance_norm_relu_pool*``, and the launchers take and return what those ops do.

One program handles one map, sweeping it in blocks of ``BLOCK`` lanes (the next power of two >= M, at most
``MAX_BLOCK``): each pass accumulates its sums lane-wise over the blocks and reduces them once at the end, the last
pass writes the outputs. The forward makes two passes (mean, then the centred variance) and an output pass, the
backward one pass of sums and an output pass, the double backward two passes of sums and an output pass. A map of
one block is re-read from cache; its sums equal a single reduction of the whole map. Pooled outputs are computed
per output pixel from the four input pixels of its cell, read again from memory; the pooling adjoint reads
``grad_y`` at each input pixel's cell. The per-channel weight and
bias gradients are written as per-map partials [N, C] and summed over N by the launchers, deterministically.

dtypes: the kernels compute in the dtype of ``mean`` / ``rstd`` (float32 for a bfloat16 or float16 x, else x's):
every value loaded is cast to it (x, grad_y and gg_x in x's dtype, weight, bias and their cotangents in float32 or
x's), sums accumulate in it, and stores round to the output's dtype (x's for the maps, the statistics' for the
partials, which the launchers cast to weight's dtype after summing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdd.precision import compute_dtype

from .launch_device import on_input_device


@triton.jit
def _map_program(C, H, W, OH, OW):
    """This program's map: (flat map index as int64, its channel, offset of its input, offset of its output)."""
    map_index = tl.program_id(0).to(tl.int64)
    return map_index, map_index % C, map_index * H * W, map_index * OH * OW


@triton.jit
def _cell_offset(o, OW, W, DI: tl.constexpr, DJ: tl.constexpr):
    """Offset in the input map of pixel (DI, DJ) of the 2x2 cell of output pixel o."""
    return (2 * (o // OW) + DI) * W + 2 * (o % OW) + DJ


@triton.jit
def _activation_at(x_ptr, offset, o_ok, mean, rstd, w, b):
    """relu(weight * z + bias) at input pixels ``offset``, in mean's dtype."""
    x = tl.load(x_ptr + offset, mask=o_ok, other=0.0).to(mean.dtype)
    return tl.maximum(w * ((x - mean) * rstd) + b, 0.0)


@triton.jit
def _pooled_activation(x_ptr, o, o_ok, OW, W, mean, rstd, w, b):
    """pool(relu(weight * z + bias)) at output pixels o, summed in the C++ kernel's order."""
    top_left = _activation_at(x_ptr, _cell_offset(o, OW, W, 0, 0), o_ok, mean, rstd, w, b)
    top_right = _activation_at(x_ptr, _cell_offset(o, OW, W, 0, 1), o_ok, mean, rstd, w, b)
    bottom_left = _activation_at(x_ptr, _cell_offset(o, OW, W, 1, 0), o_ok, mean, rstd, w, b)
    bottom_right = _activation_at(x_ptr, _cell_offset(o, OW, W, 1, 1), o_ok, mean, rstd, w, b)
    return 0.25 * ((top_left + top_right) + (bottom_left + bottom_right))


@triton.jit
def _grad_grad_y_at(x_ptr, gg_x_ptr, offset, o_ok, mean, rstd, w, b, ggw, ggb, mean_g, mean_gxz):
    """mask * (weight * u + gg_weight * z + gg_bias), u = L(gg_x), at input pixels ``offset``."""
    z = (tl.load(x_ptr + offset, mask=o_ok, other=0.0).to(mean.dtype) - mean) * rstd
    u = rstd * (tl.load(gg_x_ptr + offset, mask=o_ok, other=0.0).to(mean.dtype) - mean_g - z * mean_gxz)
    return tl.where(w * z + b > 0.0, w * u + ggw * z + ggb, 0.0)


@triton.jit
def _pooled_grad_grad_y(x_ptr, gg_x_ptr, o, o_ok, OW, W, mean, rstd, w, b, ggw, ggb, mean_g, mean_gxz):
    """pool(mask * (weight * u + gg_weight * z + gg_bias)) at output pixels o."""
    top_left = _grad_grad_y_at(x_ptr, gg_x_ptr, _cell_offset(o, OW, W, 0, 0), o_ok, mean, rstd, w, b, ggw, ggb,
                               mean_g, mean_gxz)
    top_right = _grad_grad_y_at(x_ptr, gg_x_ptr, _cell_offset(o, OW, W, 0, 1), o_ok, mean, rstd, w, b, ggw, ggb,
                                mean_g, mean_gxz)
    bottom_left = _grad_grad_y_at(x_ptr, gg_x_ptr, _cell_offset(o, OW, W, 1, 0), o_ok, mean, rstd, w, b, ggw, ggb,
                                  mean_g, mean_gxz)
    bottom_right = _grad_grad_y_at(x_ptr, gg_x_ptr, _cell_offset(o, OW, W, 1, 1), o_ok, mean, rstd, w, b, ggw, ggb,
                                   mean_g, mean_gxz)
    return 0.25 * ((top_left + top_right) + (bottom_left + bottom_right))


@triton.jit
def _sqrt_rn(v):
    """Correctly rounded sqrt: ``tl.sqrt`` may be an approximation in float32, ``tl.sqrt_rn`` is float32 only."""
    if v.dtype == tl.float64:
        root = tl.sqrt(v)
    else:
        root = tl.sqrt_rn(v)
    return root


@triton.jit
def _unpooled(grad_y_ptr, k, ok, W, OH, OW, POOL: tl.constexpr, DTYPE: tl.constexpr):
    """pool^T(grad_y) at input pixels k in DTYPE: a quarter of their cell's gradient, 0 on a dropped row or column."""
    if POOL:
        i = k // W
        j = k % W
        inside = ok & (i < 2 * OH) & (j < 2 * OW)
        unpooled = 0.25 * tl.load(grad_y_ptr + (i // 2) * OW + j // 2, mask=inside, other=0.0).to(DTYPE)
    else:
        unpooled = tl.load(grad_y_ptr + k, mask=ok, other=0.0).to(DTYPE)
    return unpooled


@triton.jit
def _normalised(x_map, at, ok, mean, rstd):
    """z = (x - mean) * rstd at offsets ``at`` of the map in mean's dtype, 0 outside it."""
    return tl.where(ok, (tl.load(x_map + at, mask=ok, other=0.0).to(mean.dtype) - mean) * rstd, 0.0)


@triton.jit
def _gated(grad_y_map, at, ok, z, w, b, W, OH, OW, POOL: tl.constexpr):
    """grad_a = mask * pool^T(grad_y) at offsets ``at`` of the map (in z's dtype), mask = [weight * z + bias > 0]."""
    return tl.where(ok & (w * z + b > 0.0), _unpooled(grad_y_map, at, ok, W, OH, OW, POOL, z.dtype), 0.0)


@triton.jit
def _forward_kernel(x_ptr, weight_ptr, bias_ptr, eps_ptr, y_ptr, mean_ptr, rstd_ptr, C, H, W, OH, OW,
                    POOL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_OUT: tl.constexpr):
    map_index, c, x_base, y_base = _map_program(C, H, W, OH, OW)
    dtype = mean_ptr.dtype.element_ty  # the compute dtype
    x_map = x_ptr + x_base
    size = H * W
    n = tl.cast(size, dtype)
    k = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype)
    for start in range(0, size, BLOCK):
        total += tl.load(x_map + start + k, mask=start + k < size, other=0.0).to(dtype)
    mean = tl.sum(total, axis=0) / n
    # Two passes, as the C++ kernel: no cancellation in the variance.
    squares = tl.zeros([BLOCK], dtype)
    for start in range(0, size, BLOCK):
        ok = start + k < size
        centred = tl.where(ok, tl.load(x_map + start + k, mask=ok, other=0.0).to(dtype) - mean, 0.0)
        squares += centred * centred
    rstd = 1.0 / _sqrt_rn(tl.sum(squares, axis=0) / n + tl.load(eps_ptr))
    tl.store(mean_ptr + map_index, mean)
    tl.store(rstd_ptr + map_index, rstd)
    w = tl.load(weight_ptr + c).to(dtype)
    b = tl.load(bias_ptr + c).to(dtype)
    if POOL:
        for out_start in range(0, OH * OW, BLOCK_OUT):
            o = out_start + tl.arange(0, BLOCK_OUT)
            o_ok = o < OH * OW
            y = _pooled_activation(x_map, o, o_ok, OW, W, mean, rstd, w, b)
            tl.store(y_ptr + y_base + o, y, mask=o_ok)
    else:
        for start in range(0, size, BLOCK):
            ok = start + k < size
            x = tl.load(x_map + start + k, mask=ok, other=0.0).to(dtype)
            tl.store(y_ptr + y_base + start + k, tl.maximum(w * ((x - mean) * rstd) + b, 0.0), mask=ok)


@triton.jit
def _backward_kernel(grad_y_ptr, x_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, grad_x_ptr, weight_part_ptr,
                     bias_part_ptr, C, H, W, OH, OW, POOL: tl.constexpr, BLOCK: tl.constexpr):
    map_index, c, x_base, y_base = _map_program(C, H, W, OH, OW)
    dtype = mean_ptr.dtype.element_ty  # the compute dtype
    x_map = x_ptr + x_base
    grad_y_map = grad_y_ptr + y_base
    size = H * W
    k = tl.arange(0, BLOCK)
    m = tl.load(mean_ptr + map_index)
    r = tl.load(rstd_ptr + map_index)
    w = tl.load(weight_ptr + c).to(dtype)
    b = tl.load(bias_ptr + c).to(dtype)
    ga_total = tl.zeros([BLOCK], dtype)
    gaz_total = tl.zeros([BLOCK], dtype)
    for start in range(0, size, BLOCK):
        at = start + k
        ok = at < size
        z = _normalised(x_map, at, ok, m, r)
        grad_a = _gated(grad_y_map, at, ok, z, w, b, W, OH, OW, POOL)
        ga_total += grad_a
        gaz_total += grad_a * z
    sum_ga = tl.sum(ga_total, axis=0)
    sum_gaz = tl.sum(gaz_total, axis=0)
    tl.store(weight_part_ptr + map_index, sum_gaz)
    tl.store(bias_part_ptr + map_index, sum_ga)
    n = tl.cast(size, dtype)
    for start in range(0, size, BLOCK):
        at = start + k
        ok = at < size
        z = _normalised(x_map, at, ok, m, r)
        grad_a = _gated(grad_y_map, at, ok, z, w, b, W, OH, OW, POOL)
        grad_x = (r * w) * (grad_a - sum_ga / n - z * (sum_gaz / n))
        tl.store(grad_x_ptr + x_base + at, grad_x, mask=ok)


@triton.jit
def _double_backward_kernel(grad_y_ptr, x_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, gg_x_ptr, gg_weight_ptr,
                            gg_bias_ptr, grad_grad_y_ptr, grad_x_ptr, weight_part_ptr, C, H, W, OH, OW,
                            POOL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_OUT: tl.constexpr):
    map_index, c, x_base, y_base = _map_program(C, H, W, OH, OW)
    dtype = mean_ptr.dtype.element_ty  # the compute dtype
    x_map = x_ptr + x_base
    gg_x_map = gg_x_ptr + x_base
    grad_y_map = grad_y_ptr + y_base
    size = H * W
    n = tl.cast(size, dtype)
    k = tl.arange(0, BLOCK)
    m = tl.load(mean_ptr + map_index)
    r = tl.load(rstd_ptr + map_index)
    w = tl.load(weight_ptr + c).to(dtype)
    b = tl.load(bias_ptr + c).to(dtype)
    ggw = tl.load(gg_weight_ptr + c).to(dtype)
    ggb = tl.load(gg_bias_ptr + c).to(dtype)

    # Pass 1: the sums over the map that the second-order terms need.
    ga_total = tl.zeros([BLOCK], dtype)
    gaz_total = tl.zeros([BLOCK], dtype)
    g_total = tl.zeros([BLOCK], dtype)
    gz_total = tl.zeros([BLOCK], dtype)
    gga_total = tl.zeros([BLOCK], dtype)
    for start in range(0, size, BLOCK):
        at = start + k
        ok = at < size
        z = _normalised(x_map, at, ok, m, r)
        g = tl.load(gg_x_map + at, mask=ok, other=0.0).to(dtype)
        grad_a = _gated(grad_y_map, at, ok, z, w, b, W, OH, OW, POOL)
        ga_total += grad_a
        gaz_total += grad_a * z
        g_total += g
        gz_total += g * z
        gga_total += g * grad_a
    mean_gz = w * tl.sum(ga_total, axis=0) / n  # mean(grad_z)
    mean_gzz = w * tl.sum(gaz_total, axis=0) / n  # mean(grad_z * z)
    sum_g = tl.sum(g_total, axis=0)
    sum_gxz = tl.sum(gz_total, axis=0)
    mean_g = sum_g / n
    mean_gxz = sum_gxz / n  # mean(gg_x * z)
    q = w * tl.sum(gga_total, axis=0) - mean_gz * sum_g - mean_gzz * sum_gxz

    # Pass 2: d/d weight, and the sums of t.
    ua_total = tl.zeros([BLOCK], dtype)
    t_total = tl.zeros([BLOCK], dtype)
    tz_total = tl.zeros([BLOCK], dtype)
    for start in range(0, size, BLOCK):
        at = start + k
        ok = at < size
        z = _normalised(x_map, at, ok, m, r)
        g = tl.load(gg_x_map + at, mask=ok, other=0.0).to(dtype)
        grad_a = _gated(grad_y_map, at, ok, z, w, b, W, OH, OW, POOL)
        u = r * (g - mean_g - z * mean_gxz)
        ua_total += u * grad_a
        t = ggw * grad_a - r * (g * mean_gzz + mean_gxz * w * grad_a)
        t_total += t
        tz_total += t * z
    tl.store(weight_part_ptr + map_index, tl.sum(ua_total, axis=0))
    mean_t = tl.sum(t_total, axis=0) / n
    mean_tz = tl.sum(tz_total, axis=0) / n

    # Pass 3: d/d x (and d/d grad_y without pooling), per pixel.
    for start in range(0, size, BLOCK):
        at = start + k
        ok = at < size
        z = _normalised(x_map, at, ok, m, r)
        g = tl.load(gg_x_map + at, mask=ok, other=0.0).to(dtype)
        grad_a = _gated(grad_y_map, at, ok, z, w, b, W, OH, OW, POOL)
        t = ggw * grad_a - r * (g * mean_gzz + mean_gxz * w * grad_a)
        grad_x = r * (t - mean_t - z * mean_tz) - (r * r * q / n) * z
        tl.store(grad_x_ptr + x_base + at, grad_x, mask=ok)
        if not POOL:
            u = r * (g - mean_g - z * mean_gxz)
            grad_grad_y = tl.where(w * z + b > 0.0, w * u + ggw * z + ggb, 0.0)
            tl.store(grad_grad_y_ptr + y_base + at, grad_grad_y, mask=ok)

    if POOL:
        for out_start in range(0, OH * OW, BLOCK_OUT):
            o = out_start + tl.arange(0, BLOCK_OUT)
            o_ok = o < OH * OW
            grad_grad_y = _pooled_grad_grad_y(x_map, gg_x_map, o, o_ok, OW, W, m, r, w, b, ggw, ggb, mean_g,
                                              mean_gxz)
            tl.store(grad_grad_y_ptr + y_base + o, grad_grad_y, mask=o_ok)


# --------------------------------------------------------------------------------------------------- launchers


# Lanes of one program: a larger map is swept in blocks of this many values, which bounds the registers a program
# needs. One block of a whole 128 x 128 or 224 x 224 map spills; 4096 lanes still spill in the float64 double
# backward on sm_90; 2048 lanes with 8 warps (8 values a thread) do not.
MAX_BLOCK = 2048


class _Geometry:
    """Launch geometry of [N, C, H, W] maps: the grid (one program per map), output size and block sizes."""

    def __init__(self, x: Tensor, pool: bool):
        batch, channels, height, width = x.shape
        self.maps = batch * channels
        self.out_height, self.out_width = (height // 2, width // 2) if pool else (height, width)
        self.sizes = {"C": channels, "H": height, "W": width, "OH": self.out_height, "OW": self.out_width}
        self.block = min(triton.next_power_of_2(height * width), MAX_BLOCK)
        self.block_out = min(triton.next_power_of_2(max(1, self.out_height * self.out_width)), self.block)
        self.num_warps = max(1, min(8, self.block // 256))


@on_input_device
def instance_norm_relu_pool_forward(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, pool: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, C, H, W] float32/float64/bfloat16/float16, weight, bias [C] (x's dtype, or float32 for a half-precision
    x) -> (y [N, C, H // 2, W // 2] (pool) or [N, C, H, W] in x's dtype, mean [N, C], rstd [N, C] in the compute
    dtype): the outputs of ``torch.ops.fastdd.instance_norm_relu_pool``. No autograd (``fastdd.ops.norm_relu_pool``
    wraps the three launchers in autograd Functions)."""
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    geometry = _Geometry(x, pool)
    y = x.new_empty(*x.shape[:2], geometry.out_height, geometry.out_width)
    mean = x.new_empty(x.shape[:2], dtype=compute_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    if geometry.maps == 0:
        return y, mean, rstd
    # eps as a tensor of the compute dtype: a Python float argument would reach a float64 kernel rounded to float32.
    eps_tensor = torch.full((1,), eps, dtype=mean.dtype, device=x.device)
    _forward_kernel[(geometry.maps,)](
        x, weight, bias, eps_tensor, y, mean, rstd, **geometry.sizes, POOL=pool, BLOCK=geometry.block,
        BLOCK_OUT=geometry.block_out, num_warps=geometry.num_warps,
    )
    return y, mean, rstd


@on_input_device
def instance_norm_relu_pool_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, pool: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the forward: grad_y (y's shape), x [N, C, H, W], weight, bias [C], mean, rstd [N, C] ->
    (grad_x [N, C, H, W] in x's dtype, grad_weight, grad_bias [C] in weight's), as
    ``torch.ops.fastdd.instance_norm_relu_pool_backward``."""
    grad_y, x, weight, bias, mean, rstd = (t.contiguous() for t in (grad_y, x, weight, bias, mean, rstd))
    geometry = _Geometry(x, pool)
    grad_x = torch.empty_like(x)
    weight_part = torch.zeros_like(mean)
    bias_part = torch.zeros_like(mean)
    if geometry.maps > 0:
        _backward_kernel[(geometry.maps,)](
            grad_y, x, weight, bias, mean, rstd, grad_x, weight_part, bias_part, **geometry.sizes, POOL=pool,
            BLOCK=geometry.block, num_warps=geometry.num_warps,
        )
    return grad_x, weight_part.sum(0).to(weight.dtype), bias_part.sum(0).to(bias.dtype)


@on_input_device
def instance_norm_relu_pool_double_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    rstd: Tensor,
    gg_x: Tensor | None,
    gg_weight: Tensor | None,
    gg_bias: Tensor | None,
    pool: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``<gg_x, grad_x> + <gg_weight, grad_weight> + <gg_bias, grad_bias>`` (the backward's outputs)
    w.r.t. grad_y, x and weight: (grad_grad_y (grad_y's shape), grad_x [N, C, H, W], grad_weight [C]), as
    ``torch.ops.fastdd.instance_norm_relu_pool_double_backward``. A missing cotangent (None) counts as zeros;
    gg_x is [N, C, H, W] in x's dtype, gg_weight and gg_bias [C] in weight's; the results take the dtypes of
    grad_y, x and weight."""
    grad_y, x, weight, bias, mean, rstd = (t.contiguous() for t in (grad_y, x, weight, bias, mean, rstd))
    gg_x = torch.zeros_like(x) if gg_x is None else gg_x.contiguous()
    gg_weight = torch.zeros_like(weight) if gg_weight is None else gg_weight.contiguous()
    gg_bias = torch.zeros_like(bias) if gg_bias is None else gg_bias.contiguous()
    geometry = _Geometry(x, pool)
    grad_grad_y = torch.empty_like(grad_y)
    grad_x = torch.empty_like(x)
    weight_part = torch.zeros_like(mean)
    if geometry.maps > 0:
        _double_backward_kernel[(geometry.maps,)](
            grad_y, x, weight, bias, mean, rstd, gg_x, gg_weight, gg_bias, grad_grad_y, grad_x, weight_part,
            **geometry.sizes, POOL=pool, BLOCK=geometry.block, BLOCK_OUT=geometry.block_out,
            num_warps=geometry.num_warps,
        )
    return grad_grad_y, grad_x, weight_part.sum(0).to(weight.dtype)
