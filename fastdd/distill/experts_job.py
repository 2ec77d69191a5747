"""A whole expert training from its configs (what ``fastdd experts`` runs, in each process of ``--nproc``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fastdd.config.experts import ExpertConfig
from fastdd.config.run import ExpertsRunConfig
from fastdd.determinism import deterministic_algorithms
from fastdd.distill import distributed
from fastdd.distill.experts import default_expert_folder, train_experts
from fastdd.expert_files import ExpertSet, missing_experts
from fastdd.io import check_writable_folder


def experts_folder(config: ExpertConfig, run: ExpertsRunConfig) -> Path:
    """``run.out``, or the default cache folder of these settings under ``runs/``."""
    return Path(run.out) if run.out is not None else default_expert_folder(config, "runs")


def check_before_start(config: ExpertConfig, run: ExpertsRunConfig) -> None:
    """A complete folder is only read (it may be a read-only cache); otherwise one process probes that it can be
    written (the probe may create and remove it)."""
    folder = experts_folder(config, run)
    if missing_experts(folder, config.num_experts) and distributed.launched_rank() == 0:
        check_writable_folder(folder)


def train(config: ExpertConfig, run: ExpertsRunConfig,
          on_expert: Callable[[int, float], None] | None = None) -> ExpertSet:
    """Train the experts of ``config`` that its folder lacks (each rank its share in a process group), then load
    the folder. ``on_expert(index, test_accuracy)`` is called after each newly trained expert is saved."""
    from fastdd.data import load_dataset

    with distributed.session(config.device), deterministic_algorithms(config.deterministic):
        data = load_dataset(config.dataset, data_root=config.data_root, image_size=config.image_size, zca=config.zca)
        return train_experts(config, data, experts_folder(config, run), progress=not run.quiet, on_expert=on_expert,
                             tensorboard=run.tensorboard_target(), wandb=run.wandb)
