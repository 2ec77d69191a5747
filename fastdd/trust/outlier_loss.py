"""TrustDD's integrated loss: cross-entropy on in-distribution images plus a uniform-target term on outliers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdd.config.trust import DEFAULT_OUTLIER_WEIGHT


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy between the uniform distribution and ``softmax(logits)``.

    ``H(U; p) = -mean_k log p_k = logsumexp(z) - mean_k z_k``; it is smallest (``log K``) when the prediction is uniform.

    Args:
        logits: ``[B, K]``.
    Returns:
        ``[B]``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, K], got shape {tuple(logits.shape)}")
    return torch.logsumexp(logits, dim=1) - logits.mean(dim=1)


def integrated_loss(
    logits_in: torch.Tensor,
    targets: torch.Tensor,
    logits_out: torch.Tensor | None,
    *,
    weight: float = DEFAULT_OUTLIER_WEIGHT,
) -> torch.Tensor:
    """``CE(logits_in, targets) + weight * mean H(U; softmax(logits_out))`` (TrustDD, lambda = 0.5 by default).

    Args:
        logits_in: ``[B, K]`` logits of in-distribution images.
        targets: ``[B]`` int64 labels or ``[B, K]`` probabilities.
        logits_out: ``[B_out, K]`` logits of outlier images, or None / empty for plain cross-entropy.
        weight: lambda, the weight of the outlier term.
    Returns:
        0-d loss.
    """
    loss = F.cross_entropy(logits_in, targets)
    if logits_out is not None and logits_out.shape[0] > 0:
        loss = loss + weight * uniform_cross_entropy(logits_out).mean()
    return loss
