"""The Distiller interface: a synthetic set, its optimiser, the run's generator, and one ``step`` per iteration."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

import fastdd
from fastdd.config import DistillConfig, check_config
from fastdd.data import ImageDataset
from fastdd.distill import distributed
from fastdd.errors import FastddError
from fastdd.io import SyntheticSet
from fastdd.models import build_model_for
from fastdd.ops import AugmentParams, diff_augment, sample_augment_params
from fastdd.trust.masking import DEFAULT_MASK_PATCH, mask_like, random_mask
from fastdd.trust.outlier_loss import uniform_cross_entropy
from fastdd.trust.outliers import OutlierSource, outlier_source
from fastdd.trust.robust import RobustObjective, default_clusters, logits_and_embedding

class Distiller(ABC):
    """Learns ``ipc`` synthetic images per class for ``dataset``.

    Subclasses define ``name``, ``config_class`` and :meth:`step`. All randomness comes from ``self.generator``
    (seeded from ``config.seed``), so a run is reproducible and a checkpoint resumes it exactly.

    With ``config.outliers`` "oe" or "poe" (TrustDD) the run also learns unlabelled outlier images S_out, matched
    against real outliers T_out drawn from ``self.outlier_source``; each method decides how (see its docstring).

    With ``config.mdt`` (masked distillation training, paper 004) every synthetic minibatch that a network trained
    by the matching objective sees is multiplied by a fresh random binary mask (:meth:`mask_synthetic`); each method
    that supports it (``supports_mdt``) says where in its docstring, the others refuse ``mdt``.

    Methods that train their matching network on real data (dc/dsa with ``net_data`` "real", dm with ``net_data``
    "real") do it with :meth:`train_network_on_real`; with ``config.robust`` that loss is the group-robust objective
    of :mod:`fastdd.trust.robust` (``self.robust_objective``).

    In a torch.distributed process group (:mod:`fastdd.distill.distributed`) every rank builds the same distiller
    from the same seed; :meth:`step` computes only this rank's share of the summed work (its classes or students),
    still makes every random draw of the single-process run in the same order (:meth:`real_indices`,
    :meth:`skip_mask`), and sums the gradients over the ranks (:meth:`reduce_synthetic_gradients`) before the
    identical optimiser step, so all ranks stay equal to the single-process run.

    Attributes:
        images: ``[C * ipc, channels, H, W]`` leaf tensor being optimised (model space).
        labels: ``[C * ipc]`` int64, class-major.
        outlier_images: ``[round(outlier_ratio * C * ipc), channels, H, W]`` leaf tensor (model space), or None.
        outlier_source: where real outliers come from, or None without ``outliers``.
        robust_objective: the clustering and CVaR settings with ``robust``, else None.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[DistillConfig]] = DistillConfig
    # True for methods whose matching objective trains a network on the synthetic images (where MDT's mask acts).
    supports_mdt: ClassVar[bool] = False

    def __init__(self, config: DistillConfig, dataset: ImageDataset) -> None:
        self.config = config
        self.dataset = dataset
        self.device = torch.device(config.device)
        self._validate()
        self.generator = torch.Generator()
        self.generator.manual_seed(config.seed)
        self.class_index = dataset.class_index()
        self.dsa_strategy = config.dsa_strategy if config.dsa_strategy is not None else dataset.dsa_strategy
        self.images = self._initial_images().to(self.device).requires_grad_(True)
        self.labels = torch.arange(dataset.num_classes).repeat_interleave(config.ipc).to(self.device)
        self.outlier_source: OutlierSource | None = outlier_source(
            config.outliers, dataset, outlier_data=config.outlier_data, data_root=config.data_root
        )
        self.outlier_images: torch.Tensor | None = None
        if self.outlier_source is not None:
            self.outlier_images = self._initial_outliers().to(self.device).requires_grad_(True)
        self.optimizer = torch.optim.SGD(self.synthetic_tensors(), lr=config.lr_img, momentum=config.momentum_img)
        self.robust_objective: RobustObjective | None = None
        if config.robust:
            self.robust_objective = RobustObjective(
                num_classes=dataset.num_classes,
                clusters_per_class=config.clusters if config.clusters is not None else default_clusters(config.ipc),
                alpha=config.cvar_alpha,
                space=config.cluster_space,
            )

    # -- set-up -------------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        """The config's own checks (:func:`fastdd.config.check_config`), then those that need the dataset."""
        cfg, ds = check_config(self.config), self.dataset
        counts = ds.class_index().counts
        smallest = int(counts.min())
        if cfg.ipc > smallest:
            c = int(counts.argmin())
            raise FastddError(
                f"--ipc {cfg.ipc} is larger than the smallest class of {ds.name} "
                f"(class {ds.class_names[c]!r} has {smallest} training images); use --ipc {smallest} or less."
            )
        if cfg.mdt and not self.supports_mdt:
            raise FastddError(
                f"--mdt does not apply to {self.name}: MDT masks the inputs of networks that the matching objective "
                f"trains on the synthetic images, and {self.name}'s matching networks are never trained on them; use "
                "--mdt with dc, dsa, mtt, tesla or tesla-compat."
            )

    def _initial_images(self) -> torch.Tensor:
        cfg, ds = self.config, self.dataset
        if cfg.init == "noise":
            shape = (ds.num_classes * cfg.ipc, ds.channels, *ds.image_size)
            return torch.randn(shape, generator=self.generator)
        picks = [self.class_index.sample(c, cfg.ipc, self.generator) for c in range(ds.num_classes)]
        return ds.train_images[torch.cat(picks)].clone()

    def _initial_outliers(self) -> torch.Tensor:
        """S_out's start: real outliers (``init`` real) or Gaussian noise, ``round(outlier_ratio * C * ipc)`` images."""
        cfg, ds = self.config, self.dataset
        count = max(1, round(cfg.outlier_ratio * ds.num_classes * cfg.ipc))
        if cfg.init == "noise":
            return torch.randn((count, ds.channels, *ds.image_size), generator=self.generator)
        return self.outlier_source.sample(count, self.generator)

    # -- helpers for subclasses ---------------------------------------------------------------------------------
    def new_network(self, generator: torch.Generator | None = None) -> torch.nn.Module:
        """A freshly initialised network (from ``generator``, default the run's) on the run's device."""
        cfg = self.config
        net = build_model_for(
            self.dataset, cfg.model, width=cfg.width, depth=cfg.depth, norm=cfg.norm,
            generator=self.generator if generator is None else generator,
        )
        return net.to(self.device)

    def synthetic_tensors(self) -> list[torch.Tensor]:
        """The leaf tensors the image optimiser updates: ``[images]``, plus ``outlier_images`` when present."""
        return [self.images] if self.outlier_images is None else [self.images, self.outlier_images]

    def real_outliers(self, n: int) -> torch.Tensor:
        """``n`` real outliers T_out from the outlier source: ``[n, C, H, W]`` on the run's device."""
        if self.outlier_source is None:
            raise RuntimeError("this run has no outlier source (config.outliers is 'none')")
        return self.outlier_source.sample(n, self.generator).to(self.device)

    def real_batch(self, c: int, n: int) -> torch.Tensor:
        """Up to ``n`` random training images of class ``c``: ``[min(n, count_c), C, H, W]`` on the run's device."""
        return self.dataset.train_images[self.real_indices(c, n)].to(self.device)

    def real_indices(self, c: int, n: int) -> torch.Tensor:
        """The draw of :meth:`real_batch` alone: up to ``n`` random training indices of class ``c``. A rank that
        leaves class ``c`` to another rank calls this to keep its generator in step with the single-process run."""
        n = min(n, int(self.class_index.counts[c]))
        return self.class_index.sample(c, n, self.generator)

    def train_network_on_real(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> float:
        """``steps`` optimiser steps of ``net`` on fresh real minibatches; returns the mean loss.

        Each minibatch holds ``robust_batch`` random training images of every class (fewer for a smaller class),
        not augmented: real images are plentiful (a fresh batch every step), and an un-augmented image is clustered
        by the very embedding its loss is computed from, so with ``robust`` in embed space the clusters cost no
        extra forward pass. The loss is cross-entropy, or with ``robust`` the group-robust objective, its clusters
        formed around the current synthetic images. With outliers (TrustDD) the minibatch also holds
        ``round(outlier_ratio * N)`` real outliers (at least one) and the loss gains ``outlier_weight * H(U; f(out))``,
        as on the synthetic side.
        """
        cfg, num_classes = self.config, self.dataset.num_classes
        objective = self.robust_objective
        net.train()
        total = 0.0
        for _ in range(steps):
            real = [self.real_batch(c, cfg.robust_batch) for c in range(num_classes)]
            labels = torch.cat([torch.full((x.shape[0],), c, device=self.device) for c, x in enumerate(real)])
            real = torch.cat(real)
            n = real.shape[0]
            batch = real
            if self.outlier_source is not None:
                batch = torch.cat([real, self.real_outliers(max(1, round(cfg.outlier_ratio * n)))])
            if objective is None:
                logits = net(batch)
                loss = F.cross_entropy(logits[:n], labels)
            else:
                if objective.space == "embed":
                    logits, features = logits_and_embedding(net, batch)
                else:
                    logits, features = net(batch), None
                real_features = None if features is None else features[:n]
                assign = objective.assign(net, real, labels, self.images, self.labels, real_features=real_features)
                loss = objective.loss(logits[:n], labels, assign)
            if self.outlier_source is not None:
                loss = loss + cfg.outlier_weight * uniform_cross_entropy(logits[n:]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        return total / max(steps, 1)

    def augment_params(self, batch: int) -> AugmentParams | None:
        """DSA parameters for ``batch`` images (1 = one shared transform), or None when DSA is off."""
        if not self.config.dsa:
            return None
        return sample_augment_params(
            batch, self.dataset.image_size, strategy=self.dsa_strategy, generator=self.generator, device=self.device
        )

    @staticmethod
    def augment(x: torch.Tensor, params: AugmentParams | None) -> torch.Tensor:
        return x if params is None else diff_augment(x, params)

    @property
    def mdt_ratio(self) -> float:
        """MDT's masking ratio: ``config.mask_ratio`` with ``mdt`` on, else 0 (no masking)."""
        return self.config.mask_ratio if self.config.mdt else 0.0

    def mask_synthetic(self, x: torch.Tensor) -> torch.Tensor:
        """MDT: ``x`` ``[N, C, H, W]`` times a fresh ``[N, 1, H, W]`` binary mask from the run's generator that zeroes
        ``round(mask_ratio * H * W)`` pixels of each image in every channel; ``x`` itself (and no draw) without MDT or
        at ratio 0. Differentiable with respect to ``x``."""
        ratio = self.mdt_ratio
        if ratio == 0:
            return x
        return random_mask(x, ratio, generator=self.generator, patch=DEFAULT_MASK_PATCH)

    def skip_mask(self, shape: tuple[int, ...]) -> None:
        """The draws of :meth:`mask_synthetic` on images of ``shape`` ``[N, C, H, W]``, without masking anything."""
        ratio = self.mdt_ratio
        if ratio != 0:
            mask_like(shape, ratio, generator=self.generator, patch=DEFAULT_MASK_PATCH)

    # -- several processes (fastdd.distill.distributed) ----------------------------------------------------------
    def reduce_synthetic_gradients(self, loss: float) -> float:
        """Sum the gradients of the synthetic tensors (a missing one counts as zeros) and ``loss`` over the ranks;
        returns the summed loss. In one process: returns ``loss`` and touches nothing."""
        if distributed.world_size() == 1:
            return loss
        tensors = self.synthetic_tensors()
        for t in tensors:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        distributed.all_reduce_sum_([t.grad for t in tensors])
        return distributed.sum_float(loss)

    # -- the loop body ------------------------------------------------------------------------------------------
    def prepare(self, out: Path, *, progress: bool) -> None:
        """Called once by the runner before the first iteration (e.g. to train or load experts). No-op by default."""

    @abstractmethod
    def step(self, iteration: int) -> dict[str, float]:
        """Run one outer iteration (update ``self.images``) and return metrics, at least ``{"loss": ...}``."""

    # -- persistence --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (tensors and plain values only)."""
        state = {
            "images": self.images.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }
        if self.outlier_images is not None:
            state["outlier_images"] = self.outlier_images.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
            if self.outlier_images is not None:
                self.outlier_images.copy_(state["outlier_images"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def synthetic_set(self) -> SyntheticSet:
        """The current synthetic set with its metadata."""
        ds, cfg = self.dataset, self.config
        zca = ds.zca.state_tensors() if ds.zca is not None else None
        meta = {
            "format": "fastdd-synset/1",
            "fastdd_version": fastdd.__version__,
            "method": self.name,
            "dataset": ds.name,
            "data_root": cfg.data_root,
            "image_size": cfg.image_size,
            "ipc": cfg.ipc,
            "num_classes": ds.num_classes,
            "class_names": list(ds.class_names),
            "image_shape": [ds.channels, *ds.image_size],
            "mean": list(ds.mean),
            "std": list(ds.std),
            "zca": cfg.zca,
            "dsa_strategy": self.dsa_strategy,
            "model": cfg.model,
            "seed": cfg.seed,
            "hyperparameters": cfg.to_dict(),
        }
        outliers = None
        if self.outlier_images is not None:
            outliers = self.outlier_images.detach().cpu().clone()
            meta["outliers"] = {
                **self.outlier_source.describe(),
                "count": outliers.shape[0],
                "ratio": cfg.outlier_ratio,
                "weight": cfg.outlier_weight,
            }
        return SyntheticSet(
            images=self.images.detach().cpu().clone(),
            labels=self.labels.cpu().clone(),
            meta=meta,
            outlier_images=outliers,
            zca=zca,
        )
