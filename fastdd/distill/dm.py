"""DM: distribution matching of mean embeddings under random networks (Zhao & Bilen)."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fastdd.config import DMConfig
from fastdd.distill import distributed
from fastdd.distill.base import Distiller
from fastdd.errors import FastddError
from fastdd.precision import at_least_float32

# The kept network's optimiser: the evaluation protocol's SGD settings.
_NET_MOMENTUM = 0.9
_NET_WEIGHT_DECAY = 5e-4


class DM(Distiller):
    """Per iteration (by default) a fresh frozen network; the loss is
    ``sum_c ||mean embed(A(real_c)) - mean embed(A(syn_c))||^2``.

    The real and synthetic images of a class share one augmentation. All classes go through the network in one
    batch (the per-sample normalisations keep this identical to per-class forward passes; batchnorm does not).

    Plug-ins may add groups (:meth:`~fastdd.trust.plugins.TrustPlugin.matching_groups`): each is matched by its
    mean embedding, against that of ``batch_real`` of its real images under one shared augmentation.

    With ``net_data`` "real" (the default when a plug-in needs it), the matching network is not a fresh random one but a
    network kept across iterations and trained on real data, as IDM does: after each image update it takes
    ``net_steps`` SGD steps (lr ``lr_net``, momentum 0.9, weight decay 5e-4) of
    :meth:`Distiller.train_network_on_real` (un-augmented real minibatches), and it is re-initialised at every
    iteration that is a multiple of ``net_refresh`` (so iteration 0 matches with the same random network as plain
    DM). The kept network and its optimiser are part of the checkpoint.
    """

    name = "dm"
    config_class = DMConfig

    def __init__(self, config: DMConfig, dataset) -> None:
        super().__init__(config, dataset)
        self.net_data = config.net_data or ("real" if self.plugins.needs_real_network else "random")
        self.net: torch.nn.Module | None = None
        self.net_optimizer: torch.optim.Optimizer | None = None

    def _reset_kept_network(self, generator: torch.Generator) -> None:
        """A fresh kept network (from ``generator``) and a fresh optimiser for it."""
        self.net = self.new_network(generator)
        self.net_optimizer = torch.optim.SGD(
            self.net.parameters(), lr=self.config.lr_net, momentum=_NET_MOMENTUM, weight_decay=_NET_WEIGHT_DECAY
        )

    def step(self, iteration: int) -> dict[str, float]:
        cfg, num_classes = self.config, self.dataset.num_classes
        if self.net_data == "real":
            if self.net is None or iteration % cfg.net_refresh == 0:
                self._reset_kept_network(self.draws("network", iteration))
            net = self.net
        else:
            net = self.new_network(self.draws("network", iteration))
        net.train()
        net.requires_grad_(False)
        if distributed.world_size() > 1 and any(isinstance(m, _BatchNorm) for m in net.modules()):
            raise FastddError(
                "dm with a batchnorm network normalises all classes of a batch together, so its classes cannot be "
                "split over processes; use --norm instancenorm (the default) or run with one process."
            )
        groups = self.matching_groups()
        reals, syns, real_sizes, extra_sizes, owned_classes = [], [], [], [], 0
        for index, group in enumerate(groups):
            if not distributed.owns(index):
                continue  # another rank matches this group
            real = group.draw_real(cfg.batch_real, self.draws("real", iteration, index))
            aug = self.augment_params(1, self.draws("augment", iteration, index))
            reals.append(self.augment(real, aug))
            syns.append(self.augment(group.synthetic, aug))
            real_sizes.append(real.shape[0])
            if index < num_classes:
                owned_classes += 1
            else:
                extra_sizes.append(group.synthetic.shape[0])
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        if reals:
            with torch.no_grad(), self.autocast():
                real_features = at_least_float32(net.embed(torch.cat(reals)))
            with self.autocast():
                syn_features = at_least_float32(net.embed(torch.cat(syns)))
            real_means = torch.stack([f.mean(dim=0) for f in torch.split(real_features, real_sizes)])
            num_in = owned_classes * cfg.ipc
            syn_means = syn_features[:num_in].reshape(owned_classes, cfg.ipc, -1).mean(dim=1)
            extra_means = [f.mean(dim=0, keepdim=True) for f in syn_features[num_in:].split(extra_sizes)]
            if extra_means:
                syn_means = torch.cat([syn_means, *extra_means])
            loss = ((real_means - syn_means) ** 2).sum()
            loss.backward()
            loss_value = loss.item()
        loss_value = self.reduce_synthetic_gradients(loss_value)
        self.optimizer.step()
        metrics = {"loss": loss_value / len(groups)}
        if self.net_data == "real":
            net.requires_grad_(True)
            metrics["net_loss"] = self.train_network_on_real(net, self.net_optimizer, cfg.net_steps, (iteration,))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.net is not None:
            state["net"] = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
            state["net_optimizer"] = self.net_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "net" in state:
            # The weights come from the checkpoint: any generator builds it.
            self._reset_kept_network(torch.Generator())
            self.net.load_state_dict(state["net"])
            self.net_optimizer.load_state_dict(state["net_optimizer"])
