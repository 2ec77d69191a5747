"""The config of ``fastdd teacher``: one network trained on the whole real training set (OAL's teacher, or the
trained network that ``--init`` fine-tunes)."""

from __future__ import annotations

from dataclasses import dataclass

from fastdd.config.options import Section, option
from fastdd.config.run import OUTPUT, ProgressConfig
from fastdd.config.sections import AugmentationConfig, DataConfig, DeviceConfig, ModelConfig

TEACHER = "Teacher"


@dataclass
class TeacherTrainingConfig(Section):
    """SGD on the real training set, lr x0.1 at half the epochs (the evaluation protocol's schedule)."""

    epochs: int = option(30, "Training epochs over the real training set.", panel=TEACHER, at_least=1)
    lr: float = option(0.01, "SGD learning rate.", panel=TEACHER, above=0)
    momentum: float = option(0.9, "SGD momentum.", panel=TEACHER, at_least=0, below=1)
    weight_decay: float = option(5e-4, "SGD weight decay.", panel=TEACHER, at_least=0)
    batch_size: int = option(256, "Minibatch size.", panel=TEACHER, at_least=1)
    seed: int = option(0, "Seed of the initial weights, the order and the augmentation.", panel=TEACHER)


@dataclass
class TeacherConfig(DeviceConfig, ProgressConfig, TeacherTrainingConfig, AugmentationConfig, ModelConfig, DataConfig):
    """What ``fastdd teacher`` trains and where it writes it."""

    out: str | None = option(None, "Output folder (network.safetensors + network.json).", panel=OUTPUT,
                             default_text="runs/teacher-DATASET-MODEL")
    overwrite: bool = option(False, "Replace a network already in --out.", panel=OUTPUT,
                             flag="--overwrite/--no-overwrite")

    def output_folder(self) -> str:
        return self.out or f"runs/teacher-{self.dataset}-{self.model}"
