"""The config of expert training (``fastdd experts``, and the experts mtt/tesla train for themselves)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastdd.config.options import Section, option, redefault
from fastdd.config.sections import (
    AugmentationConfig,
    DataConfig,
    DeviceConfig,
    ModelConfig,
)
from fastdd.config.trust import OutliersConfig

EXPERTS = "Experts"
DEFAULT_NUM_EXPERTS = 5


@dataclass
class ExpertTrainingConfig(Section):
    """How many experts and how each is trained (the reference defaults of MTT's buffer script)."""

    num_experts: int = option(DEFAULT_NUM_EXPERTS, "Number of experts the folder should hold (the same default as "
                              "the experts mtt/tesla train for themselves).", panel=EXPERTS, at_least=1)
    epochs: int = option(50, "Epochs per expert (snapshots = epochs + 1).", panel=EXPERTS, at_least=1)
    lr_teacher: float = option(0.01, "SGD learning rate.", panel=EXPERTS, above=0)
    momentum: float = option(0.0, "SGD momentum.", panel=EXPERTS, at_least=0, below=1)
    weight_decay: float = option(0.0, "SGD weight decay.", panel=EXPERTS, at_least=0)
    batch_size: int = option(256, "Minibatch size.", panel=EXPERTS, at_least=1)
    seed: int = option(0, "Base seed; expert k uses a seed derived from (seed, k).", panel=EXPERTS)
    keep_snapshots: int | None = option(
        None, "Keep only the first K snapshots (and train K-1 epochs); at least 2 (a start and a target).",
        panel=EXPERTS, at_least=2, default_text="all",
    )


@dataclass
class ExpertConfig(DeviceConfig, OutliersConfig, ExpertTrainingConfig, AugmentationConfig, ModelConfig, DataConfig):
    """How experts are trained: the data, the network, DSA on every minibatch (one transform per image), the SGD
    settings, and TrustDD's integrated loss with ``outliers`` "oe" or "poe" (every epoch also draws
    ``round(outlier_ratio * N)`` fresh real outliers; see ``fastdd.training.train_epoch``).

    ``keep_snapshots`` keeps only the first snapshots (the ones distillation can use: ``max_start_epoch +
    expert_epochs + 1``); training stops after ``keep_snapshots - 1`` epochs when that is fewer than ``epochs``.
    """

    outlier_ratio: float = redefault(OutliersConfig, "outlier_ratio", 1.0,
                                     help="Fresh outliers per training image and epoch.")

    @property
    def epochs_trained(self) -> int:
        """Epochs actually run per expert: ``epochs``, or fewer when ``keep_snapshots`` discards the rest."""
        if self.keep_snapshots is None:
            return self.epochs
        return min(self.epochs, self.keep_snapshots - 1)

    @property
    def num_snapshots(self) -> int:
        """Snapshots stored per expert: ``epochs_trained + 1``."""
        return self.epochs_trained + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
