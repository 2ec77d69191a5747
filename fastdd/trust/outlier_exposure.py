"""TrustDD as a distiller plug-in: learn unlabelled outlier images S_out beside S, against real outliers T_out."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastdd.config import OutliersConfig, pick
from fastdd.data import ImageDataset
from fastdd.config.trust import DEFAULT_OUTLIER_WEIGHT
from fastdd.trust.outlier_loss import InLoss, OutlierBatches, integrated_loss, uniform_cross_entropy
from fastdd.trust.outliers import OutlierSource, outlier_source
from fastdd.trust.plugins import MatchingGroup, NetworkStep, TrustPlugin


class OutlierExposure(TrustPlugin):
    """TrustDD (outlier exposure "oe" with real outliers, or pseudo-outlier exposure "poe" with corrupted training
    images): the run also learns ``round(outlier_ratio * C * ipc)`` unlabelled outlier images S_out (at least one),
    started from real outliers (``init`` real) or Gaussian noise, and every network the objective trains uses the
    integrated loss ``CE(in) + outlier_weight * H(U; f(out))`` (:func:`~fastdd.trust.outlier_loss.integrated_loss`).

    Per method:

    - dc/dsa: S_out is matched as one more group after the classes: the gradient of the outlier loss
      ``H(U; f(x))`` on ``batch_real`` real outliers against the same on S_out, under one shared augmentation; the
      inner loop trains the network with the integrated loss on S_in and S_out.
    - dm: S_out is one more group: its mean embedding is matched to that of ``batch_real`` real outliers under one
      shared augmentation.
    - network steps on real data (dc/dsa/dm with ``net_data`` "real"): the minibatch also holds
      ``round(outlier_ratio * N)`` real outliers (at least one) and the loss gains ``outlier_weight * H(U; f(out))``,
      as on the synthetic side.
    - mtt/tesla: a student trains on S_in and S_out together; a step's loss is the integrated loss of its minibatch
      (S_out rows unlabelled), and the experts are trained with the integrated loss on (T_in, T_out).

    Attributes:
        config: the :class:`~fastdd.config.OutliersConfig` section.
        source: where the real outliers T_out come from.
        images: ``[K_out, C, H, W]`` leaf tensor S_out (model space) on the run's device.
    """

    def __init__(
        self,
        config: OutliersConfig,
        dataset: ImageDataset,
        *,
        count: int,
        init: str,
        data_root: str | None,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.config = config
        self.device = device
        self.source: OutlierSource = outlier_source(
            config.outliers, dataset, outlier_data=config.outlier_data, data_root=data_root
        )
        if init == "noise":
            start = torch.randn((count, dataset.channels, *dataset.image_size), generator=generator)
        else:
            start = self.source.sample(count, generator)
        self.images = start.to(device).requires_grad_(True)

    @classmethod
    def from_config(cls, config: Any, dataset: ImageDataset, *, generator: torch.Generator, device: torch.device,
                    **_: Any) -> "OutlierExposure | None":
        section = pick(OutliersConfig, config)
        if section.outliers == "none":
            return None
        count = max(1, round(section.outlier_ratio * dataset.num_classes * config.ipc))
        return cls(section, dataset, count=count, init=config.init, data_root=config.data_root, generator=generator,
                   device=device)

    def real_outliers(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` real outliers T_out from the source: ``[n, C, H, W]`` on the run's device."""
        return self.source.sample(n, generator).to(self.device)

    # -- the synthetic set ----------------------------------------------------------------------------------------
    def synthetic_tensors(self) -> list[Tensor]:
        return [self.images]

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {"outliers": {**self.source.describe(), "count": self.images.shape[0], "ratio": cfg.outlier_ratio,
                             "weight": cfg.outlier_weight}}

    def synthetic_set_tensors(self) -> dict[str, Tensor]:
        return {"outlier_images": self.images.detach().cpu().clone()}

    def image_logs(self) -> dict[str, Tensor]:
        return {"synset_outliers": self.images.detach()}

    def state_dict(self) -> dict[str, Any]:
        return {"outlier_images": self.images.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["outlier_images"].to(self.device))

    # -- hooks ----------------------------------------------------------------------------------------------------
    def matching_groups(self) -> list[MatchingGroup]:
        return [MatchingGroup(self.images, self.real_outliers, _outlier_loss)]

    def synthetic_training_options(self) -> dict[str, Any]:
        return {"outliers": OutlierBatches(self.images, self.config.outlier_weight)}

    def real_batch_extra(self, n: int, generator: torch.Generator) -> Tensor:
        return self.real_outliers(max(1, round(self.config.outlier_ratio * n)), generator)

    def network_loss(self, step: NetworkStep, loss_in: InLoss) -> Tensor:
        n = step.n
        return integrated_loss(step.logits[:n], step.labels, step.logits[n:], weight=self.config.outlier_weight,
                               loss_in=loss_in)

    def student_options(self) -> dict[str, Any]:
        return {"step_loss": partial(integrated_loss, weight=self.config.outlier_weight)}

    def expert_options(self) -> dict[str, Any]:
        cfg = self.config
        return {"outliers": cfg.outliers, "outlier_data": cfg.outlier_data, "outlier_ratio": cfg.outlier_ratio,
                "outlier_weight": cfg.outlier_weight}


def _outlier_loss(logits: Tensor) -> Tensor:
    """Gradient matching's loss on outliers: the mean of ``H(U; f(x))``."""
    return uniform_cross_entropy(logits).mean()


def synthetic_outliers(synset: Any) -> OutlierBatches | None:
    """The outlier images of a TrustDD set (a :class:`~fastdd.io.SyntheticSet`) with the loss weight they were
    distilled with (the default for sets that did not record it), for training networks on the set; None without."""
    if synset.outlier_images is None:
        return None
    stored = synset.meta.get("hyperparameters", {}).get("outlier_weight")
    return OutlierBatches(synset.outlier_images, DEFAULT_OUTLIER_WEIGHT if stored is None else float(stored))


class FreshOutliers:
    """TrustDD for networks trained on real data (experts): every epoch draws ``round(outlier_ratio * N)`` fresh
    real outliers from the source of ``config`` (an :class:`~fastdd.config.OutliersConfig`, or a config composed with
    it) and trains with the integrated loss at ``outlier_weight``."""

    def __init__(self, config: Any, source: OutlierSource) -> None:
        self.config = pick(OutliersConfig, config)
        self.source = source

    @classmethod
    def for_config(cls, config: Any, dataset: ImageDataset, data_root: str | None = None) -> "FreshOutliers | None":
        """The outliers of ``config``, or None when its ``outliers`` is "none"."""
        source = outlier_source(config.outliers, dataset, outlier_data=config.outlier_data, data_root=data_root)
        return None if source is None else cls(config, source)

    def epoch(self, images: int, generator: torch.Generator, device: torch.device | str) -> OutlierBatches:
        """The outliers of one epoch over ``images`` labelled images."""
        count = max(1, round(self.config.outlier_ratio * images))
        return OutlierBatches(self.source.sample(count, generator).to(device), self.config.outlier_weight)

    @staticmethod
    def settings(config: Any) -> dict[str, Any]:
        """The settings that change what is trained (for a settings digest); empty without outliers."""
        if config.outliers == "none":
            return {}
        data = config.outlier_data
        if data is not None and Path(data).expanduser().exists():
            data = str(Path(data).expanduser().resolve())
        return {"outliers": config.outliers, "outlier_data": data, "outlier_ratio": float(config.outlier_ratio),
                "outlier_weight": float(config.outlier_weight)}
