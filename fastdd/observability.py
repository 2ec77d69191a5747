"""Where a run's metrics and image grids go: ``metrics.jsonl`` always, TensorBoard and Weights & Biases on request.

A run hands every record it writes to ``metrics.jsonl`` to a list of sinks, with the record's step (the iteration
of a distillation, the epoch of an expert). Each sink has the same small interface (:class:`Sink`):

- ``log_scalars(record, step)``: one metrics record. TensorBoard and W&B log every numeric field as a scalar whose
  tag is the field name, except the fields that say where the record belongs (:data:`STEP_FIELDS`);
- ``log_images(name, images, step, nrow=...)``: a batch of ``[K, C, H, W]`` images in [0, 1], logged as one grid
  (the grid of ``synset.png``); the JSONL sink ignores images;
- ``flush()``: put everything logged so far on disk (called before every checkpoint, so a killed run's event files
  hold every step its checkpoint covers);
- ``close()``.

TensorBoard and W&B are optional packages: :func:`check_sinks_available` says in one sentence how to install a
missing one, and callers run it before any work.

Resuming: a TensorBoard writer opened for a run that starts after step ``s`` writes a new event file marked
``purge_step = s + 1`` (``SummaryWriter(purge_step=...)``): TensorBoard then hides what an interrupted process wrote
past its last checkpoint, so every step shows once, with the values of the process that continued. W&B gets a new
run per process (offline runs cannot be appended to), which starts at the checkpoint's step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from fastdd.config.run import DEFAULT_IMAGES_EVERY
from fastdd.errors import FastddError
from fastdd.image_grids import image_grid_array
from fastdd.io import MetricsLog

# Fields of a metrics record that locate it (its step, or which expert it belongs to) rather than measure something.
STEP_FIELDS = ("iteration", "epoch", "expert")
TENSORBOARD_DIR = "tensorboard"

_TENSORBOARD_MISSING = (
    "--tensorboard needs the tensorboard package, which is not installed; install it with `pip install tensorboard` "
    "or drop --tensorboard."
)
_WANDB_MISSING = (
    "--wandb needs the wandb package, which is not installed; install it with `pip install wandb` (and set "
    "WANDB_MODE=online to upload) or drop --wandb."
)


def numeric_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The fields of ``record`` that TensorBoard and W&B log: numbers (not booleans) outside :data:`STEP_FIELDS`."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in STEP_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise FastddError(_TENSORBOARD_MISSING) from exc
    return SummaryWriter


def _wandb_module():
    try:
        import wandb
    except ImportError as exc:
        raise FastddError(_WANDB_MISSING) from exc
    return wandb


def check_sinks_available(*, tensorboard: bool = False, wandb: bool = False) -> None:
    """Raise FastddError (one sentence: how to install it) when a requested optional package is missing."""
    if tensorboard:
        _summary_writer_class()
    if wandb:
        _wandb_module()


class Sink:
    """Receives a run's metrics records and image grids; every method does nothing unless overridden."""

    takes_images = False

    def log_scalars(self, record: Mapping[str, Any], step: int) -> None:
        """Log one metrics record (the object written to ``metrics.jsonl``) at ``step``."""

    def log_images(self, name: str, images: torch.Tensor, step: int, *, nrow: int | None = None) -> None:
        """Log ``images`` (``[K, C, H, W]`` in [0, 1]) as one grid of ``nrow`` images per row under ``name``."""

    def flush(self) -> None:
        """Write everything logged so far to disk."""

    def close(self) -> None:
        """Flush and release the sink."""


class JsonlSink(Sink):
    """``metrics.jsonl``: the whole record, one JSON object per line (:class:`fastdd.io.MetricsLog`); on resume the
    lines past the checkpoint are dropped first."""

    def __init__(self, folder: str | Path, *, resume_from: int | None = None) -> None:
        self.log = MetricsLog(folder, resume_from=resume_from)

    def log_scalars(self, record: Mapping[str, Any], step: int) -> None:
        self.log.write(dict(record))


class TensorBoardSink(Sink):
    """TensorBoard event files in ``log_dir`` through ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        log_dir: the folder of the event files (one TensorBoard run).
        purge_step: TensorBoard hides events of earlier files in ``log_dir`` at this step or later (pass the first
            step this writer logs); None hides nothing.
    """

    takes_images = True

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None) -> None:
        summary_writer = _summary_writer_class()
        self.log_dir = Path(log_dir)
        self.writer = summary_writer(log_dir=str(self.log_dir), purge_step=purge_step)

    def log_scalars(self, record: Mapping[str, Any], step: int) -> None:
        for tag, value in numeric_scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def log_images(self, name: str, images: torch.Tensor, step: int, *, nrow: int | None = None) -> None:
        grid = image_grid_array(images, nrow=nrow)
        self.writer.add_image(name, grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    """A Weights & Biases run: scalars and image grids through ``run.log(..., step=step)``.

    The mode comes from ``WANDB_MODE`` (default ``offline``: files under ``folder/wandb``, nothing sent; ``wandb
    sync`` uploads them later), the project from ``WANDB_PROJECT`` (default ``fastdd``).
    """

    takes_images = True

    def __init__(
        self, *, name: str, folder: str | Path, config: Mapping[str, Any] | None = None, group: str | None = None
    ) -> None:
        self.wandb = _wandb_module()
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "fastdd",
            name=name,
            group=group,
            dir=str(folder),
            config=dict(config) if config is not None else None,
            mode=os.environ.get("WANDB_MODE") or "offline",
        )

    def log_scalars(self, record: Mapping[str, Any], step: int) -> None:
        self.run.log(numeric_scalars(record), step=step)

    def log_images(self, name: str, images: torch.Tensor, step: int, *, nrow: int | None = None) -> None:
        self.run.log({name: self.wandb.Image(image_grid_array(images, nrow=nrow))}, step=step)

    def close(self) -> None:
        self.run.finish()


class Sinks(Sink):
    """Several sinks behind one: every call goes to each of them, in order; ``close`` closes all even if one fails."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)

    @property
    def takes_images(self) -> bool:  # type: ignore[override]
        return any(sink.takes_images for sink in self.sinks)

    def log_scalars(self, record: Mapping[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log_scalars(record, step)

    def log_images(self, name: str, images: torch.Tensor, step: int, *, nrow: int | None = None) -> None:
        for sink in self.sinks:
            if sink.takes_images:
                sink.log_images(name, images, step, nrow=nrow)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        error: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # close the others, then report the first failure
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> "Sinks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def optional_sinks(
    *,
    tensorboard: str | Path | None,
    wandb: bool,
    name: str,
    folder: str | Path,
    first_step: int,
    config: Mapping[str, Any] | None = None,
    group: str | None = None,
) -> list[Sink]:
    """The TensorBoard and W&B sinks requested (none by default).

    Args:
        tensorboard: folder of the event files, or None for no TensorBoard.
        wandb: log to a W&B run named ``name`` (in ``group``) with ``config``, its files under ``folder``.
        first_step: the first step this process logs (TensorBoard hides earlier files' events from it on).
    """
    sinks: list[Sink] = []
    try:
        if tensorboard is not None:
            sinks.append(TensorBoardSink(tensorboard, purge_step=first_step))
        if wandb:
            sinks.append(WandbSink(name=name, folder=folder, config=config, group=group))
    except BaseException:
        Sinks(sinks).close()
        raise
    return sinks


__all__ = [
    "DEFAULT_IMAGES_EVERY",
    "JsonlSink",
    "STEP_FIELDS",
    "Sink",
    "Sinks",
    "TENSORBOARD_DIR",
    "TensorBoardSink",
    "WandbSink",
    "check_sinks_available",
    "numeric_scalars",
    "optional_sinks",
]
