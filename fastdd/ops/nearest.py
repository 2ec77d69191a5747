"""Nearest synthetic sample of every real sample: the cluster assignment of group-robust distillation.

``nearest_synthetic(points, centers)`` returns, for each row of ``points``, the index of the closest row of
``centers`` by squared Euclidean distance (the lowest index on ties) and that squared distance, differentiable
w.r.t. both inputs. With ``point_groups`` and ``center_groups`` (e.g. class labels) each point is compared only with
the centers of its own group, in one call: group-robust distillation assigns every real sample to the nearest
synthetic sample of its class.

Backends:
  ``"reference"``  pure PyTorch; the test oracle and the fallback.
  ``"cpp"``        ``torch.ops.fastdd.nearest_synthetic`` from the compiled extension: the CPU kernel, or the CUDA
                   kernel when ``fastdd._C`` was built with CUDA.
  ``"triton"``     the Triton kernel in ``fastdd.kernels.nearest_synthetic`` (CUDA tensors, or CPU tensors under
                   ``TRITON_INTERPRET=1``).
  ``"auto"``       CUDA tensor: triton, else cpp, else reference. CPU tensor: cpp, else reference.

Every backend computes each distance exactly, as a sum of squared differences. The faster-looking expansion
``||p||^2 + ||c||^2 - 2 p.c`` cancels catastrophically when points sit close to a center, which is the case that
decides an assignment. A NaN distance wins the argmin, as in ``torch.argmin``, so NaNs in the data are not hidden.

dtypes: points and centers share one dtype, float32, float64, bfloat16 or float16. Every backend computes the
distances of bfloat16 / float16 inputs in float32 from their exact values (so ties and the argmin are decided on
float32 sums) and returns sq_dist in the inputs' dtype; the gradients, in the inputs' dtype, are accumulated in
float32 too.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from fastdd import _extension
from fastdd.determinism import deterministic_enabled
from fastdd.ops._dispatch import choose_backend, compute_dtype, triton_module, unavailable_reason

# The reference compares points with a block of centers at once; blocks hold about this many differences.
_REFERENCE_BLOCK_ELEMENTS = 1 << 22


def nearest_synthetic(
    points: Tensor,
    centers: Tensor,
    *,
    point_groups: Tensor | None = None,
    center_groups: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Index of, and squared distance to, the nearest center of every point (optionally of its own group).

    Args:
        points: [N, D] float32, float64, bfloat16 or float16 real samples (e.g. flattened images or embeddings).
        centers: [M, D] synthetic samples, M >= 1, same dtype and device as ``points``.
        point_groups: optional [N] int64 group of every point (e.g. its class label), any values.
        center_groups: optional [M] int64 group of every center; pass both group tensors or neither. With groups,
            point i is compared only with the centers j where ``center_groups[j] == point_groups[i]``.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"`` (see the module docstring).

    Returns:
        index: [N] int64, ``argmin_j ||points[i] - centers[j]||^2`` over the allowed j, the lowest j on ties; an index
            into ``centers`` (not into the group). Not differentiable.
        sq_dist: [N] in the inputs' dtype, that minimum squared distance; differentiable w.r.t. points and centers
            (``d sq_dist[i] / d points[i] = 2 (points[i] - centers[index[i]])``, the negative for the center).

    Raises:
        TypeError: inputs are not floating-point tensors of one dtype, or group labels are not int64.
        ValueError: bad shapes, different devices, only one of the group tensors, a point whose group has no center
            (the message names the group), or an unknown backend.
        RuntimeError: the requested backend cannot run these inputs here (the message says why).
    """
    _check_inputs(points, centers)
    _check_groups(points, centers, point_groups, center_groups)
    chosen = resolve_backend(backend, points)
    if chosen == "reference":
        return nearest_synthetic_reference(points, centers, point_groups, center_groups)
    if chosen == "cpp":
        sq_dist, index = torch.ops.fastdd.nearest_synthetic(points, centers, point_groups, center_groups)
        return index, sq_dist
    return _TritonNearestSynthetic.apply(points, centers, point_groups, center_groups)


def resolve_backend(backend: str, points: Tensor) -> str:
    """The backend ``nearest_synthetic`` runs for ``points``: ``backend`` itself, or auto's choice.

    Raises ValueError for an unknown name and RuntimeError, with the reason, for a backend that cannot run here.
    """
    return choose_backend("nearest_synthetic", backend, points, triton_kernel="nearest_synthetic", cuda_kernel=True)


def nearest_synthetic_reference(
    points: Tensor, centers: Tensor, point_groups: Tensor | None = None, center_groups: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch ``nearest_synthetic``: points [N, D], centers [M, D], optional point_groups [N] and
    center_groups [M] int64 -> (index [N] int64, sq_dist [N]).

    Written for clarity: with groups, a loop over the groups of the points solves each group on its own centers
    and maps the local argmin back to an index into ``centers``. Inside a group the [n, m] matrix of exact squared
    distances is built a block of centers at a time and ``torch.argmin`` picks the first minimum; sq_dist is
    recomputed from the chosen centers so autograd differentiates only the winning distance. bfloat16 / float16
    inputs are upcast to float32 first and sq_dist rounded back to their dtype.
    """
    if points.dtype != compute_dtype(points.dtype):
        index, sq_dist = nearest_synthetic_reference(
            points.to(compute_dtype(points.dtype)), centers.to(compute_dtype(centers.dtype)), point_groups,
            center_groups,
        )
        return index, sq_dist.to(points.dtype)
    with torch.no_grad():
        if point_groups is None:
            index = _nearest_index(points, centers)
        else:
            _raise_if_groups_lack_centers(point_groups, center_groups)
            index = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
            for group in torch.unique(point_groups):
                rows = (point_groups == group).nonzero().squeeze(1)
                members = (center_groups == group).nonzero().squeeze(1)
                index[rows] = members[_nearest_index(points[rows], centers[members])]
    sq_dist = (points - centers[index]).square().sum(dim=1)
    return index, sq_dist


def _nearest_index(points: Tensor, centers: Tensor) -> Tensor:
    """[N] index of the nearest of all ``centers`` (lowest on ties, first NaN wins), by exact squared distances."""
    num_points, dim = points.shape
    block = max(1, _REFERENCE_BLOCK_ELEMENTS // max(1, num_points * dim))
    sq_dists = torch.cat(
        [(points[:, None, :] - chunk[None, :, :]).square().sum(dim=2) for chunk in centers.split(block)], dim=1
    )
    return sq_dists.argmin(dim=1)


def _raise_if_groups_lack_centers(point_groups: Tensor, center_groups: Tensor) -> None:
    orphans = (~torch.isin(point_groups, center_groups)).nonzero()
    if orphans.numel():
        _raise_orphan(point_groups, int(orphans[0, 0]))


def _raise_orphan(point_groups: Tensor, row: int) -> None:
    """The error of every backend for a point whose group has no center (same words as the C++ kernels)."""
    raise ValueError(
        f"nearest_synthetic: point {row} is in group {int(point_groups[row])}, which has no center; every group in "
        "point_groups needs at least one center in center_groups"
    )


def nearest_synthetic_backward_reference(
    grad_sq_dist: Tensor, points: Tensor, centers: Tensor, index: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of sq_dist: grad_sq_dist [N], points [N, D], centers [M, D], index [N] -> ([N, D], [M, D]) in the
    inputs' dtype; bfloat16 / float16 ones are computed, and grad_centers summed, in float32."""
    compute = compute_dtype(points.dtype)
    grad_points = 2 * grad_sq_dist.to(compute)[:, None] * (points.to(compute) - centers.to(compute)[index])
    grad_centers = torch.zeros_like(centers, dtype=compute).index_add_(0, index, -grad_points)
    return grad_points.to(points.dtype), grad_centers.to(centers.dtype)


def _check_inputs(points: Tensor, centers: Tensor) -> None:
    if not isinstance(points, Tensor) or not isinstance(centers, Tensor):
        raise TypeError(
            f"nearest_synthetic expects tensors, got points of type {type(points).__name__} and centers of type "
            f"{type(centers).__name__}"
        )
    shapes = f"points {tuple(points.shape)} and centers {tuple(centers.shape)}"
    if points.dim() != 2 or centers.dim() != 2:
        raise ValueError(f"nearest_synthetic expects points [N, D] and centers [M, D], got {shapes}")
    if points.shape[1] != centers.shape[1]:
        raise ValueError(f"nearest_synthetic expects the same feature size D, got {shapes}")
    if centers.shape[0] == 0:
        raise ValueError(f"nearest_synthetic needs at least one center, got {shapes}")
    if not points.is_floating_point() or not centers.is_floating_point():
        raise TypeError(
            f"nearest_synthetic expects floating-point tensors, got {points.dtype} and {centers.dtype} ({shapes})"
        )
    if points.dtype != centers.dtype:
        raise TypeError(f"nearest_synthetic expects one dtype, got {points.dtype} and {centers.dtype} ({shapes})")
    if points.device != centers.device:
        raise ValueError(f"nearest_synthetic expects one device, got {points.device} and {centers.device} ({shapes})")


def _check_groups(
    points: Tensor, centers: Tensor, point_groups: Tensor | None, center_groups: Tensor | None
) -> None:
    """Shape, dtype and device checks of the optional group labels (no data-dependent check: no device sync)."""
    if (point_groups is None) != (center_groups is None):
        raise ValueError("nearest_synthetic expects both point_groups and center_groups, or neither")
    if point_groups is None:
        return
    if not isinstance(point_groups, Tensor) or not isinstance(center_groups, Tensor):
        raise TypeError(
            f"nearest_synthetic expects group tensors, got point_groups of type {type(point_groups).__name__} and "
            f"center_groups of type {type(center_groups).__name__}"
        )
    shapes = (
        f"points {tuple(points.shape)}, centers {tuple(centers.shape)}, point_groups {tuple(point_groups.shape)}, "
        f"center_groups {tuple(center_groups.shape)}"
    )
    if point_groups.shape != points.shape[:1] or center_groups.shape != centers.shape[:1]:
        raise ValueError(f"nearest_synthetic expects point_groups [N] and center_groups [M], got {shapes}")
    if point_groups.dtype != torch.int64 or center_groups.dtype != torch.int64:
        raise TypeError(
            f"nearest_synthetic expects int64 group labels, got {point_groups.dtype} and {center_groups.dtype}"
        )
    if point_groups.device != points.device or center_groups.device != points.device:
        raise ValueError(
            f"nearest_synthetic expects the group labels on {points.device}, got {point_groups.device} and "
            f"{center_groups.device}"
        )


def _unavailable_reason(backend: str, points: Tensor) -> str | None:
    """Why ``backend`` cannot run ``nearest_synthetic`` on tensors like ``points``, or None when it can."""
    return unavailable_reason(backend, points, triton_kernel="nearest_synthetic", cuda_kernel=True)


def _triton_kernels() -> tuple[ModuleType | None, str | None]:
    return triton_module("nearest_synthetic")


class _TritonNearestSynthetic(torch.autograd.Function):
    """Triton forward; the backward is two memory-bound PyTorch ops (a gather and an index_add)."""

    @staticmethod
    def forward(
        ctx, points: Tensor, centers: Tensor, point_groups: Tensor | None, center_groups: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        module, _ = _triton_kernels()
        index, sq_dist = module.nearest_synthetic_forward(points, centers, point_groups, center_groups)
        if point_groups is not None and index.device.type == "cpu":  # -1 where a point's group has no center
            orphans = (index < 0).nonzero()
            if orphans.numel():
                _raise_orphan(point_groups, int(orphans[0, 0]))
        elif point_groups is not None:  # on the device, raised at the next sync: no host sync per call
            torch._assert_async((index >= 0).all(), "nearest_synthetic: a point's group has no center; every group "
                                "in point_groups needs at least one center")
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(points, centers, index)
        ctx.mark_non_differentiable(index)
        return index, sq_dist

    @staticmethod
    def backward(ctx, grad_index: Tensor | None, grad_sq_dist: Tensor) -> tuple[Tensor | None, ...]:
        points, centers, index = ctx.saved_tensors
        grad_points, grad_centers = nearest_synthetic_backward_reference(grad_sq_dist, points, centers, index)
        return grad_points, grad_centers, None, None


def _register_compiled_op() -> None:
    """Fake (shape-only) implementations and the autograd formula of ``torch.ops.fastdd.nearest_synthetic``.

    The registered op returns ``(sq_dist, index)``, values before indices as ``torch.min(dim)`` does (a float first
    output is also what ``torch.library.opcheck``'s autograd checks can sum).
    """

    @torch.library.register_fake("fastdd::nearest_synthetic")
    def _nearest_synthetic_fake(
        points: Tensor, centers: Tensor, point_groups: Tensor | None = None, center_groups: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        torch._check(points.dim() == 2 and centers.dim() == 2, lambda: "points and centers must be 2-D")
        torch._check(points.shape[1] == centers.shape[1], lambda: "points and centers must have the same D")
        num_points = points.shape[0]
        return points.new_empty(num_points), points.new_empty(num_points, dtype=torch.int64)

    @torch.library.register_fake("fastdd::nearest_synthetic_backward")
    def _nearest_synthetic_backward_fake(
        grad_sq_dist: Tensor, points: Tensor, centers: Tensor, index: Tensor
    ) -> tuple[Tensor, Tensor]:
        return torch.empty_like(points), torch.empty_like(centers)

    def setup_context(ctx, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
        points, centers, _, _ = inputs
        _, index = output
        ctx.save_for_backward(points, centers, index)

    def backward(ctx, grad_sq_dist: Tensor, grad_index: Tensor | None) -> tuple[Tensor | None, ...]:
        points, centers, index = ctx.saved_tensors
        if points.is_cuda and deterministic_enabled():
            # The CUDA backward kernel adds grad_centers by float atomics; index_add_ is deterministic in this mode.
            grad_points, grad_centers = nearest_synthetic_backward_reference(grad_sq_dist, points, centers, index)
        else:
            grad_points, grad_centers = torch.ops.fastdd.nearest_synthetic_backward(
                grad_sq_dist, points, centers, index
            )
        return grad_points, grad_centers, None, None

    torch.library.register_autograd("fastdd::nearest_synthetic", backward, setup_context=setup_context)

    def backward_setup(ctx, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.save_for_backward(*inputs)

    def backward_backward(ctx, gg_points: Tensor | None, gg_centers: Tensor | None) -> tuple[Tensor | None, ...]:
        # The backward is grad_points = 2 g (p - c[index]), grad_centers = -index_add(grad_points); with
        # e = gg_points - gg_centers[index] its vector-Jacobian product is 2 <e, p - c[index]> for g, 2 g e for p and
        # -index_add(2 g e) for c. Plain torch ops, so autograd differentiates them again (any order).
        # Half-precision inputs are computed on, and summed, in float32.
        grad_sq_dist, points, centers, index = ctx.saved_tensors
        compute = compute_dtype(points.dtype)
        e = torch.zeros_like(points, dtype=compute) if gg_points is None else gg_points.to(compute)
        if gg_centers is not None:
            e = e - gg_centers.to(compute)[index]
        weighted = 2 * grad_sq_dist.to(compute)[:, None] * e
        grad_g = 2 * (e * (points.to(compute) - centers.to(compute)[index])).sum(dim=1)
        grad_c = torch.zeros_like(centers, dtype=compute).index_add(0, index, -weighted)
        return grad_g.to(grad_sq_dist.dtype), weighted.to(points.dtype), grad_c.to(centers.dtype), None

    torch.library.register_autograd(
        "fastdd::nearest_synthetic_backward", backward_backward, setup_context=backward_setup
    )


if _extension.has_cpp():
    _register_compiled_op()
