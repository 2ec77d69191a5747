"""Plain supervised training and testing of one network on in-memory tensors (used by inner loops and evaluation)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastdd.ops import diff_augment, sample_augment_params
from fastdd.precision import at_least_float32, autocast
from fastdd.precision import grad_scaler as make_grad_scaler
from fastdd.runtime import kept_heap
from fastdd.trust.outlier_loss import OutlierBatches

TrainObjective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""``objective(net, inputs, targets, generator) -> 0-d loss``: the training loss of one minibatch.

``inputs`` is the already-augmented minibatch ``[B, C, H, W]``, ``targets`` ``[B]`` int64 labels or ``[B, K]``
probabilities; the objective makes its own forward pass(es) through ``net`` and draws any randomness from
``generator``. It may be an ``nn.Module`` with trainable parameters of its own (the caller optimises them).
"""

InputTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""``transform(x, generator) -> x'``: applied to every augmented minibatch ``[B, C, H, W]`` just before the forward
pass (e.g. MDT's masks, :class:`fastdd.trust.mdt.MaskedDistillation`), drawing from the epoch's generator."""


@kept_heap()
def train_epoch(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    dsa_strategy: str | None = None,
    objective: TrainObjective | None = None,
    outliers: OutlierBatches | None = None,
    input_transform: InputTransform | None = None,
    precision: str = "fp32",
    grad_scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One pass over ``images`` in a random order drawn from ``generator``.

    Args:
        net: the network, trained in place (put in train mode by this function).
        images: ``[K, C, H, W]`` inputs (no graph is kept to them).
        targets: ``[K]`` int64 labels or ``[K, num_classes]`` probabilities (soft labels).
        batch_size: minibatch size.
        generator: source of the order and of the augmentation parameters.
        dsa_strategy: DSA strategy applied with one independent transform per image, or None for no augmentation.
        objective: the minibatch loss (`TrainObjective`), or None for cross-entropy ``F.cross_entropy(net(x), y)``
            (hard or soft targets). It cannot be combined with ``outliers``.
        outliers: TrustDD's unlabelled outlier images with the weight of their loss term, or None. When given,
            each minibatch also takes its share of them (:meth:`OutlierBatches.shares`, about ``K_out / K`` of the
            batch size, at least one), forwarded together with the images and augmented like them, and the loss is
            TrustDD's integrated loss ``CE(in) + weight * H(U; f(out))``.
        input_transform: applied to every augmented minibatch (images and outliers together) before the forward
            pass, with ``generator``; None leaves them as they are.
        precision: ``"fp32"`` (the default), ``"bf16"`` or ``"fp16"`` (CUDA only): the forward passes and losses run
            under autocast (:mod:`fastdd.precision`); the parameters, their gradients and the optimiser stay float32.
        grad_scaler: fp16 only: the loss scaler, kept by the caller across epochs so that its scale carries over;
            None makes a fresh one for this epoch. Ignored for fp32 and bf16 (no scaling needed).
    Returns:
        The mean training loss over the epoch.
    """
    if objective is not None and outliers is not None:
        raise ValueError("train_epoch takes either an objective or outliers (TrustDD's loss), not both")
    if precision != "fp16":
        grad_scaler = None
    elif grad_scaler is None:
        grad_scaler = make_grad_scaler(precision, images.device)
    net.train()
    images = images.detach()
    order = torch.randperm(images.shape[0], generator=generator).to(images.device)
    if outliers is not None:
        shares = outliers.shares(-(-images.shape[0] // batch_size), generator)
    # The loss is summed on the device in float64 (what Python floats did) and read once: no sync per minibatch.
    total, count = torch.zeros((), dtype=torch.float64, device=images.device), 0
    for number, start in enumerate(range(0, images.shape[0], batch_size)):
        idx = order[start : start + batch_size]
        if objective is not None:
            x = _inputs(images[idx], dsa_strategy, generator, input_transform)
            with autocast(precision, x.device):
                loss = objective(net, x, targets[idx], generator)
        elif outliers is None:
            x = _inputs(images[idx], dsa_strategy, generator, input_transform)
            with autocast(precision, x.device):
                logits = net(x)
            loss = F.cross_entropy(at_least_float32(logits), targets[idx])
        else:
            out_idx = shares[number]
            # One forward over in + out (as outlier exposure does), so batchnorm sees both.
            x = _inputs(torch.cat([images[idx], outliers.images[out_idx]]), dsa_strategy, generator, input_transform)
            with autocast(precision, x.device):
                logits = net(x)
            logits_in, logits_out = at_least_float32(logits).split([idx.numel(), out_idx.numel()])
            loss = outliers.loss(logits_in, targets[idx], logits_out)
        optimizer.zero_grad(set_to_none=True)
        if grad_scaler is None:
            loss.backward()
            optimizer.step()
        else:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        total += loss.detach().double() * idx.numel()
        count += idx.numel()
    return float(total) / max(count, 1)


def _inputs(
    x: torch.Tensor, dsa_strategy: str | None, generator: torch.Generator, transform: InputTransform | None
) -> torch.Tensor:
    """``x`` with one independent DSA transform per image (none without a strategy), then ``transform``."""
    if dsa_strategy:
        params = sample_augment_params(
            x.shape[0], tuple(x.shape[-2:]), strategy=dsa_strategy, generator=generator, device=x.device
        )
        x = diff_augment(x, params)
    return x if transform is None else transform(x, generator)


@torch.no_grad()
def predict_logits(
    net: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 1024, precision: str = "fp32"
) -> torch.Tensor:
    """Logits ``[N, num_classes]`` of ``net`` in eval mode on ``images`` ``[N, C, H, W]``, moved to ``images``'
    device; in float32 (float64 for a float64 network) whatever ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``
    on CUDA: the forward passes under :func:`fastdd.precision.autocast`) they ran in."""
    net.eval()
    device = next(net.parameters()).device
    outs = []
    with autocast(precision, device):
        for i in range(0, images.shape[0], batch_size):
            outs.append(at_least_float32(net(images[i : i + batch_size].to(device))))
    return torch.cat(outs).to(images.device)


def accuracy(
    net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 1024, precision: str = "fp32"
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``net`` on ``images`` ``[N, C, H, W]`` with ``labels`` ``[N]``; the
    forward passes in ``precision`` (as :func:`predict_logits`)."""
    logits = predict_logits(net, images, batch_size=batch_size, precision=precision)
    return float((logits.argmax(dim=1) == labels.to(logits.device)).float().mean())
