"""Plain supervised training and testing of one network on in-memory tensors (used by inner loops and evaluation)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastdd.ops import diff_augment, sample_augment_params


def train_epoch(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    dsa_strategy: str | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One pass over ``images`` in a random order drawn from ``generator``.

    Args:
        net: the network, trained in place (put in train mode by this function).
        images: ``[K, C, H, W]`` inputs (no graph is kept to them).
        targets: ``[K]`` int64 labels or ``[K, num_classes]`` probabilities (soft labels).
        batch_size: minibatch size.
        generator: source of the order and of the augmentation parameters.
        dsa_strategy: DSA strategy applied with one independent transform per image, or None for no augmentation.
        loss_fn: ``loss_fn(logits, targets)``; defaults to cross-entropy (hard or soft targets).
    Returns:
        The mean training loss over the epoch.
    """
    loss_fn = loss_fn or F.cross_entropy
    net.train()
    images = images.detach()
    order = torch.randperm(images.shape[0], generator=generator).to(images.device)
    total, count = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        idx = order[start : start + batch_size]
        x = images[idx]
        if dsa_strategy:
            params = sample_augment_params(
                x.shape[0], tuple(x.shape[-2:]), strategy=dsa_strategy, generator=generator, device=x.device
            )
            x = diff_augment(x, params)
        loss = loss_fn(net(x), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * idx.numel()
        count += idx.numel()
    return total / max(count, 1)


@torch.no_grad()
def predict_logits(net: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """Logits ``[N, num_classes]`` of ``net`` in eval mode on ``images`` ``[N, C, H, W]``, moved to ``images``' device."""
    net.eval()
    device = next(net.parameters()).device
    outs = [net(images[i : i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs).to(images.device)


def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``net`` on ``images`` ``[N, C, H, W]`` with ``labels`` ``[N]``."""
    logits = predict_logits(net, images, batch_size=batch_size)
    return float((logits.argmax(dim=1) == labels.to(logits.device)).float().mean())
