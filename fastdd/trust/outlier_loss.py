"""TrustDD's integrated loss: cross-entropy on in-distribution images plus a uniform-target term on outliers.

:func:`integrated_loss` is the one implementation: the distillers' network steps on real data, the inner loops and
expert training (through :func:`fastdd.training.train_epoch`) and the trajectory students' steps all call it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastdd.config.trust import DEFAULT_OUTLIER_WEIGHT

InLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_in(logits_in, targets) -> 0-d``: the loss of the in-distribution rows (default cross-entropy)."""


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
    logits_out: torch.Tensor | None = None,
    *,
    weight: float = DEFAULT_OUTLIER_WEIGHT,
    loss_in: InLoss | None = None,
    counts: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``CE(logits_in, targets) + weight * mean H(U; softmax(logits_out))`` (TrustDD, lambda = 0.5 by default).

    Args:
        logits_in: ``[B, K]`` logits of in-distribution images. With outliers and ``B = 0`` only the outlier term is
            returned (a student minibatch of outliers alone).
        targets: ``[B]`` int64 labels or ``[B, K]`` probabilities.
        logits_out: ``[B_out, K]`` logits of outlier images, or None / empty for the in-distribution loss alone.
        weight: lambda, the weight of the outlier term.
        loss_in: replaces the cross-entropy of the in-distribution rows (e.g. the group-robust objective).
        counts: ``(labelled, outliers)`` when these rows are one share of a bigger minibatch split over processes:
            each term is then a per-row sum divided by the minibatch's count, so the shares sum to the whole
            minibatch's loss. Not combined with ``loss_in``.
    Returns:
        0-d loss.
    """
    if counts is not None and loss_in is not None:
        raise ValueError("integrated_loss: counts (a share of a split minibatch) apply to cross-entropy only")
    has_out = logits_out is not None and logits_out.shape[0] > 0
    loss = None
    if logits_in.shape[0] > 0 or not has_out:
        if counts is not None:
            loss = F.cross_entropy(logits_in, targets, reduction="sum") / counts[0]
        else:
            loss = (F.cross_entropy if loss_in is None else loss_in)(logits_in, targets)
    if has_out:
        if counts is not None:
            term = weight * uniform_cross_entropy(logits_out).sum() / counts[1]
        else:
            term = weight * uniform_cross_entropy(logits_out).mean()
        loss = term if loss is None else loss + term
    return loss


class OutlierBatches:
    """TrustDD in a training loop over labelled images: every minibatch also carries its share of the unlabelled
    outlier ``images`` ``[K_out, C, H, W]``, and the loss is :func:`integrated_loss` with ``weight``.

    Per epoch :meth:`shares` draws a random order of the outliers and splits it into one share per minibatch
    (``K_out / batches`` each); with fewer outliers than minibatches, each minibatch takes one, cycling through the
    order.
    """

    def __init__(self, images: torch.Tensor, weight: float = DEFAULT_OUTLIER_WEIGHT) -> None:
        self.images = images.detach()
        self.weight = weight

    def to(self, device: torch.device | str) -> "OutlierBatches":
        return OutlierBatches(self.images.to(device), self.weight)

    def shares(self, batches: int, generator: torch.Generator) -> list[torch.Tensor]:
        """The outlier indices of each of ``batches`` minibatches of one epoch (drawn from ``generator``)."""
        count = self.images.shape[0]
        order = torch.randperm(count, generator=generator).to(self.images.device)
        if count >= batches:
            return list(order.tensor_split(batches))
        return [order[number % count].view(1) for number in range(batches)]

    def loss(self, logits_in: torch.Tensor, targets: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        return integrated_loss(logits_in, targets, logits_out, weight=self.weight)
