"""Runs a Distiller: the iteration loop, progress bar, ``metrics.jsonl``, atomic checkpoints, resume, final save."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fastdd.distill import distributed
from fastdd.distill.base import Distiller
from fastdd.errors import FastddError
from fastdd.io import (
    CHECKPOINT,
    METRICS,
    SYNSET_GRID,
    SYNSET_META,
    SYNSET_OUTLIER_GRID,
    SYNSET_TENSORS,
    MetricsLog,
    SyntheticSet,
    load_checkpoint,
    save_checkpoint,
)


RUN_FILES = (CHECKPOINT, SYNSET_TENSORS, SYNSET_META, SYNSET_GRID, SYNSET_OUTLIER_GRID, METRICS)


def check_output_folder(out: Path, *, resume: bool, overwrite: bool = False) -> None:
    """Refuse to replace an earlier run unless resuming or overwriting it; refuse to resume from nothing."""
    if resume and overwrite:
        raise FastddError("--resume and --overwrite contradict each other; pass one of them.")
    has_run = (out / CHECKPOINT).exists() or (out / SYNSET_META).exists()
    if has_run and not (resume or overwrite):
        raise FastddError(
            f"{out} already holds a distillation run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out."
        )
    if resume and not (out / CHECKPOINT).exists():
        raise FastddError(f"--resume was given but {out} holds no {CHECKPOINT} to continue from.")


def save_synthetic_set(distiller: Distiller, out: Path) -> SyntheticSet:
    """Write the distiller's synthetic set (tensors, metadata, a PNG grid, and one of the outliers) into ``out``."""
    synset = distiller.synthetic_set()
    to_unit = distiller.dataset.to_unit_range
    outlier_grid = to_unit(synset.outlier_images) if synset.outlier_images is not None else None
    synset.save(out, grid=to_unit(synset.images), outlier_grid=outlier_grid)
    return synset


def run_distillation(
    distiller: Distiller,
    out: str | Path,
    *,
    checkpoint_every: int = 100,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> SyntheticSet:
    """Run ``distiller`` for ``config.iterations`` iterations, writing everything into ``out``.

    Writes ``metrics.jsonl`` (one record per iteration), ``checkpoint.pt`` every ``checkpoint_every`` iterations and
    at the end (atomically), and the synthetic set. ``overwrite`` replaces an earlier run in ``out`` (otherwise it
    is refused). With ``resume`` the run continues from ``checkpoint.pt`` with
    the same settings and ends bit-identical to an uninterrupted run. A non-finite loss stops the run with
    FastddError and leaves the last checkpoint and synthetic set untouched.

    In a process group (see :mod:`fastdd.distill.distributed`) every rank calls this with the same distiller
    settings; the distiller splits its work over the ranks, rank 0 alone writes ``out``, and with ``resume`` all
    ranks continue from the same checkpoint (which a run with another number of processes may have written).

    Returns:
        The final synthetic set.
    """
    out = Path(out)
    config = distiller.config
    main = distributed.is_main()
    check_output_folder(out, resume=resume, overwrite=overwrite)
    distributed.check_same(json.dumps(config.to_dict(), sort_keys=True), "settings")
    if overwrite and main:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    start = 0
    if resume:
        state = load_checkpoint(out)
        saved = json.loads(state["config"])
        if _differs_beyond_iterations(saved, config.to_dict()):
            raise FastddError(
                f"the checkpoint in {out} was made with other settings; rerun with the same options "
                "(only --iterations may change) or choose another --out."
            )
        distiller.load_state_dict(state["distiller"])
        start = int(state["iteration"])
    # Every rank has read the folder (and the checkpoint) before rank 0 writes into it.
    distributed.barrier()
    out.mkdir(parents=True, exist_ok=True)
    distiller.prepare(out, progress=progress and main)
    log = MetricsLog(out, resume_from=start if resume else None) if main else None
    total = config.iterations
    checkpoint_every = max(1, checkpoint_every)

    def checkpoint(iteration: int) -> SyntheticSet | None:
        # The ranks must hold the same synthetic set (they apply the same summed gradients): a cheap guard.
        if distributed.world_size() > 1:
            distributed.check_same(distributed.tensor_digest(distiller.synthetic_tensors()), "synthetic images")
        if not main:
            return None
        save_checkpoint(
            out,
            {
                "iteration": iteration,
                "method": distiller.name,
                "config": json.dumps(config.to_dict(), sort_keys=True),
                "distiller": distiller.state_dict(),
            },
        )
        return save_synthetic_set(distiller, out)

    bar = _ProgressBar(total, start, distiller.name, enabled=progress and main)
    t0 = time.perf_counter()
    with bar:
        for iteration in range(start, total):
            metrics = distiller.step(iteration)
            loss = metrics.get("loss", float("nan"))
            if not math.isfinite(loss):
                raise FastddError(
                    f"the loss became {loss} at iteration {iteration + 1}; the run stopped and the last checkpoint "
                    f"in {out} was kept (try a smaller --lr-img)."
                )
            if log is not None:
                log.write({"iteration": iteration + 1, "seconds": round(time.perf_counter() - t0, 4), **metrics})
            bar.advance(loss)
            if (iteration + 1) % checkpoint_every == 0 and iteration + 1 < total:
                checkpoint(iteration + 1)
    synset = checkpoint(total)
    distributed.barrier()  # the files exist when any rank returns
    return synset if synset is not None else distiller.synthetic_set()


def _differs_beyond_iterations(saved: dict, current: dict) -> bool:
    a = {k: v for k, v in saved.items() if k != "iterations"}
    b = {k: v for k, v in json.loads(json.dumps(current)).items() if k != "iterations"}
    return a != b


class _ProgressBar:
    """A rich progress bar with loss and ETA; does nothing when disabled."""

    def __init__(self, total: int, completed: int, label: str, *, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.progress.add_task(f"distill {label}", total=total, completed=completed, loss="-")

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def advance(self, loss: float) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1, loss=f"{loss:.4g}")
