"""Which loss the evaluation networks train with: cross-entropy, a calibration loss (label smoothing, mixup,
focal) or the OAL plug-in, built fresh for every network."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastdd.config.evaluate import TrainObjectiveConfig
from fastdd.training import TrainObjective
from fastdd.trust.train_losses import train_objective


@dataclass
class TrainingObjectives:
    """Builds the objective of each evaluation network.

    Attributes:
        describe: what the networks train with, for logs and reports (e.g. ``"ce"``, ``"focal"``, ``"oal"``).
        factory: ``factory(net, generator)`` -> the objective for one fresh network (None = cross-entropy).
    """

    describe: str
    factory: Callable[[torch.nn.Module, torch.Generator], TrainObjective | None]

    @classmethod
    def create(
        cls,
        objective: TrainObjectiveConfig,
        *,
        synset: Any,
        dataset: Any,
        task: Any,
        seed: int,
        device: str,
    ) -> "TrainingObjectives":
        """For the protocol's task (``task.shape`` gives the number of classes) and the ``objective`` section (its
        ``train_loss``, or ``train_plugin`` with ``teacher``, ``oal_kl``, ``oal_recipe`` and ``oal_beta``). With ``train_plugin="oal"`` this loads
        the teacher and computes OAL's boundary outliers once, from the teacher's features of real training
        images drawn by a generator seeded by ``(seed, "oal")``.

        Raises:
            FastddError: an unknown loss, or a teacher that cannot be loaded.
        """
        num_classes = task.shape.num_classes
        if objective.train_plugin == "oal":
            from fastdd.trust.oal import OutlierBank
            from fastdd.trust.teacher import load_teacher

            teacher_net = load_teacher(objective.teacher, synset_meta=synset.meta, shape=task.shape, device=device)
            generator = torch.Generator()
            generator.manual_seed(zlib.crc32(f"{seed}/oal".encode()))
            bank = OutlierBank.from_real(
                teacher_net, dataset.train_images, dataset.train_labels, num_classes=num_classes, generator=generator,
                kl=objective.oal_kl, recipe=objective.oal_recipe, beta=objective.oal_beta,
            )
            return cls("oal", lambda net, gen: bank.objective(net, generator=gen))
        loss = train_objective(objective.train_loss, num_classes=num_classes)
        return cls(objective.train_loss, lambda net, gen: loss)

    def build(self, net: torch.nn.Module, generator: torch.Generator) -> TrainObjective | None:
        """The objective for the fresh network ``net`` (its own trainable parts initialised from ``generator``)."""
        return self.factory(net, generator)
