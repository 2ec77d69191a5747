"""A whole distillation from its configs: load the data, build the method's distiller, run it into its folder.

This is what ``fastdd distill`` calls, in one process or in each process of ``--nproc N`` / torchrun.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastdd.config import DistillConfig
from fastdd.config.run import DistillRunConfig
from fastdd.determinism import deterministic_algorithms
from fastdd.distill import distributed
from fastdd.distill.runner import check_output_folder, run_distillation
from fastdd.errors import FastddError
from fastdd.io import SYNSET_META, SyntheticSet
from fastdd.runtime import kept_heap


def output_folder(config: DistillConfig, run: DistillRunConfig) -> Path:
    """``run.out``, or ``runs/METHOD-DATASET-ipcIPC``."""
    return Path(run.out) if run.out is not None else Path("runs") / f"{config.method}-{config.dataset}-ipc{config.ipc}"


def stored_settings(folder: Path) -> tuple[str, dict[str, Any]] | None:
    """``(method, settings)`` of the run saved in ``folder`` (from its ``synset.json``, written with every
    checkpoint), for ``--resume`` without the original options; None when the folder has no ``synset.json`` (the
    checkpoint itself then tells whether there is a run to continue).

    Raises:
        FastddError: the ``synset.json`` is damaged or not a distillation's.
    """
    path = folder / SYNSET_META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        return str(meta["method"]), dict(meta["hyperparameters"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FastddError(f"{path} is damaged or was not written by fastdd distill ({exc.__class__.__name__}); "
                          "the run cannot be resumed from it.") from None


def check_before_start(config: DistillConfig, run: DistillRunConfig) -> None:
    """The checks that need no data: the output folder can take this run (one process probes it; the probe may
    create and remove the folder)."""
    if distributed.launched_rank() == 0:
        check_output_folder(output_folder(config, run), resume=run.resume, overwrite=run.overwrite)


@kept_heap()
def distill(config: DistillConfig, run: DistillRunConfig) -> SyntheticSet:
    """Distill with ``config`` (a method config, e.g. :class:`~fastdd.config.DSAConfig`) into ``run.out``; in a
    process group (torchrun's environment) every rank calls this and rank 0 writes. Returns the final set."""
    from fastdd.data import load_dataset
    from fastdd.distill import get_distiller

    distiller_class = get_distiller(config.method)
    config = config.resolved()
    with distributed.session(config.device), deterministic_algorithms(config.deterministic):
        data = load_dataset(config.dataset, data_root=config.data_root, image_size=config.image_size,
                            zca=bool(config.zca))
        return run_distillation(
            distiller_class(config, data), output_folder(config, run), checkpoint_every=run.checkpoint_every,
            checkpoint_minutes=run.checkpoint_minutes,
            resume=run.resume, overwrite=run.overwrite, progress=not run.quiet,
            tensorboard=run.tensorboard_target(), wandb=run.wandb, log_images_every=run.log_images_every,
        )
