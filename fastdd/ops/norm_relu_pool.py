"""The epilogue of a ConvNet block, fused: instance normalisation, ReLU and 2x2 average pooling in one op.

``instance_norm_relu_pool(x, weight, bias)`` equals ``avg_pool2d(relu(group_norm(x, C, weight, bias)), 2)`` with one
group per channel, the "instancenorm" of dataset distillation. Trajectory matching differentiates a student step's
gradient again, so the block is differentiable twice: forward, backward and double backward are each one op and
one pass per (image, channel) feature map, and only ``x`` plus two numbers per map are saved, where the unfused
chain keeps four full-size tensors per block and runs about forty elementwise kernels in its double backward.

Backends:
  ``"reference"``  ``F.group_norm`` + ``F.relu`` + ``F.avg_pool2d``; the test oracle and the fallback.
  ``"cpp"``        ``torch.ops.fastdd.instance_norm_relu_pool`` (CPU kernel, OpenMP over feature maps), with its
                   backward and double backward as ops of their own.
  ``"triton"``     the forward, backward and double-backward kernels of ``fastdd.kernels.instance_norm_relu_pool``
                   (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) in two autograd Functions.
  ``"auto"``       CUDA tensor: triton, else reference. CPU tensor: cpp, else reference.

dtypes (mixed precision): x is float32, float64, bfloat16 or float16; weight and bias share one dtype, x's or, for a
bfloat16 / float16 x, float32, which is what a ConvNet block gets under ``torch.autocast``: the convolution's output in
half precision and the norm's float32 parameters. Every backend computes a half-precision x in float32 (the map
statistics are summed and kept in float32) and returns y in x's dtype; gradients come in the dtype of what they
differentiate (x's for x, weight's for weight and bias), at first and second order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdd import _extension
from fastdd.ops._dispatch import HALF_DTYPES, choose_backend, compute_dtype, triton_module

DEFAULT_EPS = 1e-5  # nn.GroupNorm's
TRITON_KERNEL = "instance_norm_relu_pool"


def instance_norm_relu_pool(
    x: Tensor, weight: Tensor, bias: Tensor, *, eps: float = DEFAULT_EPS, pool: bool = True, backend: str = "auto"
) -> Tensor:
    """``pool(relu(weight * (x - mean) / sqrt(var + eps) + bias))`` per (image, channel) feature map.

    Args:
        x: [N, C, H, W] float32, float64, bfloat16 or float16 feature maps (e.g. a convolution's output).
        weight, bias: [C] per-channel affine of the normalisation, on x's device, both in x's dtype or, for a
            bfloat16 / float16 x, both float32 (autocast's parameters); statistics are computed in float32 then.
        eps: added to the biased variance, as in ``nn.GroupNorm``.
        pool: True for a 2x2 average pool with stride 2 (a trailing odd row or column is dropped, as
            ``F.avg_pool2d`` does), False for none.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"`` (see the module docstring).

    Returns:
        [N, C, H // 2, W // 2] (pool) or [N, C, H, W] in x's dtype, differentiable twice w.r.t. x, weight and bias
        (each gradient in the dtype of its input).

    Raises:
        ValueError: bad shapes or an unknown backend. RuntimeError: the requested backend cannot run here.
    """
    _check_inputs(x, weight, bias, pool)
    chosen = resolve_backend(backend, x)
    if chosen == "reference":
        return instance_norm_relu_pool_reference(x, weight, bias, eps=eps, pool=pool)
    if chosen == "triton":
        return _TritonInstanceNormReluPool.apply(x, weight, bias, float(eps), bool(pool))
    return torch.ops.fastdd.instance_norm_relu_pool(x, weight, bias, float(eps), bool(pool))[0]


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend ``instance_norm_relu_pool`` runs for ``x``: ``backend`` itself, or auto's choice.

    Raises ValueError for an unknown name and RuntimeError, with the reason, for a backend that cannot run here.
    """
    return choose_backend("instance_norm_relu_pool", backend, x, triton_kernel=TRITON_KERNEL, cuda_kernel=False)


def instance_norm_relu_pool_reference(
    x: Tensor, weight: Tensor, bias: Tensor, *, eps: float = DEFAULT_EPS, pool: bool = True
) -> Tensor:
    """Pure-PyTorch ``instance_norm_relu_pool``: x [N, C, H, W] -> [N, C, H // 2, W // 2] (pool) or x's shape, in
    x's dtype; a bfloat16 / float16 x and its parameters are upcast to float32 for the computation."""
    compute = compute_dtype(x.dtype)
    y = F.relu(F.group_norm(x.to(compute), x.shape[1], weight.to(compute), bias.to(compute), eps))
    return (F.avg_pool2d(y, 2) if pool else y).to(x.dtype)


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor, pool: bool) -> None:
    if not all(isinstance(t, Tensor) for t in (x, weight, bias)):
        raise TypeError("instance_norm_relu_pool expects tensors x [N, C, H, W], weight [C] and bias [C]")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"instance_norm_relu_pool expects floating-point x [N, C, H, W], got {x.dtype} {tuple(x.shape)}"
        )
    min_size = 2 if pool else 1
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f"instance_norm_relu_pool needs feature maps of at least {min_size}x{min_size}, got {tuple(x.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"instance_norm_relu_pool: {name} must be [{x.shape[1]}], got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"instance_norm_relu_pool: {name} must be on x's device ({x.device}), got {t.device}")
    allowed = (x.dtype, torch.float32) if x.dtype in HALF_DTYPES else (x.dtype,)
    if weight.dtype != bias.dtype or weight.dtype not in allowed:
        also = " (or float32 for a bfloat16 or float16 x)" if x.dtype in HALF_DTYPES else ""
        raise ValueError(
            f"instance_norm_relu_pool: weight and bias must have x's dtype{also}, got x {x.dtype}, weight "
            f"{weight.dtype} and bias {bias.dtype}"
        )


def _triton_kernels():
    module, _ = triton_module(TRITON_KERNEL)
    return module


THIRD_ORDER_MESSAGE = (
    "instance_norm_relu_pool's compiled backends are differentiable twice, not three times; use "
    "backend='reference' for third derivatives"
)


class _NoThirdDerivative(torch.autograd.Function):
    """Copies of the double backward's results attached to its differentiable inputs: differentiating them (a third
    derivative) raises instead of silently leaving out the double backward's own derivative."""

    @staticmethod
    def forward(ctx, num_results: int, *tensors: Tensor):
        return tuple(t.clone() for t in tensors[:num_results])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(THIRD_ORDER_MESSAGE)


def _guard_third_order(results: tuple, inputs: tuple) -> tuple:
    """``results`` as they are, or, when autograd records this double backward (create_graph), through
    ``_NoThirdDerivative``. None entries stay None."""
    watched = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    present = [r for r in results if r is not None]
    if not torch.is_grad_enabled() or not watched or not present:
        return results
    guarded = iter(_NoThirdDerivative.apply(len(present), *present, *watched))
    return tuple(None if r is None else next(guarded) for r in results)


class _TritonInstanceNormReluPool(torch.autograd.Function):
    """The forward kernel; saves x and the per-map mean and rstd, and its backward is ``_TritonBackward``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, pool: bool) -> Tensor:
        y, mean, rstd = _triton_kernels().instance_norm_relu_pool_forward(x, weight, bias, eps, pool)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.pool = pool
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _TritonBackward.apply(grad_y, x, weight, bias, mean, rstd, ctx.pool)
        return grad_x, grad_weight, grad_bias, None, None


class _TritonBackward(torch.autograd.Function):
    """The backward kernel, (grad_y, x, weight, bias) -> (grad_x, grad_weight, grad_bias); its backward is the
    double-backward kernel, which raises if differentiated again (as with the C++ ops, no third derivative)."""

    @staticmethod
    def forward(ctx, grad_y, x, weight, bias, mean, rstd, pool: bool):
        ctx.save_for_backward(grad_y, x, weight, bias, mean, rstd)
        ctx.pool = pool
        return _triton_kernels().instance_norm_relu_pool_backward(grad_y, x, weight, bias, mean, rstd, pool)

    @staticmethod
    def backward(ctx, gg_x, gg_weight, gg_bias):
        grad_y, x, weight, bias, mean, rstd = ctx.saved_tensors
        with torch.no_grad():
            results = _triton_kernels().instance_norm_relu_pool_double_backward(
                grad_y, x, weight, bias, mean, rstd, gg_x, gg_weight, gg_bias, ctx.pool
            )
        grad_grad_y, grad_x, grad_weight = _guard_third_order(results, (grad_y, x, weight, gg_x, gg_weight, gg_bias))
        # mean and rstd are functions of x; the double-backward formula already differentiates through them.
        return grad_grad_y, grad_x, grad_weight, None, None, None, None


def _register_compiled_op() -> None:
    """Fake implementations and the autograd formulas of the three ``torch.ops.fastdd.instance_norm_relu_pool*`` ops.

    The forward's backward is the backward op, and the backward op's backward is the double-backward op, so
    autograd can differentiate the block twice; differentiating the double backward again raises (_NoThirdDerivative).
    """
    ops = torch.ops.fastdd

    def out_shape(x: Tensor, pool: bool) -> tuple[int, ...]:
        n, c, h, w = x.shape
        return (n, c, h // 2, w // 2) if pool else (n, c, h, w)

    @torch.library.register_fake("fastdd::instance_norm_relu_pool")
    def _forward_fake(x, weight, bias, eps, pool):
        stats = x.new_empty(x.shape[:2], dtype=compute_dtype(x.dtype))
        return x.new_empty(out_shape(x, pool)), stats, torch.empty_like(stats)

    @torch.library.register_fake("fastdd::instance_norm_relu_pool_backward")
    def _backward_fake(grad_y, x, weight, bias, mean, rstd, pool):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)

    @torch.library.register_fake("fastdd::instance_norm_relu_pool_double_backward")
    def _double_backward_fake(grad_y, x, weight, bias, mean, rstd, gg_x, gg_weight, gg_bias, pool):
        return torch.empty_like(grad_y), torch.empty_like(x), torch.empty_like(weight)

    def forward_setup(ctx, inputs, output) -> None:
        x, weight, bias, _, pool = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.pool = pool
        ctx.mark_non_differentiable(mean, rstd)

    def forward_backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = ops.instance_norm_relu_pool_backward(
            grad_y, x, weight, bias, mean, rstd, ctx.pool
        )
        return grad_x, grad_weight, grad_bias, None, None

    def backward_setup(ctx, inputs, output) -> None:
        grad_y, x, weight, bias, mean, rstd, pool = inputs
        ctx.save_for_backward(grad_y, x, weight, bias, mean, rstd)
        ctx.pool = pool

    def backward_backward(ctx, gg_x, gg_weight, gg_bias):
        grad_y, x, weight, bias, mean, rstd = ctx.saved_tensors
        with torch.no_grad():
            results = ops.instance_norm_relu_pool_double_backward(
                grad_y, x, weight, bias, mean, rstd, gg_x, gg_weight, gg_bias, ctx.pool
            )
        grad_grad_y, grad_x, grad_weight = _guard_third_order(results, (grad_y, x, weight, gg_x, gg_weight, gg_bias))
        # mean and rstd are functions of x; the double-backward formula already differentiates through them.
        return grad_grad_y, grad_x, grad_weight, None, None, None, None

    torch.library.register_autograd("fastdd::instance_norm_relu_pool", forward_backward, setup_context=forward_setup)
    torch.library.register_autograd(
        "fastdd::instance_norm_relu_pool_backward", backward_backward, setup_context=backward_setup
    )


if _extension.has_cpp():
    _register_compiled_op()
