"""During-training calibration baselines for networks trained on a synthetic set: label smoothing, mixup, focal loss.

Each loss is a small callable conforming to `fastdd.training.TrainObjective` (``objective(net, inputs, targets,
generator) -> 0-d loss``), for hard ``[B]`` int64 labels and for soft ``[B, K]`` probability targets. Every loss is
a mean over the minibatch, like ``F.cross_entropy``, so the learning rate of the protocol means the same thing.

Defaults, from the calibration literature that "Rethinking Data Distillation: Do Not Overlook Calibration" compares
against (its supplementary material, the part at hand, does not state their settings):
- label smoothing 0.1: Szegedy et al., "Rethinking the Inception Architecture" (CVPR 2016), the common setting whose
  calibration effect Müller et al., "When does label smoothing help?" (NeurIPS 2019) studied.
- mixup alpha 0.2: Zhang et al., "mixup" (ICLR 2018) used 0.2 on ImageNet, and Thulasidasan et al., "On mixup
  training: improved calibration and predictive uncertainty" (NeurIPS 2019) found alpha in [0.1, 0.4] best
  calibrated (larger alpha under-confident).
- focal gamma 3: Mukhoti et al., "Calibrating deep neural networks using focal loss" (NeurIPS 2020), whose fixed-gamma
  model FL-3 is their reference focal-loss setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.special import betaincinv

from fastdd.errors import FastddError
from fastdd.precision import at_least_float32
from fastdd.training import TrainObjective

TRAIN_LOSSES = ("ce", "ls", "mixup", "focal")
DEFAULT_LABEL_SMOOTHING = 0.1
DEFAULT_MIXUP_ALPHA = 0.2
DEFAULT_FOCAL_GAMMA = 3.0


def train_objective(
    name: str,
    *,
    num_classes: int,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    mixup_alpha: float = DEFAULT_MIXUP_ALPHA,
    focal_gamma: float = DEFAULT_FOCAL_GAMMA,
) -> TrainObjective | None:
    """The training objective called ``name`` (one of ``TRAIN_LOSSES``), or None for plain cross-entropy ("ce").

    Args:
        name: "ce", "ls" (label smoothing), "mixup" or "focal" (case-insensitive).
        num_classes: ``K``, the width of the network's logits (checked on every call).
        label_smoothing: epsilon of "ls", in [0, 1).
        mixup_alpha: alpha of "mixup"'s Beta(alpha, alpha) mixing weight, > 0.
        focal_gamma: gamma of "focal", >= 0 (0 is cross-entropy).
    Raises:
        FastddError: for an unknown name.
    """
    key = name.strip().lower()
    if key == "ce":
        return None
    if key == "ls":
        return LabelSmoothingLoss(num_classes, label_smoothing)
    if key == "mixup":
        return MixupLoss(num_classes, mixup_alpha)
    if key == "focal":
        return FocalLoss(num_classes, focal_gamma)
    raise FastddError(f"unknown training loss {name!r}; choose from {', '.join(TRAIN_LOSSES)}.")


class LabelSmoothingLoss:
    """Cross-entropy against ``(1 - eps) * q + eps / K``, ``q`` the one-hot label or the soft target."""

    def __init__(self, num_classes: int, smoothing: float = DEFAULT_LABEL_SMOOTHING) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.num_classes = _check_classes(num_classes)
        self.smoothing = float(smoothing)

    def __call__(
        self, net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        logits = _logits(net, inputs, self.num_classes)
        if targets.dim() == 1:
            return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)
        smoothed = (1.0 - self.smoothing) * targets + self.smoothing / self.num_classes
        return F.cross_entropy(logits, smoothed)

    def __repr__(self) -> str:
        return f"LabelSmoothingLoss(num_classes={self.num_classes}, smoothing={self.smoothing:g})"


class MixupLoss:
    """Mixup: ``x' = lam * x + (1 - lam) * x[perm]``, loss ``lam * CE(f(x'), y) + (1 - lam) * CE(f(x'), y[perm])``.

    One ``lam ~ Beta(alpha, alpha)`` and one permutation of the minibatch per call, both from the generator:
    ``torch.distributions`` cannot take a generator, so ``lam`` is drawn by inverse transform sampling, one float64
    uniform ``u = torch.rand((), generator=generator, dtype=torch.float64)`` mapped through the Beta quantile
    function ``lam = scipy.special.betaincinv(alpha, alpha, u)``; then the permutation
    ``torch.randperm(B, generator=generator)``. With soft targets the target distributions are mixed with the same
    ``lam`` (equal to mixing the two losses, as cross-entropy is linear in the target).
    """

    def __init__(self, num_classes: int, alpha: float = DEFAULT_MIXUP_ALPHA) -> None:
        if not alpha > 0.0:
            raise ValueError(f"mixup alpha must be positive, got {alpha}")
        self.num_classes = _check_classes(num_classes)
        self.alpha = float(alpha)

    def draw(self, batch: int, generator: torch.Generator) -> tuple[float, torch.Tensor]:
        """``(lam, perm)`` for a minibatch of ``batch`` inputs: the documented draws, in order, from ``generator``."""
        u = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device)
        lam = float(betaincinv(self.alpha, self.alpha, float(u)))
        perm = torch.randperm(batch, generator=generator, device=generator.device)
        return lam, perm

    def __call__(
        self, net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        lam, perm = self.draw(inputs.shape[0], generator)
        perm = perm.to(inputs.device)
        logits = _logits(net, lam * inputs + (1.0 - lam) * inputs[perm], self.num_classes)
        if targets.dim() == 1:
            return lam * F.cross_entropy(logits, targets) + (1.0 - lam) * F.cross_entropy(logits, targets[perm])
        return F.cross_entropy(logits, lam * targets + (1.0 - lam) * targets[perm])

    def __repr__(self) -> str:
        return f"MixupLoss(num_classes={self.num_classes}, alpha={self.alpha:g})"


class FocalLoss:
    """Focal loss, batch mean of ``-(1 - p_t)^gamma log p_t``; soft targets: ``-sum_c q_c (1 - p_c)^gamma log p_c``.

    ``gamma = 0`` is cross-entropy. ``1 - p`` is computed as ``-expm1(log p)``, accurate for confident predictions,
    and kept above the smallest normal float so that ``gamma < 1`` has a finite gradient at ``p = 1``.
    """

    def __init__(self, num_classes: int, gamma: float = DEFAULT_FOCAL_GAMMA) -> None:
        if not gamma >= 0.0:
            raise ValueError(f"focal gamma must be non-negative, got {gamma}")
        self.num_classes = _check_classes(num_classes)
        self.gamma = float(gamma)

    def __call__(
        self, net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        log_p = F.log_softmax(_logits(net, inputs, self.num_classes), dim=1)
        if targets.dim() == 1:
            log_p = log_p.gather(1, targets.view(-1, 1)).squeeze(1)
            return -(self._modulation(log_p) * log_p).mean()
        return -(targets * self._modulation(log_p) * log_p).sum(dim=1).mean()

    def _modulation(self, log_p: torch.Tensor) -> torch.Tensor:
        return (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny) ** self.gamma

    def __repr__(self) -> str:
        return f"FocalLoss(num_classes={self.num_classes}, gamma={self.gamma:g})"


def _check_classes(num_classes: int) -> int:
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return int(num_classes)


def _logits(net: torch.nn.Module, inputs: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = at_least_float32(net(inputs))  # the losses stay float32 when autocast runs the forward in half precision
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"the network must return [B, {num_classes}] logits, got shape {tuple(logits.shape)}")
    return logits
