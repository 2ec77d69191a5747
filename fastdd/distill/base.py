"""The Distiller interface: a synthetic set, its optimiser, draws by position, and one ``step`` per iteration."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

import fastdd
from fastdd.config import DistillConfig, check_config
from fastdd.data import ImageDataset
from fastdd.distill import distributed
from fastdd.distill.draws import draw_generator
from fastdd.errors import FastddError
from fastdd.io import SyntheticSet
from fastdd.models import build_model_for
from fastdd.ops import AugmentParams, diff_augment, sample_augment_params
from fastdd.precision import autocast
from fastdd.trust.plugins import MatchingGroup, Plugins, build_plugins

# The checkpoints' record of how the run draws its random numbers (by position, fastdd.distill.draws).
DRAWS = "position/1"


# The training images are copied to a GPU once when they take at most this share of its free memory; a larger set
# stays on the CPU and each real batch is gathered there and copied over.
REAL_DATA_SHARE_OF_FREE_MEMORY = 0.25


def real_images_on_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``images`` ``[N, C, H, W]`` on ``device`` when it is a GPU with room for them (at most
    :data:`REAL_DATA_SHARE_OF_FREE_MEMORY` of its free memory), else as they are (on the CPU): real batches are then
    gathered on the GPU with no host round trip per step."""
    if device.type != "cuda" or images.device == device:
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() > REAL_DATA_SHARE_OF_FREE_MEMORY * free:
        return images
    return images.to(device)


class Distiller(ABC):
    """Learns ``ipc`` synthetic images per class for ``dataset``.

    Subclasses define ``name``, ``config_class`` and :meth:`step`. Every random draw comes from a generator derived
    from ``config.seed`` and the draw's position (:meth:`draws`, :mod:`fastdd.distill.draws`), so a run is
    reproducible and a checkpoint (which holds no generator state) resumes it exactly.

    The trust features that change what is distilled (TrustDD outliers, group robustness, MDT) are plug-ins
    (:mod:`fastdd.trust.plugins`) in ``self.plugins``, built from their config sections when they are on; the loops
    call their hooks and hold no feature-specific branch. Each plug-in's docstring says what it does in each method.

    Methods that train their matching network on real data (dc/dsa with ``net_data`` "real", dm with ``net_data``
    "real") do it with :meth:`train_network_on_real`, whose loss the plug-ins may change.

    In a torch.distributed process group (:mod:`fastdd.distill.distributed`) every rank builds the same distiller
    from the same seed; :meth:`step` computes only this rank's share of the summed work (its classes or students),
    whose draws come from their positions whichever rank makes them, and sums the gradients over the ranks
    (:meth:`reduce_synthetic_gradients`) before the identical optimiser step, so all ranks stay equal to the
    single-process run.

    Attributes:
        images: ``[C * ipc, channels, H, W]`` leaf tensor being optimised (model space).
        labels: ``[C * ipc]`` int64, class-major.
        plugins: the trust plug-ins that are on, in order.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[DistillConfig]] = DistillConfig
    # True for methods whose matching objective trains a network on the synthetic images.
    trains_on_synthetic: ClassVar[bool] = False

    def __init__(self, config: DistillConfig, dataset: ImageDataset) -> None:
        self.config = config
        self.dataset = dataset
        self.device = torch.device(config.device)
        self._validate()
        self.class_index = dataset.class_index()
        self.dsa_strategy = config.dsa_strategy if config.dsa_strategy is not None else dataset.dsa_strategy
        self.images = self._initial_images().to(self.device).requires_grad_(True)
        self._real_images = real_images_on_device(dataset.train_images, self.device)
        self.labels = torch.arange(dataset.num_classes).repeat_interleave(config.ipc).to(self.device)
        self.plugins: Plugins = build_plugins(
            config, dataset, method=self.name, trains_on_synthetic=self.trains_on_synthetic,
            generator=self.draws("init_plugins"), device=self.device,
        )
        self.optimizer = torch.optim.SGD(self.synthetic_tensors(), lr=config.lr_img, momentum=config.momentum_img)

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

    def _initial_images(self) -> torch.Tensor:
        cfg, ds = self.config, self.dataset
        generator = self.draws("init_images")
        if cfg.init == "noise":
            shape = (ds.num_classes * cfg.ipc, ds.channels, *ds.image_size)
            return torch.randn(shape, generator=generator)
        picks = [self.class_index.sample(c, cfg.ipc, generator) for c in range(ds.num_classes)]
        return ds.train_images[torch.cat(picks)].clone()

    # -- helpers for subclasses ---------------------------------------------------------------------------------
    def draws(self, kind: str, *position: int | str) -> torch.Generator:
        """The generator of the draws of ``kind`` at ``position`` (:func:`fastdd.distill.draws.draw_generator`)."""
        return draw_generator(self.config.seed, kind, *position)

    def new_network(self, generator: torch.Generator) -> torch.nn.Module:
        """A freshly initialised network (from ``generator``) on the run's device."""
        cfg = self.config
        net = build_model_for(
            self.dataset, cfg.model, width=cfg.width, depth=cfg.depth, norm=cfg.norm, generator=generator
        )
        return net.to(self.device)

    def autocast(self):
        """The context in which the run's network forward passes run: autocast in ``config.precision``
        (:mod:`fastdd.precision`; a no-op for fp32). Losses take :func:`fastdd.precision.at_least_float32` logits."""
        return autocast(self.config.precision, self.device)

    def synthetic_tensors(self) -> list[torch.Tensor]:
        """The leaf tensors the image optimiser updates: ``images``, then the plug-ins' (e.g. TrustDD's S_out)."""
        return [self.images, *self.plugins.synthetic_tensors()]

    def real_batch(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Up to ``n`` random training images of class ``c`` drawn from ``generator``: ``[min(n, count_c), C, H, W]``
        on the run's device."""
        n = min(n, int(self.class_index.counts[c]))
        rows = self.class_index.sample(c, n, generator).to(self._real_images.device, non_blocking=True)
        return self._real_images[rows].to(self.device)

    def matching_groups(self) -> list[MatchingGroup]:
        """The groups dc/dsa/dm match: the classes (their synthetic images; cross-entropy for gradient matching),
        then the plug-ins' groups (e.g. TrustDD's S_out)."""
        ipc = self.config.ipc
        classes = [
            MatchingGroup(
                self.images[c * ipc : (c + 1) * ipc],
                lambda n, generator, c=c: self.real_batch(c, n, generator),
                lambda logits, c=c: F.cross_entropy(logits, torch.full((logits.shape[0],), c, device=self.device)),
            )
            for c in range(self.dataset.num_classes)
        ]
        return classes + self.plugins.matching_groups()

    def train_network_on_real(
        self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, position: tuple[int, ...]
    ) -> float:
        """``steps`` optimiser steps of ``net`` on fresh real minibatches; returns the mean loss. Step ``s`` draws
        its real images from position ``("net_real", *position, s)``, the plug-ins' rows from ``("net_extra", ...)``.

        Each minibatch holds ``robust_batch`` random training images of every class (fewer for a smaller class),
        not augmented: real images are plentiful (a fresh batch every step). The loss is cross-entropy unless the
        plug-ins change it (:meth:`fastdd.trust.plugins.Plugins.network_loss`: extra rows, another objective).
        """
        cfg, num_classes = self.config, self.dataset.num_classes
        net.train()
        # Summed on the device in float64 (what adding loss.item()s in Python does) and read once: no sync per step.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for step in range(steps):
            generator = self.draws("net_real", *position, step)
            real = [self.real_batch(c, cfg.robust_batch, generator) for c in range(num_classes)]
            labels = torch.cat([torch.full((x.shape[0],), c, device=self.device) for c, x in enumerate(real)])
            extra = self.draws("net_extra", *position, step)
            with self.autocast():
                loss = self.plugins.network_loss(net, torch.cat(real), labels, extra, self.images, self.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        return float(total) / max(steps, 1)

    def augment_params(self, batch: int, generator: torch.Generator) -> AugmentParams | None:
        """DSA parameters for ``batch`` images (1 = one shared transform) drawn from ``generator``; None without
        DSA."""
        if not self.config.dsa:
            return None
        return sample_augment_params(
            batch, self.dataset.image_size, strategy=self.dsa_strategy, generator=generator, device=self.device
        )

    @staticmethod
    def augment(x: torch.Tensor, params: AugmentParams | None) -> torch.Tensor:
        return x if params is None else diff_augment(x, params)

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
    # Called with where a long iteration is ("outer step 3/10, group 4/11"); set by the runner to show progress
    # inside iterations that take minutes.
    on_substep: Callable[[str], None] | None = None

    def report_substep(self, where: str) -> None:
        if self.on_substep is not None:
            self.on_substep(where)

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
            "draws": DRAWS,
        }
        state.update(self.plugins.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("draws") != DRAWS:
            raise FastddError(
                "this checkpoint was written by an earlier fastdd that drew its random numbers from one running "
                "generator, and this version draws them by position (seed, iteration, class or student), so it cannot "
                "continue that run exactly: start the run again without --resume."
            )
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.plugins.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])

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
            "data_source": ds.source,
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
            **self.plugins.describe(),
        }
        return SyntheticSet(
            images=self.images.detach().cpu().clone(),
            labels=self.labels.cpu().clone(),
            meta=meta,
            zca=zca,
            **self.plugins.synthetic_set_tensors(),
        )
