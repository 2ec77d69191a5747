"""Triton selection of ``cluster_cvar``: which samples are among the ``ceil(alpha * n_g)`` worst of their cluster.

The launcher sorts the samples by cluster (stably, so a cluster's segment lists its samples in increasing index
order) and computes each cluster's segment and tail size. Each program owns ``BLOCK_I`` positions of the sorted
order and ranks every one of them inside its own segment, ``BLOCK_J`` segment members at a time: the rank of a
sample is how many members are worse (a larger loss; NaN larger than every number; the lower index on ties). A
sample is selected when its rank is below its cluster's tail size, and gets weight ``1 / k_g``. The work is the sum
of the squared cluster sizes and needs no sort of the losses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch_device import on_input_device


@triton.jit
def _cluster_cvar_weight_kernel(
    losses_ptr,
    clusters_ptr,
    order_ptr,
    segment_start_ptr,
    segment_size_ptr,
    tail_ptr,
    weight_ptr,
    num_samples,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    positions = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = positions < num_samples
    cluster = tl.load(clusters_ptr + positions, mask=ok, other=0)
    loss = tl.load(losses_ptr + positions, mask=ok, other=0.0)
    start = tl.load(segment_start_ptr + cluster, mask=ok, other=0)
    stop = start + tl.load(segment_size_ptr + cluster, mask=ok, other=0)
    tail = tl.load(tail_ptr + cluster, mask=ok, other=1)
    loss_nan = loss != loss
    rank = tl.zeros([BLOCK_I], dtype=tl.int64)
    lo = tl.min(tl.where(ok, start, num_samples))
    hi = tl.max(tl.where(ok, stop, 0))
    for other_begin in range(lo, hi, BLOCK_J):
        others = other_begin + tl.arange(0, BLOCK_J)
        other_ok = others < hi
        other_cluster = tl.load(clusters_ptr + others, mask=other_ok, other=-1)
        other_loss = tl.load(losses_ptr + others, mask=other_ok, other=0.0)
        other_nan = other_loss != other_loss
        # Inside one segment, position order is sample-index order.
        earlier = others[None, :] < positions[:, None]
        both_numbers = (~loss_nan[:, None]) & (~other_nan[None, :])
        larger = other_loss[None, :] > loss[:, None]
        tie = other_loss[None, :] == loss[:, None]
        worse = (both_numbers & (larger | (tie & earlier))) | (
            other_nan[None, :] & ((~loss_nan[:, None]) | earlier)
        )
        same_cluster = (other_cluster[None, :] == cluster[:, None]) & other_ok[None, :]
        # A tile adds at most BLOCK_J: int32 counts keep the [BLOCK_I, BLOCK_J] tile in half the registers.
        rank += tl.sum((worse & same_cluster).to(tl.int32), axis=1).to(tl.int64)
    # 1 / k in float64 for float64 weights, else in float32: half-precision weights round it once, when stored.
    if weight_ptr.dtype.element_ty == tl.float64:
        share = 1.0 / tail.to(tl.float64)
    else:
        share = 1.0 / tail.to(tl.float32)
    weight = tl.where(rank < tail, share, tl.zeros_like(share))
    sample = tl.load(order_ptr + positions, mask=ok, other=0)
    tl.store(weight_ptr + sample, weight, mask=ok)


@on_input_device
def cluster_cvar_weight(losses: Tensor, assign: Tensor, num_clusters: int, alpha: float) -> Tensor:
    """Launch the kernel: losses [N] (float32/float64/bfloat16/float16), assign [N] int64 in [0, G) -> weight [N] in
    losses' dtype (half-precision losses are compared as they are: the order needs no wider type).

    ``weight[i]`` is ``1 / k_g`` when sample ``i`` is among the ``k_g = ceil(alpha * n_g)`` worst of its cluster ``g``
    and 0 otherwise. No autograd (``fastdd.ops.cvar`` wraps this in an autograd.Function).
    """
    losses = losses.contiguous()
    num_samples = losses.shape[0]
    weight = torch.empty_like(losses)
    if num_samples == 0:
        return weight
    order = torch.sort(assign, stable=True).indices
    sorted_clusters = assign[order].contiguous()
    sorted_losses = losses[order].contiguous()
    sizes = torch.bincount(assign, minlength=num_clusters)
    starts = torch.cumsum(sizes, 0) - sizes
    # The tail-size rule of fastdd.ops.cvar.tail_size, in float64 as the C++ kernel computes it.
    tails = torch.ceil(sizes.double() * alpha - 1e-9).to(torch.int64).clamp(min=1)
    tails = torch.minimum(tails, sizes.clamp(min=1))
    block_i = min(64, triton.next_power_of_2(num_samples))
    # 64 x 64 tiles of pairwise tests need 255 registers a thread (and spill on sm_80); 64 x 32 ones fit easily.
    block_j = min(32, triton.next_power_of_2(num_samples))
    grid = (triton.cdiv(num_samples, block_i),)
    _cluster_cvar_weight_kernel[grid](
        sorted_losses,
        sorted_clusters,
        order,
        starts,
        sizes,
        tails,
        weight,
        num_samples,
        BLOCK_I=block_i,
        BLOCK_J=block_j,
    )
    return weight
