"""Group-robust distillation (paper 002) as a distiller plug-in: the CVaR objective of network steps on real data."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastdd.config import RobustConfig, pick
from fastdd.errors import FastddError
from fastdd.trust.outlier_loss import InLoss
from fastdd.trust.plugins import NetworkStep, TrustPlugin
from fastdd.trust.robust import RobustObjective, default_clusters, logits_and_embedding


class GroupRobust(TrustPlugin):
    """The network that supplies the matching signal trains on real data with the group-robust loss
    ``CE + mean_g CVaR_alpha(g) + max_g CVaR_alpha(g)`` (:mod:`fastdd.trust.robust`), its clusters formed around the
    current synthetic images of each class, in pixel space or in the network's embedding (``cluster_space``).

    It needs the matching network trained on real data, so it makes ``net_data`` "real" the default:

    - dc/dsa: the network update between image updates is ``net_steps`` steps (by default the image budget of the
      ``inner_loop`` epochs on S) on un-augmented minibatches of ``robust_batch`` real images per class, with the
      group-robust loss; a schedule that never updates the network (``outer_loop`` 1) is refused.
    - dm: the matching network is kept across iterations and trained on real data, as IDM does.
    - mtt/tesla: not applicable (their networks trained on real data are the experts, trained before any synthetic
      image exists).

    In embed space an un-augmented real image is clustered by the very embedding its loss is computed from, so the
    clusters cost no extra forward pass (:func:`~fastdd.trust.robust.logits_and_embedding`).

    Attributes:
        config: the :class:`~fastdd.config.RobustConfig` section.
        objective: the clustering and CVaR settings.
    """

    needs_real_network = True

    def __init__(self, config: RobustConfig, *, num_classes: int, ipc: int) -> None:
        self.config = config
        self.objective = RobustObjective(
            num_classes=num_classes,
            clusters_per_class=config.clusters if config.clusters is not None else default_clusters(ipc),
            alpha=config.cvar_alpha,
            space=config.cluster_space,
            tail=config.cvar_tail,
            within_class=config.robust_assign == "class",
        )

    @classmethod
    def from_config(cls, config: Any, dataset: Any, **_: Any) -> "GroupRobust | None":
        section = pick(RobustConfig, config)
        if not section.robust:
            return None
        return cls(section, num_classes=dataset.num_classes, ipc=config.ipc)

    def check_network_updates(self, updates: int, why: str, remedy: str) -> None:
        if updates < 1:
            raise FastddError(
                f"--robust changes how the network is trained between image updates, but {why} it is never trained; "
                f"{remedy}."
            )

    def network_forward(self, net: torch.nn.Module, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.objective.space == "embed":
            return logits_and_embedding(net, batch)
        return net(batch), None

    def in_loss(self, step: NetworkStep) -> InLoss:
        real_features = None if step.features is None else step.features[: step.n]
        assign = self.objective.assign(
            step.net, step.real, step.labels, step.synthetic, step.synthetic_labels, real_features=real_features
        )
        return lambda logits, labels: self.objective.loss(logits, labels, assign)
