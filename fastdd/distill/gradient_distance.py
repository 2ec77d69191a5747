"""Distances between two lists of per-parameter gradients, as used by gradient matching (DC / DSA)."""

from __future__ import annotations

from typing import Sequence

import torch

METRICS = ("ours", "mse", "cos")
_EPS = 1e-6


def layerwise_cosine_distance(g_syn: torch.Tensor, g_real: torch.Tensor) -> torch.Tensor:
    """Sum over output units of ``1 - cos`` between matching rows of two gradients of one parameter tensor.

    Args:
        g_syn, g_real: gradients of the same parameter, shape ``[out, ...]``. Tensors with fewer than two dimensions
            (biases, norm scales) contribute 0.
    Returns:
        0-d tensor.
    """
    if g_syn.dim() < 2:
        return g_syn.new_zeros(())
    a = g_syn.reshape(g_syn.shape[0], -1)
    b = g_real.reshape(g_real.shape[0], -1)
    cos = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS)
    return (1 - cos).sum()


def gradient_distance(
    g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor], metric: str = "ours"
) -> torch.Tensor:
    """Distance between synthetic and real gradients of one network.

    Args:
        g_syn: per-parameter gradients on the synthetic batch (usually with a graph to the images).
        g_real: per-parameter gradients on the real batch (detached), same shapes as ``g_syn``.
        metric: ``"ours"`` (sum of layer-wise row cosine distances, 1-D parameters ignored), ``"mse"`` (sum of
            squared differences over all parameters) or ``"cos"`` (one cosine distance between the concatenated
            gradients).
    Returns:
        0-d tensor.
    """
    if len(g_syn) != len(g_real):
        raise ValueError(f"got {len(g_syn)} synthetic and {len(g_real)} real gradients")
    for a, b in zip(g_syn, g_real):
        if a.shape != b.shape:
            raise ValueError(f"gradient shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if metric == "ours":
        return torch.stack([layerwise_cosine_distance(a, b) for a, b in zip(g_syn, g_real)]).sum()
    if metric == "mse":
        return torch.stack([((a - b) ** 2).sum() for a, b in zip(g_syn, g_real)]).sum()
    if metric == "cos":
        a = torch.cat([g.reshape(-1) for g in g_syn])
        b = torch.cat([g.reshape(-1) for g in g_real])
        return 1 - (a * b).sum() / (a.norm() * b.norm() + _EPS)
    raise ValueError(f"unknown gradient distance {metric!r}; choose one of {', '.join(METRICS)}")
