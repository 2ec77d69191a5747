"""DC: dataset condensation by gradient matching (Zhao et al.), and the outer/inner loop schedule by IPC."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastdd.distill import distributed
from fastdd.config import GradientMatchingConfig
from fastdd.distill.base import Distiller
from fastdd.distill.gradient_distance import gradient_distance
from fastdd.errors import FastddError
from fastdd.training import train_epoch
from fastdd.trust.outlier_loss import uniform_cross_entropy

# (outer_loop, inner_loop) of the reference implementation.
LOOPS_BY_IPC = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
_BN_SAMPLES_PER_CLASS = 32


def loops_for_ipc(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) for ``ipc``.

    The reference table is used where it has the IPC. Elsewhere: ``outer = min(ipc, 50)``; ``inner`` interpolates the
    table linearly between IPC 1 (1) and IPC 10 (50), and follows the table's ``500 / ipc`` law above 10 (at least 1).
    """
    if ipc in LOOPS_BY_IPC:
        return LOOPS_BY_IPC[ipc]
    outer = min(ipc, 50)
    inner = round(1 + (ipc - 1) * 49 / 9) if ipc < 10 else max(1, round(500 / ipc))
    return outer, inner


def real_steps_for(inner_loop: int, ipc: int, robust_batch: int) -> int:
    """Network steps on real data that replace ``inner_loop`` epochs on the synthetic set (``net_data`` "real").

    About as many images go through the network: ``inner_loop * ipc`` per class on S, ``robust_batch`` per class in
    one real step, so ``round(inner_loop * ipc / robust_batch)``, at least 1 (2 at IPC 10 and 50, 1 at IPC 1 with
    the default batch of 256); 0 when ``inner_loop`` is 0.
    """
    return max(1, round(inner_loop * ipc / robust_batch)) if inner_loop > 0 else 0


class DC(Distiller):
    """Gradient matching: per class, match the network's gradient on synthetic images to that on real images.

    Each iteration draws a fresh network, then alternates ``outer_loop`` image updates with ``inner_loop`` epochs of
    training the network on the synthetic set. With ``dsa`` the real and synthetic batch of a class share one
    augmentation (siamese), and the inner loop augments each image independently.

    With outliers (TrustDD), S_out is matched as one more group after the classes: the gradient of the outlier loss
    ``H(U; f(x))`` on ``batch_real`` real outliers against the same on S_out, under one shared augmentation; the inner
    loop trains the network with the integrated loss on S_in and S_out.

    With ``net_data`` "real" (the default with ``robust``; group-robust distillation trains the network on real
    data) the network update between image updates is :meth:`Distiller.train_network_on_real`: ``net_steps`` steps
    (default :func:`real_steps_for`, the same image budget as the ``inner_loop`` epochs on S) on un-augmented
    minibatches of ``robust_batch`` real images per class, with the group-robust loss under ``robust`` and cross-entropy otherwise.
    ``robust`` needs real data there: its clusters are real images grouped around the synthetic ones.

    With ``mdt`` (masked distillation training) a fresh binary mask from the run's generator, zeroing ``mask_ratio``
    of each image's pixels in all channels, multiplies the synthetic inputs of the network the objective trains on S:
    (a) in the gradient-matching loss, the augmented synthetic batch of each class (and S_out under TrustDD) just
    before its forward pass, so the gradient on masked S is matched to the gradient on unmasked real images (real
    images and real outliers are never masked); (b) in the inner loop, every augmented minibatch of S (and of S_out)
    before the network's forward pass (:class:`MaskedInputs`). With ``net_data`` "real" there is no inner loop on S,
    so only (a) applies. The batchnorm statistics from real images are not masked.
    """

    name = "dc"
    config_class = GradientMatchingConfig
    supports_mdt = True

    def __init__(self, config: GradientMatchingConfig, dataset) -> None:
        self.net_data = config.net_data or ("real" if config.robust else "synthetic")
        super().__init__(config, dataset)
        default_outer, default_inner = loops_for_ipc(config.ipc)
        self.outer_loop = config.outer_loop or default_outer
        self.inner_loop = config.inner_loop if config.inner_loop is not None else default_inner
        self.net_steps = config.net_steps
        if self.net_steps is None:
            self.net_steps = real_steps_for(self.inner_loop, config.ipc, config.robust_batch)
        if config.robust and self.outer_loop < 2:
            raise FastddError(
                f"--robust changes how the network is trained between image updates, but with --outer-loop "
                f"{self.outer_loop} (the default at IPC {config.ipc}) it is never trained; pass --outer-loop 2 or more."
            )

    def _freeze_batchnorm(self, net: torch.nn.Module) -> None:
        """Set BatchNorm statistics from real images of every class, then freeze them (as the reference does)."""
        if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            return
        real = torch.cat([self.real_batch(c, _BN_SAMPLES_PER_CLASS) for c in range(self.dataset.num_classes)])
        net.train()
        with torch.no_grad():
            net(real)
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()

    def _match_classes(self, net: torch.nn.Module) -> float:
        """Accumulate into ``self.images.grad`` the gradient-matching loss of every class; return the loss.

        With several processes, class ``c`` (and the outlier group, as group ``num_classes``) is computed by rank
        ``c % world`` only; the other ranks just make its random draws. The gradients and the loss are then summed
        over the ranks, so every rank ends with the single-process gradient."""
        cfg = self.config
        params = [p for p in net.parameters() if p.requires_grad]
        total = 0.0
        for c in range(self.dataset.num_classes):
            if not distributed.owns(c):
                self._skip_class(c)
                continue
            real = self.real_batch(c, cfg.batch_real)
            syn = self.images[c * cfg.ipc : (c + 1) * cfg.ipc]
            aug = self.augment_params(1)
            real, syn = self.augment(real, aug), self.mask_synthetic(self.augment(syn, aug))
            target_real = torch.full((real.shape[0],), c, device=self.device)
            target_syn = torch.full((syn.shape[0],), c, device=self.device)
            g_real = torch.autograd.grad(F.cross_entropy(net(real), target_real), params)
            g_real = [g.detach() for g in g_real]
            g_syn = torch.autograd.grad(F.cross_entropy(net(syn), target_syn), params, create_graph=True)
            distance = gradient_distance(g_syn, g_real, cfg.dis_metric)
            distance.backward()
            total += distance.item()
        if self.outlier_images is not None:
            if distributed.owns(self.dataset.num_classes):
                total += self._match_outliers(net, params)
            else:
                self._skip_outliers()
        return self.reduce_synthetic_gradients(total)

    def _skip_class(self, c: int) -> None:
        """The random draws of class ``c``'s matching term (left to another rank), without its computation."""
        cfg = self.config
        self.real_indices(c, cfg.batch_real)
        self.augment_params(1)
        self.skip_mask((cfg.ipc, *self.images.shape[1:]))

    def _skip_outliers(self) -> None:
        """The random draws of the outlier matching term (left to another rank), without its computation."""
        self.real_outliers(self.config.batch_real)
        self.augment_params(1)
        self.skip_mask(tuple(self.outlier_images.shape))

    def _match_outliers(self, net: torch.nn.Module, params: list[torch.Tensor]) -> float:
        """Accumulate the gradient-matching loss of S_out against real outliers (outlier-loss gradients)."""
        real = self.real_outliers(self.config.batch_real)
        aug = self.augment_params(1)
        real, syn = self.augment(real, aug), self.mask_synthetic(self.augment(self.outlier_images, aug))
        g_real = torch.autograd.grad(uniform_cross_entropy(net(real)).mean(), params)
        g_real = [g.detach() for g in g_real]
        g_syn = torch.autograd.grad(uniform_cross_entropy(net(syn)).mean(), params, create_graph=True)
        distance = gradient_distance(g_syn, g_real, self.config.dis_metric)
        distance.backward()
        return distance.item()

    def _train_on_synthetic(self, net: torch.nn.Module, net_optimizer: torch.optim.Optimizer) -> None:
        """``inner_loop`` epochs on S (with S_out and the integrated loss under TrustDD), as the reference does; with
        MDT each augmented minibatch is masked before the forward pass."""
        cfg = self.config
        strategy = self.dsa_strategy if cfg.dsa else None
        if self.mdt_ratio > 0:
            net = MaskedInputs(net, self.mask_synthetic)
        for _ in range(self.inner_loop):
            train_epoch(
                net,
                net_optimizer,
                self.images,
                self.labels,
                batch_size=cfg.batch_train,
                generator=self.generator,
                dsa_strategy=strategy,
                outliers=self.outlier_images,
                outlier_weight=cfg.outlier_weight,
            )

    def step(self, iteration: int) -> dict[str, float]:
        cfg = self.config
        net = self.new_network()
        net_optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        loss_sum, net_loss_sum, net_updates = 0.0, 0.0, 0
        for outer in range(self.outer_loop):
            self._freeze_batchnorm(net)
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum += self._match_classes(net)
            self.optimizer.step()
            if outer == self.outer_loop - 1:
                break
            if self.net_data == "real":
                net_loss_sum += self.train_network_on_real(net, net_optimizer, self.net_steps)
                net_updates += 1
            else:
                self._train_on_synthetic(net, net_optimizer)
        groups = self.dataset.num_classes + (self.outlier_images is not None)
        metrics = {"loss": loss_sum / (self.outer_loop * groups)}
        if net_updates:
            metrics["net_loss"] = net_loss_sum / net_updates
        return metrics


class MaskedInputs(torch.nn.Module):
    """``net`` whose every input ``[N, C, H, W]`` first goes through ``mask`` (MDT's fresh mask per call); it holds
    ``net``'s parameters, so an optimiser built on ``net`` trains it."""

    def __init__(self, net: torch.nn.Module, mask: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.mask(x))
