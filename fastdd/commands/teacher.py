"""``fastdd teacher``: options -> a teacher config -> :func:`fastdd.teacher_job.train_teacher`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from fastdd.commands.errors import user_errors
from fastdd.commands.options import config_file_option, given_options, with_config_options
from fastdd.config.options import from_options
from fastdd.config.teacher import TeacherConfig
from fastdd.progress import SHARED_CORES_HINT, Progress


@user_errors
@with_config_options(TeacherConfig)
def teacher(config: Optional[Path] = config_file_option(), **options: Any) -> None:
    """Train one network on the whole real training set and save it (network.safetensors + network.json).

    The folder is what OAL's --teacher and the evaluation's --init take: `fastdd teacher --dataset fashion-mnist
    --epochs 30 --out runs/teacher-fm`, then `fastdd evaluate SET --train-plugin oal --teacher runs/teacher-fm`.
    """
    from fastdd.determinism import deterministic_algorithms
    from fastdd.teacher_job import check_before_start, train_teacher

    settings = from_options(TeacherConfig, given_options(config, options), context="fastdd teacher")
    out = check_before_start(settings)
    with deterministic_algorithms(settings.deterministic), Progress(
        "teacher", settings.epochs, unit="epoch", enabled=not settings.quiet, hint=SHARED_CORES_HINT
    ) as progress:
        _, meta = train_teacher(settings, on_epoch=lambda epoch, loss: progress.advance(loss=f"{loss:.4g}"))
    typer.echo(f"{meta['model']} trained on all of {meta['dataset']} for {settings.epochs} epochs: test accuracy "
               f"{meta['test_accuracy']:.2f} %; written to {out}")
