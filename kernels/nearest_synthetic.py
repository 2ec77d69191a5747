"""Triton forward of ``nearest_synthetic``: the nearest center of every point by exact squared distance.

Each program owns ``BLOCK_N`` points and sweeps the centers ``BLOCK_M`` at a time. For one tile it accumulates the
[BLOCK_N, BLOCK_M] squared distances over the features, ``BLOCK_D`` at a time, as sums of squared differences (not
the cancellation-prone ``||p||^2 + ||c||^2 - 2 p.c``), then folds the tile's argmin into a running best. Tiles come
in increasing center order and only a strictly smaller distance replaces the best, so ties keep the lowest index;
NaN distances are ranked as -inf, so the first NaN wins, as in ``torch.argmin``.

Every tile is masked with the allowed centers (in range, and with group labels, of the point's group): a tile's
winner is the lowest allowed column at the tile's minimum, and a point takes its first allowed center whatever its
distance (even +inf), then only strictly smaller ones. A point whose group has no center keeps index -1.

dtypes: points and centers share one dtype; bfloat16 and float16 values are loaded as they are and their distances
computed and accumulated in float32 (the dtype of the ``sq_dist`` buffer the kernel writes), which the launcher
rounds to the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdd.precision import compute_dtype

from .launch_device import on_input_device


@triton.jit
def _nearest_synthetic_kernel(
    points_ptr,
    centers_ptr,
    point_groups_ptr,
    center_groups_ptr,
    index_ptr,
    sq_dist_ptr,
    num_points,
    num_centers,
    dim,
    GROUPED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_points
    row_starts = rows.to(tl.int64) * dim
    if GROUPED:
        row_groups = tl.load(point_groups_ptr + rows, mask=row_ok, other=0)
    dtype = sq_dist_ptr.dtype.element_ty
    best_key = tl.full([BLOCK_N], float("inf"), dtype)
    best_index = tl.full([BLOCK_N], -1, tl.int64)
    for center_begin in range(0, num_centers, BLOCK_M):
        cols = center_begin + tl.arange(0, BLOCK_M)
        col_ok = cols < num_centers
        col_starts = cols.to(tl.int64) * dim
        allowed = tl.broadcast_to(col_ok[None, :], [BLOCK_N, BLOCK_M])
        if GROUPED:
            col_groups = tl.load(center_groups_ptr + cols, mask=col_ok, other=0)
            allowed = allowed & (row_groups[:, None] == col_groups[None, :])
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype)
        for feature_begin in range(0, dim, BLOCK_D):
            features = feature_begin + tl.arange(0, BLOCK_D)
            feature_ok = features < dim
            p = tl.load(
                points_ptr + row_starts[:, None] + features[None, :],
                mask=row_ok[:, None] & feature_ok[None, :],
                other=0.0,
            ).to(dtype)
            c = tl.load(
                centers_ptr + col_starts[:, None] + features[None, :],
                mask=col_ok[:, None] & feature_ok[None, :],
                other=0.0,
            ).to(dtype)
            diff = p[:, None, :] - c[None, :, :]
            acc += tl.sum(diff * diff, axis=2)
        key = tl.where(acc != acc, float("-inf"), acc)
        tile_best = tl.min(tl.where(allowed, key, float("inf")), axis=1)
        at_best = allowed & (key == tile_best[:, None])
        tile_index = tl.min(tl.where(at_best, cols[None, :], num_centers), axis=1)
        tile_has_allowed = tl.max(allowed.to(tl.int32), axis=1) > 0
        closer = tile_has_allowed & ((best_index < 0) | (tile_best < best_key))
        best_key = tl.where(closer, tile_best, best_key)
        best_index = tl.where(closer, tile_index.to(tl.int64), best_index)
    sq_dist = tl.where(best_key == float("-inf"), float("nan"), best_key)
    tl.store(index_ptr + rows, best_index, mask=row_ok)
    tl.store(sq_dist_ptr + rows, sq_dist, mask=row_ok)


@on_input_device
def nearest_synthetic_forward(
    points: Tensor, centers: Tensor, point_groups: Tensor | None = None, center_groups: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Launch the kernel: points [N, D], centers [M, D] (float32/float64/bfloat16/float16, one dtype and device),
    optional int64 group labels point_groups [N] and center_groups [M] -> (index [N] int64, sq_dist [N] in the
    inputs' dtype); index is -1 for a point whose group has no center (the caller reports it).

    Inputs are made contiguous; no autograd (``fastdd.ops.nearest`` wraps this in an autograd.Function).
    """
    points = points.contiguous()
    centers = centers.contiguous()
    num_points, dim = points.shape
    num_centers = centers.shape[0]
    index = torch.empty(num_points, dtype=torch.int64, device=points.device)
    sq_dist = torch.empty(num_points, dtype=compute_dtype(points.dtype), device=points.device)
    if num_points == 0:
        return index, sq_dist.to(points.dtype)
    # Tile sizes: powers of two, shrunk for tiny inputs (which also keeps the CPU interpreter quick).
    block_n = min(32, triton.next_power_of_2(num_points))
    block_m = min(16, triton.next_power_of_2(num_centers))
    block_d = min(16, triton.next_power_of_2(max(dim, 1)))
    grid = (triton.cdiv(num_points, block_n),)
    grouped = point_groups is not None
    _nearest_synthetic_kernel[grid](
        points,
        centers,
        point_groups.contiguous() if grouped else index,  # an unread placeholder pointer when not grouped
        center_groups.contiguous() if grouped else index,
        index,
        sq_dist,
        num_points,
        num_centers,
        dim,
        GROUPED=grouped,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    return index, sq_dist.to(points.dtype)
