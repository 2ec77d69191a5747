"""Trust features as plug-ins of the distillers (as Lightning callbacks are of its trainer).

A trust feature that changes what is distilled (outliers: :class:`~fastdd.trust.outlier_exposure.OutlierExposure`,
group robustness: :class:`~fastdd.trust.group_robust.GroupRobust`, masked distillation training:
:class:`~fastdd.trust.mdt.MaskedDistillation`) is one object holding its config section, built by
:func:`build_plugins` only when the feature is on. The distillers' loops call the hooks of :class:`TrustPlugin`
through one :class:`Plugins` list and hold no feature-specific branch; a hook that a plug-in does not override is a
no-op. Every hook that draws random numbers takes the generator to draw from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdd.trust.outlier_loss import InLoss


@dataclass
class MatchingGroup:
    """One more group of synthetic images that dc/dsa/dm match against real ones, after the classes.

    Attributes:
        synthetic: the leaf tensor ``[M, C, H, W]`` of the group's synthetic images.
        draw_real: ``draw_real(n, generator)``: ``n`` real images of the group on the run's device.
        loss: ``loss(logits) -> 0-d``: the loss whose network gradients gradient matching compares.
    """

    synthetic: Tensor
    draw_real: Callable[[int, torch.Generator], Tensor]
    loss: Callable[[Tensor], Tensor]


@dataclass
class NetworkStep:
    """One network step on real data (:meth:`fastdd.distill.base.Distiller.train_network_on_real`).

    Attributes:
        net: the network being trained.
        real: ``[n, C, H, W]`` the labelled real images, the first ``n`` rows of the forward pass.
        labels: ``[n]`` their classes.
        logits: ``[n + extra, K]`` logits of the real images followed by the plug-ins' extra rows.
        features: ``[n + extra, D]`` detached embedding from the same forward pass, or None.
        synthetic: ``[M, C, H, W]`` the current synthetic images; ``synthetic_labels`` ``[M]`` their classes.
    """

    net: torch.nn.Module
    real: Tensor
    labels: Tensor
    logits: Tensor
    features: Tensor | None
    synthetic: Tensor
    synthetic_labels: Tensor

    @property
    def n(self) -> int:
        return self.real.shape[0]


class TrustPlugin:
    """The hooks a distiller calls; every default is a no-op (or "no answer" for the first-answer hooks)."""

    # A plug-in whose objective needs the matching network trained on real data (dc/dsa/dm default to it).
    needs_real_network: ClassVar[bool] = False

    # -- the synthetic set ----------------------------------------------------------------------------------------
    def synthetic_tensors(self) -> list[Tensor]:
        """Extra leaf tensors the image optimiser updates, after the labelled images (unlabelled rows)."""
        return []

    def describe(self) -> dict[str, Any]:
        """Entries for the synthetic set's metadata."""
        return {}

    def synthetic_set_tensors(self) -> dict[str, Tensor]:
        """Keyword tensors of :class:`fastdd.io.SyntheticSet` (copies on the CPU)."""
        return {}

    def image_logs(self) -> dict[str, Tensor]:
        """Image grids to log at each logging step: ``{name: [N, C, H, W] model-space images}``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries (merged into the distiller's state, so the keys must be unique)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from the distiller's whole state."""

    # -- gradient and distribution matching (dc, dsa, dm) ---------------------------------------------------------
    def matching_groups(self) -> list[MatchingGroup]:
        """Groups matched after the classes."""
        return []

    def on_synthetic_batch(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """The (augmented) synthetic batch a network trained by the matching objective sees, before its forward."""
        return x

    def synthetic_training_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fastdd.training.train_epoch` for an inner-loop epoch on the synthetic set."""
        return {}

    def check_network_updates(self, updates: int, why: str, remedy: str) -> None:
        """Refuse a schedule that updates the matching network ``updates`` times per iteration, if the plug-in
        needs more (``why`` names the setting, ``remedy`` the fix)."""

    # -- network steps on real data -------------------------------------------------------------------------------
    def real_batch_extra(self, n: int, generator: torch.Generator) -> Tensor | None:
        """Rows to append to a network step's batch of ``n`` labelled real images (forwarded together)."""
        return None

    def network_forward(self, net: torch.nn.Module, batch: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """``(logits, detached features)`` of ``batch`` when the plug-in needs the features (first answer wins)."""
        return None

    def in_loss(self, step: NetworkStep) -> InLoss | None:
        """A replacement of the cross-entropy of the labelled rows (first answer wins)."""
        return None

    def network_loss(self, step: NetworkStep, loss_in: InLoss) -> Tensor | None:
        """The whole step loss from ``loss_in`` of the labelled rows and the extra rows (first answer wins)."""
        return None

    # -- trajectory matching (mtt, tesla, tesla-compat) and its experts -------------------------------------------
    def student_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fastdd.distill.trajectory.match_gradients` (and ``plan_student``)."""
        return {}

    def expert_options(self) -> dict[str, Any]:
        """Fields of :class:`fastdd.config.experts.ExpertConfig` (how the experts train)."""
        return {}


P = TypeVar("P", bound=TrustPlugin)


class Plugins:
    """A distiller's plug-ins, in order, with each hook dispatched over them."""

    def __init__(self, plugins: list[TrustPlugin]) -> None:
        self._plugins = list(plugins)

    def __iter__(self) -> Iterator[TrustPlugin]:
        return iter(self._plugins)

    def __len__(self) -> int:
        return len(self._plugins)

    def get(self, kind: type[P]) -> P | None:
        """The plug-in of class ``kind``, or None when the feature is off."""
        return next((p for p in self._plugins if isinstance(p, kind)), None)

    @property
    def needs_real_network(self) -> bool:
        return any(p.needs_real_network for p in self._plugins)

    def _merged(self, hook: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for p in self._plugins:
            merged.update(getattr(p, hook)())
        return merged

    def _first(self, hook: str, *args: Any) -> Any:
        for p in self._plugins:
            answer = getattr(p, hook)(*args)
            if answer is not None:
                return answer
        return None

    def synthetic_tensors(self) -> list[Tensor]:
        return [t for p in self._plugins for t in p.synthetic_tensors()]

    def describe(self) -> dict[str, Any]:
        return self._merged("describe")

    def synthetic_set_tensors(self) -> dict[str, Tensor]:
        return self._merged("synthetic_set_tensors")

    def image_logs(self) -> dict[str, Tensor]:
        return self._merged("image_logs")

    def state_dict(self) -> dict[str, Any]:
        return self._merged("state_dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p in self._plugins:
            p.load_state_dict(state)

    def matching_groups(self) -> list[MatchingGroup]:
        return [g for p in self._plugins for g in p.matching_groups()]

    def on_synthetic_batch(self, x: Tensor, generator: torch.Generator) -> Tensor:
        for p in self._plugins:
            x = p.on_synthetic_batch(x, generator)
        return x

    def synthetic_training_options(self) -> dict[str, Any]:
        return self._merged("synthetic_training_options")

    def check_network_updates(self, updates: int, why: str, remedy: str) -> None:
        for p in self._plugins:
            p.check_network_updates(updates, why, remedy)

    def student_options(self) -> dict[str, Any]:
        return self._merged("student_options")

    def expert_options(self) -> dict[str, Any]:
        return self._merged("expert_options")

    def network_loss(
        self, net: torch.nn.Module, real: Tensor, labels: Tensor, generator: torch.Generator,
        synthetic: Tensor, synthetic_labels: Tensor,
    ) -> Tensor:
        """The loss of one network step on the labelled ``real`` images: the plug-ins may append rows
        (:meth:`TrustPlugin.real_batch_extra`), make the forward pass (:meth:`~TrustPlugin.network_forward`),
        replace the cross-entropy (:meth:`~TrustPlugin.in_loss`) and compose the total
        (:meth:`~TrustPlugin.network_loss`); with none of them it is ``CE(net(real), labels)``."""
        extra = [x for p in self._plugins if (x := p.real_batch_extra(real.shape[0], generator)) is not None]
        batch = torch.cat([real, *extra]) if extra else real
        forward = self._first("network_forward", net, batch)
        logits, features = forward if forward is not None else (net(batch), None)
        step = NetworkStep(net, real, labels, logits, features, synthetic, synthetic_labels)
        loss_in = self._first("in_loss", step) or F.cross_entropy
        loss = self._first("network_loss", step, loss_in)
        return loss if loss is not None else loss_in(logits[: step.n], labels)


def build_plugins(
    config: Any,
    dataset: Any,
    *,
    method: str,
    trains_on_synthetic: bool,
    generator: torch.Generator,
    device: torch.device,
) -> Plugins:
    """The plug-ins of the trust features that ``config`` (a :class:`~fastdd.config.DistillConfig`) turns on, each
    built from its own config section; ``generator`` draws the initial synthetic outliers (after the images)."""
    from fastdd.trust.group_robust import GroupRobust
    from fastdd.trust.mdt import MaskedDistillation
    from fastdd.trust.outlier_exposure import OutlierExposure

    plugins: list[TrustPlugin] = []
    for kind in (OutlierExposure, GroupRobust, MaskedDistillation):
        plugin = kind.from_config(
            config, dataset, method=method, trains_on_synthetic=trains_on_synthetic, generator=generator,
            device=device,
        )
        if plugin is not None:
            plugins.append(plugin)
    return Plugins(plugins)
