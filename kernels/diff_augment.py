"""Triton kernels of ``diff_augment``: the DSA map A(x) and its transpose A^T(g), for any family sequence.

Every geometric family sends an output pixel to source pixels of its input with weights: crop, cutout and flip to
one (weight 0 or 1), scale and rotate to the 4 bilinear corners. Walking the families from the last to the first
turns each output pixel into at most 16 weighted source pixels of x (two bilinear families: 4 x 4 taps), held as a
[BLOCK_P, TAPS] block; tap ``t`` takes corner ``(t >> 2d) & 3`` at the ``d``-th bilinear family met on the way.

Color commutes with the spatial maps except for its image mean. With the families split as
``A = G_post . color . G_pre`` and ``G = G_post G_pre``:

    A x   = k ((G x - P G x) s + P G x) + ((1 - k) m + delta) G_post(1),        m = mean(G_pre x)
    A^T g = k ((G^T g - P G^T g) s + P G^T g) + (1 - k) / N <G_post(1), g> G_pre^T(1)

where P averages over channels at each pixel, N = C H W, and G_post(1) is the sum of the tap weights at the
moment the walk passes color. So the forward is a reduction kernel (m, only with color) and a gather kernel; the
adjoint is a scatter kernel (atomics) and, with color, a kernel that applies the per-pixel color terms.

dtypes: the kernels compute in ``DTYPE``, float32 for bfloat16 and float16 images (which are loaded as they are and
cast) and the images' dtype otherwise; the parameters, the image means and the adjoint's scatter targets are in
``DTYPE`` too, and the results are stored in the images' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdd.precision import compute_dtype

from .launch_device import on_input_device

# Family codes of the constexpr chain (4 bits per family, first family in the lowest bits).
_COLOR = tl.constexpr(1)
_CROP = tl.constexpr(2)
_CUTOUT = tl.constexpr(3)
_FLIP = tl.constexpr(4)
_SCALE = tl.constexpr(5)
_ROTATE = tl.constexpr(6)
_CODES = {"color": 1, "crop": 2, "cutout": 3, "flip": 4, "scale": 5, "rotate": 6}
_BILINEAR = ("scale", "rotate")

# Columns of the per-image parameter rows the kernels read (real: in the images' dtype; int: int32).
_REAL_COLUMNS = tl.constexpr(7)  # brightness, saturation, contrast, scale_x, scale_y, cos(rotation), sin(rotation)
_INT_COLUMNS = tl.constexpr(5)  # crop_row, crop_col, cutout_row, cutout_col, flip


# ------------------------------------------------------------------------------------------ one helper per family


@triton.jit
def _crop(row, col, weight, int_row, H, W):
    row = row + tl.load(int_row + 0)
    col = col + tl.load(int_row + 1)
    inside = (row >= 0) & (row < H) & (col >= 0) & (col < W)
    return row, col, tl.where(inside, weight, 0.0)


@triton.jit
def _cutout(row, col, weight, int_row, cut_h, cut_w):
    top = tl.load(int_row + 2) - cut_h // 2
    left = tl.load(int_row + 3) - cut_w // 2
    cut = (row >= top) & (row < top + cut_h) & (col >= left) & (col < left + cut_w)
    return row, col, tl.where(cut, 0.0, weight)


@triton.jit
def _flip(row, col, weight, int_row, W):
    col = tl.where(tl.load(int_row + 4) != 0, W - 1 - col, col)
    return row, col, weight


@triton.jit
def _base_coordinate(i, n, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """F.affine_grid's normalised coordinate of pixel i of n (torch.linspace's two-sided formula)."""
    nf = tl.cast(n, DTYPE)
    step = 2.0 / tl.maximum(nf - 1.0, 1.0)
    value = tl.where(i < n // 2, -1.0 + step * tl.cast(i, DTYPE), 1.0 - step * tl.cast(n - 1 - i, DTYPE))
    if not ALIGN:
        value = value * (nf - 1.0) / nf
    return tl.where(n > 1, value, 0.0)


@triton.jit
def _pixel_coordinate(g, n, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """F.grid_sample's unnormalisation of coordinate g along an axis of n pixels."""
    nf = tl.cast(n, DTYPE)
    if ALIGN:
        return (g + 1.0) / 2.0 * (nf - 1.0)
    return ((g + 1.0) * nf - 1.0) / 2.0


@triton.jit
def _bilinear(row, col, weight, taps, m00, m01, m10, m11, H, W, DIGIT: tl.constexpr, DTYPE: tl.constexpr,
              ALIGN: tl.constexpr):
    """Output coordinate (u, v) reads the input at (m00 u + m01 v, m10 u + m11 v); tap t takes one corner."""
    u = _base_coordinate(col, W, DTYPE, ALIGN)
    v = _base_coordinate(row, H, DTYPE, ALIGN)
    ix = _pixel_coordinate(m00 * u + m01 * v, W, DTYPE, ALIGN)
    iy = _pixel_coordinate(m10 * u + m11 * v, H, DTYPE, ALIGN)
    useful = (ix > -1.0) & (ix < tl.cast(W, DTYPE)) & (iy > -1.0) & (iy < tl.cast(H, DTYPE))  # False for NaN
    ix = tl.where(useful, ix, 0.0)
    iy = tl.where(useful, iy, 0.0)
    x0 = tl.floor(ix)
    y0 = tl.floor(iy)
    fx = ix - x0
    fy = iy - y0
    corner = (taps >> (2 * DIGIT)) & 3
    dx = (corner & 1)[None, :]
    dy = (corner >> 1)[None, :]
    col = x0.to(tl.int32) + dx
    row = y0.to(tl.int32) + dy
    share = tl.where(dx == 1, fx, 1.0 - fx) * tl.where(dy == 1, fy, 1.0 - fy)
    inside = useful & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    return row, col, tl.where(inside, weight * share, 0.0)


@triton.jit
def _scale(row, col, weight, taps, real_row, H, W, DIGIT: tl.constexpr, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    sx = tl.load(real_row + 3)
    sy = tl.load(real_row + 4)
    return _bilinear(row, col, weight, taps, sx, 0.0, 0.0, sy, H, W, DIGIT, DTYPE, ALIGN)


@triton.jit
def _rotate(row, col, weight, taps, real_row, H, W, DIGIT: tl.constexpr, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    cos = tl.load(real_row + 5)
    sin = tl.load(real_row + 6)
    return _bilinear(row, col, weight, taps, cos, -sin, sin, cos, H, W, DIGIT, DTYPE, ALIGN)


@triton.jit
def _walk(row, col, weight, taps, real_row, int_row, H, W, cut_h, cut_w, START: tl.constexpr, STOP: tl.constexpr,
          CHAIN: tl.constexpr, DIGITS: tl.constexpr, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """Send output positions back through the geometric families STOP - 1, ..., START of the chain (color: none)."""
    # The loop variable is the family index itself: compiled Triton refuses a constexpr assigned in an unrolled
    # loop body ("constexpr cannot be reassigned"), which the interpreter accepts.
    for i in tl.static_range(STOP - 1, START - 1, -1):
        code = (CHAIN >> (4 * i)) & 15
        digit = (DIGITS >> i) & 1
        if code == _CROP:
            row, col, weight = _crop(row, col, weight, int_row, H, W)
        elif code == _CUTOUT:
            row, col, weight = _cutout(row, col, weight, int_row, cut_h, cut_w)
        elif code == _FLIP:
            row, col, weight = _flip(row, col, weight, int_row, W)
        elif code == _SCALE:
            row, col, weight = _scale(row, col, weight, taps, real_row, H, W, digit, DTYPE, ALIGN)
        elif code == _ROTATE:
            row, col, weight = _rotate(row, col, weight, taps, real_row, H, W, digit, DTYPE, ALIGN)
    return row, col, weight


@triton.jit
def _image_start(image, C, pixels):
    """Offset of image ``image`` in a [B, C, H, W] tensor, in int64: B * C * H * W may reach 2^31 (offsets inside
    one image stay int32)."""
    return image.to(tl.int64) * C * pixels


@triton.jit
def _start(pixels, W, TAPS: tl.constexpr, BLOCK_P: tl.constexpr, DTYPE: tl.constexpr):
    """Positions p of this program's block, repeated over TAPS taps: (p, row, col, weight 1 inside the image)."""
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    taps = tl.arange(0, TAPS)
    zero = tl.zeros([BLOCK_P, TAPS], dtype=tl.int32)
    row = (p // W)[:, None] + zero
    col = (p % W)[:, None] + zero
    weight = tl.where((p < pixels)[:, None], 1.0, 0.0).to(DTYPE) + tl.zeros([BLOCK_P, TAPS], dtype=DTYPE)
    return p, taps, row, col, weight


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _pre_color_sum_kernel(x_ptr, partial_ptr, real_ptr, int_ptr, param_stride, C, H, W, cut_h, cut_w,
                          COLOR_AT: tl.constexpr, CHAIN: tl.constexpr, DIGITS: tl.constexpr, TAPS: tl.constexpr,
                          DTYPE: tl.constexpr, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """partial[image, block] = sum over this block's pixels and all channels of G_pre x (color's input)."""
    image = tl.program_id(0)
    pixels = H * W
    real_row = real_ptr + image * param_stride * _REAL_COLUMNS
    int_row = int_ptr + image * param_stride * _INT_COLUMNS
    p, taps, row, col, weight = _start(pixels, W, TAPS, BLOCK_P, DTYPE)
    row, col, weight = _walk(row, col, weight, taps, real_row, int_row, H, W, cut_h, cut_w, 0, COLOR_AT, CHAIN,
                             DIGITS, DTYPE, ALIGN)
    channel = tl.arange(0, BLOCK_C)
    ok = (channel < C)[:, None, None] & (weight != 0.0)[None, :, :]
    offsets = channel[:, None, None] * pixels + (row * W + col)[None, :, :]
    values = tl.load(x_ptr + _image_start(image, C, pixels) + offsets, mask=ok, other=0.0).to(DTYPE)
    tl.store(partial_ptr + image * tl.num_programs(1) + tl.program_id(1), tl.sum(values * weight[None, :, :]))


@triton.jit
def _forward_kernel(x_ptr, out_ptr, mean_ptr, real_ptr, int_ptr, param_stride, C, H, W, cut_h, cut_w,
                    LENGTH: tl.constexpr, COLOR_AT: tl.constexpr, CHAIN: tl.constexpr, DIGITS: tl.constexpr,
                    TAPS: tl.constexpr, POST_TAPS: tl.constexpr, WITH_OFFSET: tl.constexpr, DTYPE: tl.constexpr,
                    ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """out = A x on a block of output pixels of one image, all channels (COLOR_AT == LENGTH: no color)."""
    image = tl.program_id(0)
    pixels = H * W
    real_row = real_ptr + image * param_stride * _REAL_COLUMNS
    int_row = int_ptr + image * param_stride * _INT_COLUMNS
    p, taps, row, col, weight = _start(pixels, W, TAPS, BLOCK_P, DTYPE)
    if COLOR_AT < LENGTH:
        row, col, weight = _walk(row, col, weight, taps, real_row, int_row, H, W, cut_h, cut_w, COLOR_AT + 1,
                                 LENGTH, CHAIN, DIGITS, DTYPE, ALIGN)
        # Taps that differ only in corners still to be chosen are copies: count one of each.
        ones_post = tl.sum(tl.where((taps < POST_TAPS)[None, :], weight, 0.0), axis=1)
        row, col, weight = _walk(row, col, weight, taps, real_row, int_row, H, W, cut_h, cut_w, 0, COLOR_AT, CHAIN,
                                 DIGITS, DTYPE, ALIGN)
    else:
        row, col, weight = _walk(row, col, weight, taps, real_row, int_row, H, W, cut_h, cut_w, 0, LENGTH, CHAIN,
                                 DIGITS, DTYPE, ALIGN)
    channel = tl.arange(0, BLOCK_C)
    image_start = _image_start(image, C, pixels)
    base = channel[:, None] * pixels
    ok = (channel < C)[:, None, None] & (weight != 0.0)[None, :, :]
    values = tl.load(x_ptr + image_start + (base[:, :, None] + (row * W + col)[None, :, :]), mask=ok,
                     other=0.0).to(DTYPE)
    result = tl.sum(values * weight[None, :, :], axis=2)  # [BLOCK_C, BLOCK_P]: G x
    if COLOR_AT < LENGTH:
        saturation = tl.load(real_row + 1)
        contrast = tl.load(real_row + 2)
        constant = (1.0 - contrast) * tl.load(mean_ptr + image)
        if WITH_OFFSET:
            constant += tl.load(real_row + 0)
        pixel_mean = (tl.sum(result, axis=0) / tl.cast(C, DTYPE))[None, :]
        result = ((result - pixel_mean) * saturation + pixel_mean) * contrast + constant * ones_post[None, :]
    ok_out = (channel < C)[:, None] & (p < pixels)[None, :]
    tl.store(out_ptr + image_start + (base + p[None, :]), result, mask=ok_out)


@triton.jit
def _adjoint_scatter_kernel(grad_ptr, spread_ptr, ones_pre_ptr, partial_ptr, real_ptr, int_ptr, spread_slot_ptr,
                            spread_value_ptr, ones_slot_ptr, ones_value_ptr, param_stride, C, H, W, cut_h, cut_w,
                            LENGTH: tl.constexpr, COLOR_AT: tl.constexpr, CHAIN: tl.constexpr,
                            DIGITS: tl.constexpr, PRE_DIGITS: tl.constexpr, TAPS: tl.constexpr,
                            POST_TAPS: tl.constexpr, PRE_TAPS: tl.constexpr, DTYPE: tl.constexpr,
                            ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                            DETERMINISTIC: tl.constexpr):
    """spread += G^T grad (atomics). With color also ones_pre += G_pre^T(1) and partial = <G_post(1), grad> per
    block. DETERMINISTIC: no atomics; every term and its flat target go to the slot and value buffers instead (one
    entry per (image, channel, pixel, tap)), which the launcher adds in a fixed order."""
    image = tl.program_id(0)
    pixels = H * W
    real_row = real_ptr + image * param_stride * _REAL_COLUMNS
    int_row = int_ptr + image * param_stride * _INT_COLUMNS
    p, taps, row, col, weight = _start(pixels, W, TAPS, BLOCK_P, DTYPE)
    channel = tl.arange(0, BLOCK_C)
    image_start = _image_start(image, C, pixels)
    base = channel[:, None] * pixels
    grad = tl.load(grad_ptr + image_start + (base + p[None, :]), mask=(channel < C)[:, None] & (p < pixels)[None, :],
                   other=0.0).to(DTYPE)
    if COLOR_AT < LENGTH:
        row, col, weight = _walk(row, col, weight, taps, real_row, int_row, H, W, cut_h, cut_w, COLOR_AT + 1,
                                 LENGTH, CHAIN, DIGITS, DTYPE, ALIGN)
        ones_post = tl.sum(tl.where((taps < POST_TAPS)[None, :], weight, 0.0), axis=1)
        tl.store(partial_ptr + image * tl.num_programs(1) + tl.program_id(1), tl.sum(grad * ones_post[None, :]))
        row, col, weight = _walk(row, col, weight, taps, real_row, int_row, H, W, cut_h, cut_w, 0, COLOR_AT, CHAIN,
                                 DIGITS, DTYPE, ALIGN)
        # G_pre^T(1): the same block of pixels, now as positions of color's input, sent through G_pre only.
        _, pre_taps, pre_row, pre_col, pre_weight = _start(pixels, W, PRE_TAPS, BLOCK_P, DTYPE)
        pre_row, pre_col, pre_weight = _walk(pre_row, pre_col, pre_weight, pre_taps, real_row, int_row, H, W, cut_h,
                                             cut_w, 0, COLOR_AT, CHAIN, PRE_DIGITS, DTYPE, ALIGN)
        ones_target = _image_start(image, 1, pixels) + (pre_row * W + pre_col)
        if DETERMINISTIC:
            pre_slot = (_image_start(image, 1, pixels) + p[:, None]) * PRE_TAPS + pre_taps[None, :]
            in_block = (p < pixels)[:, None] & (pre_taps < PRE_TAPS)[None, :]
            tl.store(ones_slot_ptr + pre_slot, tl.where(pre_weight != 0.0, ones_target, 0), mask=in_block)
            tl.store(ones_value_ptr + pre_slot, pre_weight, mask=in_block)
        else:
            tl.atomic_add(ones_pre_ptr + ones_target, pre_weight, mask=pre_weight != 0.0)
    else:
        row, col, weight = _walk(row, col, weight, taps, real_row, int_row, H, W, cut_h, cut_w, 0, LENGTH, CHAIN,
                                 DIGITS, DTYPE, ALIGN)
    ok = (channel < C)[:, None, None] & (weight != 0.0)[None, :, :]
    targets = image_start + (base[:, :, None] + (row * W + col)[None, :, :])
    if DETERMINISTIC:
        slot = (image_start + base[:, :, None] + p[None, :, None]) * TAPS + taps[None, None, :]
        in_block = (channel < C)[:, None, None] & ((p < pixels)[:, None] & (taps < TAPS)[None, :])[None, :, :]
        tl.store(spread_slot_ptr + slot, tl.where(ok, targets, 0), mask=in_block)
        tl.store(spread_value_ptr + slot, tl.where(ok, grad[:, :, None] * weight[None, :, :], 0.0), mask=in_block)
    else:
        tl.atomic_add(spread_ptr + targets, grad[:, :, None] * weight[None, :, :], mask=ok)


@triton.jit
def _adjoint_color_kernel(spread_ptr, ones_pre_ptr, dot_ptr, out_ptr, real_ptr, param_stride, C, H, W,
                          DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """out = k ((G^T g - P G^T g) s + P G^T g) + (1 - k) / N <G_post(1), g> G_pre^T(1)."""
    image = tl.program_id(0)
    pixels = H * W
    real_row = real_ptr + image * param_stride * _REAL_COLUMNS
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    channel = tl.arange(0, BLOCK_C)
    ok = (channel < C)[:, None] & (p < pixels)[None, :]
    image_start = _image_start(image, C, pixels)
    offsets = channel[:, None] * pixels + p[None, :]
    spread = tl.load(spread_ptr + image_start + offsets, mask=ok, other=0.0)
    saturation = tl.load(real_row + 1)
    contrast = tl.load(real_row + 2)
    numel = tl.cast(C * pixels, DTYPE)
    ones_pre = tl.load(ones_pre_ptr + _image_start(image, 1, pixels) + p, mask=p < pixels, other=0.0)
    constant = (1.0 - contrast) / numel * tl.load(dot_ptr + image)
    pixel_mean = (tl.sum(spread, axis=0) / tl.cast(C, DTYPE))[None, :]
    result = ((spread - pixel_mean) * saturation + pixel_mean) * contrast + constant * ones_pre[None, :]
    tl.store(out_ptr + image_start + offsets, result, mask=ok)


# --------------------------------------------------------------------------------------------------- launchers

_TORCH_TO_TRITON = {torch.float32: tl.float32, torch.float64: tl.float64}


class _Chain:
    """Constexpr description of a family sequence: codes, the corner digit of each bilinear family, tap counts."""

    def __init__(self, families: str):
        names = [name for name in families.split("_") if name]
        self.length = len(names)
        self.code = sum(_CODES[name] << (4 * i) for i, name in enumerate(names))
        self.color_at = names.index("color") if "color" in names else self.length
        self.has_color = self.color_at < self.length
        self.digits = self._digits(names, self.length)  # the walk over the whole chain
        self.pre_digits = self._digits(names, self.color_at)  # the walk over the families before color
        post = sum(name in _BILINEAR for name in names[self.color_at + 1 :])
        pre = sum(name in _BILINEAR for name in names[: self.color_at])
        self.post_taps = 4**post
        self.pre_taps = 4**pre
        self.taps = 4 ** sum(name in _BILINEAR for name in names)

    @staticmethod
    def _digits(names: list[str], stop: int) -> int:
        """Bit i: the corner digit of family i in a walk from family stop - 1 down (bilinear families met after it)."""
        bits = 0
        for i in range(stop):
            met_later = sum(name in _BILINEAR for name in names[i + 1 : stop])
            bits |= (met_later & 1) << i
        return bits


def _prepare(images: Tensor, families: str, real_params: Tensor, int_params: Tensor):
    images = images.contiguous()
    dtype = compute_dtype(images.dtype)
    real = real_params.to(device=images.device, dtype=dtype)
    # The reference builds its rotation matrix in the compute dtype.
    rotation = real[:, 5]
    kernel_real = torch.cat([real[:, :5], rotation.cos()[:, None], rotation.sin()[:, None]], dim=1).contiguous()
    kernel_int = int_params.to(device=images.device, dtype=torch.int32).contiguous()
    batch, channels, height, width = images.shape
    chain = _Chain(families)
    block_c = triton.next_power_of_2(channels)
    block_p = max(16, min(triton.next_power_of_2(height * width), 4096 // (chain.taps * block_c)))
    common = dict(
        param_stride=0 if real.shape[0] == 1 else 1,
        C=channels,
        H=height,
        W=width,
        # A 4096-entry [BLOCK_P, TAPS] coordinate tile (one channel, one bilinear family) spills from 4 warps'
        # registers in float64 and nearly so in float32.
        num_warps=max(4, min(8, block_p * chain.taps // 256)),
    )
    return images, chain, kernel_real, kernel_int, block_c, block_p, common


@on_input_device
def diff_augment_forward(images: Tensor, families: str, real_params: Tensor, int_params: Tensor,
                         cutout_size: list[int], align_corners: bool, with_offset: bool = True) -> Tensor:
    """A(images) (``with_offset=False``: its linear part): images [B, C, H, W] float32/float64/bfloat16/float16 ->
    [B, C, H, W] in their dtype (computed in float32 for the half-precision dtypes).

    ``real_params`` [P, 6] float64 and ``int_params`` [P, 5] int64 with P = 1 (shared) or B, laid out as in the
    schema of ``torch.ops.fastdd.diff_augment``. No autograd (``fastdd.ops.augment`` wraps this).
    """
    images, chain, real, ints, block_c, block_p, common = _prepare(images, families, real_params, int_params)
    batch, channels, height, width = images.shape
    out = torch.empty_like(images)
    if images.numel() == 0:
        return out
    grid = (batch, triton.cdiv(height * width, block_p))
    dtype = _TORCH_TO_TRITON[real.dtype]
    means = real.new_zeros(batch)
    if chain.has_color:
        partial = real.new_empty(batch, grid[1])
        _pre_color_sum_kernel[grid](
            images, partial, real, ints, cut_h=cutout_size[0], cut_w=cutout_size[1], COLOR_AT=chain.color_at,
            CHAIN=chain.code, DIGITS=chain.pre_digits, TAPS=chain.pre_taps, DTYPE=dtype, ALIGN=align_corners,
            BLOCK_C=block_c, BLOCK_P=block_p, **common,
        )
        means = partial.sum(dim=1) / (channels * height * width)
    _forward_kernel[grid](
        images, out, means, real, ints, cut_h=cutout_size[0], cut_w=cutout_size[1], LENGTH=chain.length,
        COLOR_AT=chain.color_at, CHAIN=chain.code, DIGITS=chain.digits, TAPS=chain.taps, POST_TAPS=chain.post_taps,
        WITH_OFFSET=with_offset, DTYPE=dtype, ALIGN=align_corners, BLOCK_C=block_c, BLOCK_P=block_p, **common,
    )
    return out


@on_input_device
def diff_augment_adjoint(grad: Tensor, families: str, real_params: Tensor, int_params: Tensor,
                         cutout_size: list[int], align_corners: bool, deterministic: bool = False) -> Tensor:
    """A^T(grad), the gradient of ``diff_augment_forward`` w.r.t. its images: grad [B, C, H, W] -> [B, C, H, W] in
    grad's dtype (scattered into float32 for the half-precision dtypes).

    ``deterministic``: the scatter writes its terms to buffers (B * C * H * W * taps values and int64 targets, taps
    = 4 per bilinear family) that ``index_put_`` then adds in sorted order, instead of float atomics whose order, on
    a GPU, changes the result's last bits from run to run.
    """
    grad, chain, real, ints, block_c, block_p, common = _prepare(grad, families, real_params, int_params)
    batch, channels, height, width = grad.shape
    spread = torch.zeros_like(grad, dtype=real.dtype)  # the scatter's target, in the compute dtype
    if grad.numel() == 0:
        return spread.to(grad.dtype)
    grid = (batch, triton.cdiv(height * width, block_p))
    dtype = _TORCH_TO_TRITON[real.dtype]
    ones_pre = real.new_zeros(batch, height * width)
    partial = real.new_zeros(batch, grid[1])
    buffers = (spread, spread, ones_pre, ones_pre)  # unread placeholders unless deterministic
    if deterministic:
        spread_terms = grad.numel() * chain.taps
        ones_terms = ones_pre.numel() * chain.pre_taps if chain.has_color else 1
        buffers = (grad.new_zeros(spread_terms, dtype=torch.int64), real.new_zeros(spread_terms),
                   grad.new_zeros(ones_terms, dtype=torch.int64), real.new_zeros(ones_terms))
    _adjoint_scatter_kernel[grid](
        grad, spread, ones_pre, partial, real, ints, *buffers, cut_h=cutout_size[0], cut_w=cutout_size[1],
        LENGTH=chain.length, COLOR_AT=chain.color_at, CHAIN=chain.code, DIGITS=chain.digits,
        PRE_DIGITS=chain.pre_digits, TAPS=chain.taps, POST_TAPS=chain.post_taps, PRE_TAPS=chain.pre_taps,
        DTYPE=dtype, ALIGN=align_corners, BLOCK_C=block_c, BLOCK_P=block_p, DETERMINISTIC=deterministic, **common,
    )
    if deterministic:
        spread_slots, spread_values, ones_slots, ones_values = buffers
        spread.view(-1).index_put_((spread_slots,), spread_values, accumulate=True)
        if chain.has_color:
            ones_pre.view(-1).index_put_((ones_slots,), ones_values, accumulate=True)
    if not chain.has_color:
        return spread.to(grad.dtype)
    out = torch.empty_like(grad)
    _adjoint_color_kernel[grid](
        spread, ones_pre, partial.sum(dim=1), out, real, DTYPE=dtype, BLOCK_C=block_c, BLOCK_P=block_p, **common,
    )
    return out
