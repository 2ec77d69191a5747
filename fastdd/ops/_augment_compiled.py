"""The compiled backends of ``diff_augment``: kernel arguments from ``AugmentParams``, and autograd at any order.

Given its parameters the augmentation is an affine map of the images, ``A(x) = L x + b`` (``b``: the brightness
offset carried through the later families). Its gradient is the transpose ``L^T`` applied to the output gradient,
and the gradient of ``L^T g`` w.r.t. ``g`` is ``L`` again, so two kernels, ``A`` (optionally without ``b``) and
``L^T``, give every derivative order: the trajectory distillers differentiate through the augmentation twice.

``cpp``: ``torch.ops.fastdd.diff_augment`` / ``diff_augment_adjoint`` with fake kernels and autograd formulas
registered here. ``triton``: the launchers of ``fastdd.kernels.diff_augment`` in two autograd Functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from fastdd import _extension
from fastdd.determinism import deterministic_enabled
from fastdd.ops._dispatch import triton_module

if TYPE_CHECKING:
    from fastdd.ops.augment import AugmentParams

TRITON_KERNEL = "diff_augment"


class KernelArguments(NamedTuple):
    """``AugmentParams`` as the kernels take them (the column order is that of csrc/diff_augment_checks.h).

    Attributes:
        families: applied families joined by ``_`` in order, e.g. ``"color_crop"``.
        real_params: [P, 6] float64 (brightness, saturation, contrast, scale_x, scale_y, rotation), P = 1 or B.
        int_params: [P, 5] int64 (crop_row, crop_col, cutout_row, cutout_col, flip).
        cutout_size: [h, w] of the cutout rectangle ([0, 0] without cutout).
        align_corners: the convention of the scale and rotate families.
    """

    families: str
    real_params: Tensor
    int_params: Tensor
    cutout_size: list[int]
    align_corners: bool


# The columns of KernelArguments.real_params and .int_params: (field of AugmentParams, column of it or None).
_REAL_COLUMNS = (("brightness", None), ("saturation", None), ("contrast", None), ("scale", 0), ("scale", 1),
                 ("rotation", None))
_INT_COLUMNS = (("crop_shift", 0), ("crop_shift", 1), ("cutout_center", 0), ("cutout_center", 1), ("flip", None))


def _pack(params: AugmentParams, columns: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[batch, len(columns)] of ``dtype``: the listed fields, zeros for families not applied.

    Filled column by column into one zeroed tensor: a call is cheap next to the kernels only if this stays a few
    small copies (stacking one tensor per column cost as much as a crop or flip kernel on a small batch).
    """
    packed = torch.zeros(params.batch, len(columns), dtype=dtype, device=params.device)
    for j, (name, column) in enumerate(columns):
        value = getattr(params, name)
        if value is not None:
            packed[:, j] = value if column is None else value[:, column]
    return packed.to(device)


def kernel_arguments(params: AugmentParams, device: torch.device) -> KernelArguments:
    """Pack ``params`` into the kernels' two parameter tensors on ``device`` (families not applied give zeros)."""
    return KernelArguments(
        "_".join(params.families),
        _pack(params, _REAL_COLUMNS, torch.float64, device),
        _pack(params, _INT_COLUMNS, torch.int64, device),
        list(params.cutout_size or (0, 0)),
        params.align_corners,
    )


def augment_cpp(x: Tensor, args: KernelArguments) -> Tensor:
    """``torch.ops.fastdd.diff_augment``: x [B, C, H, W] -> [B, C, H, W], differentiable at any order."""
    return torch.ops.fastdd.diff_augment(x, *args)


def augment_triton(x: Tensor, args: KernelArguments) -> Tensor:
    """The Triton kernels: x [B, C, H, W] -> [B, C, H, W], differentiable at any order."""
    return _TritonAugment.apply(x, args, True)


def _triton_kernels():
    module, _ = triton_module(TRITON_KERNEL)
    return module


class _TritonAugment(torch.autograd.Function):
    """A(x), or its linear part L x when ``with_offset`` is False; the gradient is L^T."""

    @staticmethod
    def forward(ctx, x: Tensor, args: KernelArguments, with_offset: bool) -> Tensor:
        ctx.args = args
        return _triton_kernels().diff_augment_forward(x, *args, with_offset)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _TritonAugmentAdjoint.apply(grad, ctx.args), None, None


class _TritonAugmentAdjoint(torch.autograd.Function):
    """L^T g; the gradient is L (A without its offset)."""

    @staticmethod
    def forward(ctx, grad: Tensor, args: KernelArguments) -> Tensor:
        ctx.args = args
        # Under deterministic mode the scatter adds its terms in a fixed order instead of by float atomics.
        return _triton_kernels().diff_augment_adjoint(grad, *args, deterministic=deterministic_enabled())

    @staticmethod
    def backward(ctx, grad_grad: Tensor) -> tuple[Tensor, None]:
        return _TritonAugment.apply(grad_grad, ctx.args, False), None


def _register_compiled_ops() -> None:
    """Fake (shape-only) implementations and autograd formulas of the two ``torch.ops.fastdd`` augmentation ops."""

    def same_shape(images: Tensor) -> Tensor:
        torch._check(images.dim() == 4, lambda: f"diff_augment: images must be [B, C, H, W], got {images.shape}")
        return torch.empty_like(images, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastdd::diff_augment")
    def _diff_augment_fake(images, families, real_params, int_params, cutout_size, align_corners, with_offset=True):
        return same_shape(images)

    @torch.library.register_fake("fastdd::diff_augment_adjoint")
    def _diff_augment_adjoint_fake(grad, families, real_params, int_params, cutout_size, align_corners):
        return same_shape(grad)

    def setup_context(ctx, inputs, output) -> None:
        _, families, real_params, int_params, cutout_size, align_corners, *_ = inputs
        ctx.save_for_backward(real_params, int_params)
        ctx.static = (families, cutout_size, align_corners)

    def arguments(ctx) -> tuple:
        real_params, int_params = ctx.saved_tensors
        families, cutout_size, align_corners = ctx.static
        return families, real_params, int_params, cutout_size, align_corners

    def forward_backward(ctx, grad: Tensor):
        return torch.ops.fastdd.diff_augment_adjoint(grad, *arguments(ctx)), None, None, None, None, None, None

    def adjoint_backward(ctx, grad_grad: Tensor):
        linear = torch.ops.fastdd.diff_augment(grad_grad, *arguments(ctx), False)
        return linear, None, None, None, None, None

    torch.library.register_autograd("fastdd::diff_augment", forward_backward, setup_context=setup_context)
    torch.library.register_autograd("fastdd::diff_augment_adjoint", adjoint_backward, setup_context=setup_context)


if _extension.has_cpp():
    _register_compiled_ops()
