"""DC: dataset condensation by gradient matching (Zhao et al.), and the outer/inner loop schedule by IPC."""

from __future__ import annotations

import torch

from fastdd.distill import distributed
from fastdd.config import GradientMatchingConfig
from fastdd.distill.base import Distiller
from fastdd.distill.gradient_distance import gradient_distance
from fastdd.ops import AugmentParams
from fastdd.precision import at_least_float32
from fastdd.training import train_epoch
from fastdd.trust.plugins import MatchingGroup

# (outer_loop, inner_loop) of the reference implementation.
LOOPS_BY_IPC = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
_BN_SAMPLES_PER_CLASS = 32
# (outer_loop, inner_loop) of the group-robust authors' distill_rdd.py (Mming11/RobustDatasetDistillation), whatever
# the IPC.
OFFICIAL_LOOPS = (2, 2)


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

    Plug-ins may add groups matched after the classes (:meth:`~fastdd.trust.plugins.TrustPlugin.matching_groups`),
    transform the augmented synthetic batches before the forward pass (``on_synthetic_batch``) and change the inner
    loop's epochs (``synthetic_training_options``).

    With ``net_data`` "real" (the default when a plug-in needs it) the network update between image updates is
    :meth:`Distiller.train_network_on_real`: ``net_steps`` steps (default :func:`real_steps_for`, the same image
    budget as the ``inner_loop`` epochs on S) on un-augmented minibatches of ``robust_batch`` real images per class.
    With ``robust_schedule`` "official" it is the group-robust authors' schedule instead (:meth:`_train_official`).
    """

    name = "dc"
    config_class = GradientMatchingConfig
    trains_on_synthetic = True

    def __init__(self, config: GradientMatchingConfig, dataset) -> None:
        super().__init__(config, dataset)
        self.official_schedule = config.robust_schedule == "official"
        needs_real = self.plugins.needs_real_network or self.official_schedule
        self.net_data = config.net_data or ("real" if needs_real else "synthetic")
        default_outer, default_inner = OFFICIAL_LOOPS if self.official_schedule else loops_for_ipc(config.ipc)
        self.outer_loop = config.outer_loop or default_outer
        self.inner_loop = config.inner_loop if config.inner_loop is not None else default_inner
        self.net_steps = config.net_steps
        if self.net_steps is None:
            self.net_steps = real_steps_for(self.inner_loop, config.ipc, config.robust_batch)
        self.plugins.check_network_updates(
            self.outer_loop - 1,
            f"with --outer-loop {self.outer_loop} (the default at IPC {config.ipc})",
            "pass --outer-loop 2 or more",
        )

    def _freeze_batchnorm(self, net: torch.nn.Module, iteration: int, outer: int) -> None:
        """Set BatchNorm statistics from real images of every class, then freeze them (as the reference does)."""
        if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            return
        generator = self.draws("batchnorm", iteration, outer)
        classes = range(self.dataset.num_classes)
        real = torch.cat([self.real_batch(c, _BN_SAMPLES_PER_CLASS, generator) for c in classes])
        net.train()
        with torch.no_grad():
            net(real)
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()

    def _match_classes(self, net: torch.nn.Module, iteration: int, outer: int) -> float:
        """Accumulate into the synthetic tensors' ``.grad`` the gradient-matching loss of every group (the classes,
        then the plug-ins' groups) at image update ``outer`` of ``iteration``; return the loss.

        With several processes, group ``g`` is computed by rank ``g % world`` only (its draws come from its
        position). The gradients and the loss are then summed over the ranks, so every rank ends with the
        single-process gradient."""
        params = [p for p in net.parameters() if p.requires_grad]
        # Summed on the device in float64 (as adding Python floats does) and read once: no sync per group.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        groups = self.matching_groups()
        for index, group in enumerate(groups):
            if distributed.owns(index):
                self.report_substep(f"outer step {outer + 1}/{self.outer_loop}, group {index + 1}/{len(groups)}")
                total += self._match_group(net, params, group, (iteration, outer, index))
        return self.reduce_synthetic_gradients(float(total))

    def _match_group(
        self, net: torch.nn.Module, params: list[torch.Tensor], group: MatchingGroup, position: tuple[int, int, int]
    ) -> torch.Tensor:
        """Accumulate one group's gradient-matching loss: real and synthetic images under one shared augmentation,
        the synthetic batch through the plug-ins (``on_synthetic_batch``), gradients of the group's loss compared.
        The real batch, the augmentation and the plug-ins' draws come from ``("real" | "augment" | "mask",
        iteration, outer, group)``."""
        real, aug = self._matched_real(group, position)
        syn = self.plugins.on_synthetic_batch(self.augment(group.synthetic, aug), self.draws("mask", *position))
        with self.autocast():
            logits_real, logits_syn = net(real), net(syn)
        g_real = torch.autograd.grad(group.loss(at_least_float32(logits_real)), params)
        g_real = [g.detach() for g in g_real]
        g_syn = torch.autograd.grad(group.loss(at_least_float32(logits_syn)), params, create_graph=True)
        distance = gradient_distance(g_syn, g_real, self.config.dis_metric)
        distance.backward()
        return distance.detach()

    def _matched_real(
        self, group: MatchingGroup, position: tuple[int, int, int]
    ) -> tuple[torch.Tensor, AugmentParams | None]:
        """The real batch ``group`` is matched against at ``position`` (iteration, outer, group), augmented, and its
        shared augmentation. A pure function of the position, so any rank can rebuild any group's batch."""
        real = group.draw_real(self.config.batch_real, self.draws("real", *position))
        aug = self.augment_params(1, self.draws("augment", *position))
        return self.augment(real, aug), aug

    def _train_official(
        self, net: torch.nn.Module, net_optimizer: torch.optim.Optimizer, iteration: int, outer: int
    ) -> float:
        """The group-robust authors' network update (``--robust-schedule official``); returns the mean loss.

        Their distill_rdd.py trains the network, between the two image updates, for ``inner_loop`` epochs on a set
        made of every class's augmented matching batch (``batch_real`` images) and a fresh batch of ``batch_real``
        real images of the class, in shuffled minibatches of ``batch_train`` that are augmented again per image
        (DSA; dc does not augment), with plain SGD at ``lr_net``: at 256 images per class, 10 classes and 2 epochs,
        40 steps. The loss of a minibatch is the plug-ins' (:meth:`~fastdd.trust.plugins.Plugins.network_loss`:
        cross-entropy, or ``--robust``'s objective, whose clusters are formed in the minibatch). Draws: the fresh
        batch of class ``c`` from ``("net_real", iteration, outer, c)``, the order of epoch ``e`` from
        ``("net_order", iteration, outer, e)``, minibatch ``b``'s augmentation from ``("net_augment", iteration,
        outer, e, b)`` and the plug-ins' rows from ``("net_extra", iteration, outer, e, b)``."""
        cfg = self.config
        images, labels = [], []
        with torch.no_grad():
            for c, group in enumerate(self.matching_groups()[: self.dataset.num_classes]):
                matched, _ = self._matched_real(group, (iteration, outer, c))
                fresh = self.real_batch(c, cfg.batch_real, self.draws("net_real", iteration, outer, c))
                images += [matched, fresh]
                labels.append(torch.full((matched.shape[0] + fresh.shape[0],), c, device=self.device))
        images, labels = torch.cat(images), torch.cat(labels)
        net.train()
        total, steps = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for epoch in range(self.inner_loop):
            order = torch.randperm(len(images), generator=self.draws("net_order", iteration, outer, epoch))
            for b, index in enumerate(order.to(self.device).split(cfg.batch_train)):
                aug = self.augment_params(len(index), self.draws("net_augment", iteration, outer, epoch, b))
                batch = self.augment(images[index], aug)
                extra = self.draws("net_extra", iteration, outer, epoch, b)
                with self.autocast():
                    loss = self.plugins.network_loss(net, batch, labels[index], extra, self.images, self.labels)
                net_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                net_optimizer.step()
                total, steps = total + loss.detach(), steps + 1
        return float(total) / max(steps, 1)

    def _train_on_synthetic(
        self, net: torch.nn.Module, net_optimizer: torch.optim.Optimizer, iteration: int, outer: int
    ) -> None:
        """``inner_loop`` epochs on S, as the reference does, with the plug-ins' options of
        :func:`~fastdd.training.train_epoch` (e.g. TrustDD's S_out and integrated loss, MDT's masks); epoch ``e``
        draws from ``("inner", iteration, outer, e)``."""
        cfg = self.config
        strategy = self.dsa_strategy if cfg.dsa else None
        options = self.plugins.synthetic_training_options()
        for epoch in range(self.inner_loop):
            train_epoch(
                net,
                net_optimizer,
                self.images,
                self.labels,
                batch_size=cfg.batch_train,
                generator=self.draws("inner", iteration, outer, epoch),
                dsa_strategy=strategy,
                precision=cfg.precision,
                **options,
            )

    def step(self, iteration: int) -> dict[str, float]:
        cfg = self.config
        net = self.new_network(self.draws("network", iteration))
        net_optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        loss_sum, net_loss_sum, net_updates = 0.0, 0.0, 0
        for outer in range(self.outer_loop):
            self._freeze_batchnorm(net, iteration, outer)
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum += self._match_classes(net, iteration, outer)
            self.optimizer.step()
            if outer == self.outer_loop - 1:
                break
            if self.official_schedule:
                net_loss_sum += self._train_official(net, net_optimizer, iteration, outer)
                net_updates += 1
            elif self.net_data == "real":
                net_loss_sum += self.train_network_on_real(net, net_optimizer, self.net_steps, (iteration, outer))
                net_updates += 1
            else:
                self._train_on_synthetic(net, net_optimizer, iteration, outer)
        metrics = {"loss": loss_sum / (self.outer_loop * len(self.matching_groups()))}
        if net_updates:
            metrics["net_loss"] = net_loss_sum / net_updates
        return metrics
