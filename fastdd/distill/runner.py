"""Runs a Distiller: the iteration loop, progress bar, ``metrics.jsonl``, checksummed checkpoints, resume, final save.

Faults: a run killed at any moment (SIGKILL included) and restarted with ``resume`` loses at most the iterations
since its last complete checkpoint and then continues exactly as an uninterrupted run would. A damaged latest
checkpoint is detected by its checksum and the previous one is used (see :func:`fastdd.io.load_checkpoint`). Before
any work the output folder is checked to be writable with free space, and a write that fails mid-run (e.g. a full
disk) stops with one sentence, leaving the last checkpoint and synthetic set intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Iterator

import torch

from fastdd.config.run import DEFAULT_CHECKPOINT_MINUTES
from fastdd.distill import distributed
from fastdd.distill.base import Distiller
from fastdd.errors import FastddError, Interrupted
from fastdd.io import (
    CHECKPOINT,
    CHECKPOINT_FILES,
    METRICS,
    PREVIOUS_CHECKPOINT,
    SYNSET_GRID,
    SYNSET_META,
    SYNSET_OUTLIER_GRID,
    SYNSET_TENSORS,
    SyntheticSet,
    check_writable_folder,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from fastdd.observability import (
    DEFAULT_IMAGES_EVERY,
    TENSORBOARD_DIR,
    JsonlSink,
    Sinks,
    check_sinks_available,
    optional_sinks,
)
from fastdd.progress import SHARED_CORES_HINT, Progress

_SLOW_FIRST_ITERATION = 60.0  # seconds: a first iteration this slow is checkpointed at once

RUN_FILES = (*CHECKPOINT_FILES, SYNSET_TENSORS, SYNSET_META, SYNSET_GRID, SYNSET_OUTLIER_GRID, METRICS)


def check_output_folder(out: Path, *, resume: bool, overwrite: bool = False, need_bytes: int = 0) -> None:
    """Refuse to replace an earlier run unless resuming or overwriting it; refuse to resume from nothing; check the
    folder can be created and written and its disk has ``need_bytes`` (at least ``fastdd.io.MIN_FREE_BYTES``) free
    (``fastdd.io.check_writable_folder``). Changes nothing on disk."""
    out = Path(out)
    if resume and overwrite:
        raise FastddError("--resume and --overwrite contradict each other; pass one of them.")
    has_checkpoint = (out / CHECKPOINT).exists() or (out / PREVIOUS_CHECKPOINT).exists()
    has_run = has_checkpoint or (out / SYNSET_META).exists()
    if has_run and not (resume or overwrite):
        raise FastddError(
            f"{out} already holds a distillation run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out."
        )
    if resume and not has_checkpoint:
        raise FastddError(f"--resume was given but {out} holds no {CHECKPOINT} to continue from.")
    check_writable_folder(out, need_bytes=need_bytes)


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
    checkpoint_minutes: float = DEFAULT_CHECKPOINT_MINUTES,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    tensorboard: str | Path | bool | None = None,
    wandb: bool = False,
    log_images_every: int = DEFAULT_IMAGES_EVERY,
) -> SyntheticSet:
    """Run ``distiller`` for ``config.iterations`` iterations, writing everything into ``out``.

    Writes ``metrics.jsonl`` (one record per iteration), a checksummed checkpoint (``checkpoint.pt`` +
    ``checkpoint.json``, the one before kept as ``checkpoint.prev.*``) every ``checkpoint_every`` iterations, also
    whenever ``checkpoint_minutes`` have passed since the last one (and after a first iteration that took a minute or
    more, so a slow run soon has something to resume), and at the end, and the synthetic set. ``overwrite`` replaces an earlier run in ``out`` (otherwise it is refused).
    Before anything is changed, ``out`` must be writable with free space for about four checkpoints. With ``resume``
    the run continues from the newest valid checkpoint with the same settings (``metrics.jsonl`` is cut back to that
    checkpoint's iteration) and ends bit-identical to an uninterrupted run. A non-finite loss, or a write that fails
    (``OSError``, e.g. a full disk), stops the run with FastddError and leaves the last checkpoint and synthetic set
    untouched.

    ``tensorboard`` (a folder, or True for ``out/tensorboard``) and ``wandb`` also send every record's numeric fields
    (step = iteration) and the image grids (``synset``, and ``synset_outliers`` for a set with outliers) every
    ``log_images_every`` iterations and at the end to TensorBoard / Weights & Biases (see
    :mod:`fastdd.observability`); a missing package raises FastddError before any work.

    In a process group (see :mod:`fastdd.distill.distributed`) every rank calls this with the same distiller
    settings; the distiller splits its work over the ranks, rank 0 alone writes ``out``, and with ``resume`` all
    ranks continue from the same checkpoint (which a run with another number of processes may have written).

    Returns:
        The final synthetic set.
    """
    out = Path(out)
    config = distiller.config
    main = distributed.is_main()
    if tensorboard is True:
        tensorboard = out / TENSORBOARD_DIR
    elif tensorboard is False:
        tensorboard = None
    check_sinks_available(tensorboard=tensorboard is not None, wandb=wandb)
    start = _open_run(distiller, out, resume=resume, overwrite=overwrite)
    distiller.prepare(out, progress=progress and main)
    sinks = Sinks([JsonlSink(out, resume_from=start if resume else None)] if main else [])
    checkpoints = _Checkpoints(distiller, out, sinks, last_saved=start)
    total = config.iterations
    checkpoint_every, log_images_every = max(1, checkpoint_every), max(1, log_images_every)
    bar = Progress(f"distill {distiller.name}", total, completed=start, unit="iteration", enabled=progress and main,
                   hint=SHARED_CORES_HINT)
    distiller.on_substep = bar.within
    t0 = time.perf_counter()
    with sinks:
        if main:
            sinks.sinks += optional_sinks(
                tensorboard=tensorboard, wandb=wandb, name=out.name, folder=out, first_step=start + 1,
                config=config.to_dict(),
            )
        with bar, _interruptible(out, checkpoints):
            for iteration in range(start, total):
                checkpoints.current = iteration + 1
                metrics = distiller.step(iteration)
                loss = metrics.get("loss", float("nan"))
                if not math.isfinite(loss):
                    raise FastddError(
                        f"the loss became {loss} at iteration {iteration + 1}; the run stopped and the last "
                        f"checkpoint in {out} was kept (try a smaller --lr-img)."
                    )
                step = iteration + 1
                record = {"iteration": step, "seconds": round(time.perf_counter() - t0, 4), **metrics}
                try:
                    sinks.log_scalars(record, step)
                except OSError as exc:
                    raise _write_failed(out, f"{METRICS}", exc, checkpoints.last_saved) from None
                bar.advance(loss=loss)
                if sinks.takes_images and (step % log_images_every == 0 or step == total):
                    _log_images(distiller, sinks, step)
                if step < total and (checkpoints.due(checkpoint_minutes) or step % checkpoint_every == 0):
                    checkpoints.write(step)
        synset = checkpoints.write(total)
    distributed.barrier()  # the files exist when any rank returns
    return synset if synset is not None else distiller.synthetic_set()


def _open_run(distiller: Distiller, out: Path, *, resume: bool, overwrite: bool) -> int:
    """Check ``out`` can take the run, clear it with ``overwrite``, load the checkpoint with ``resume``; returns the
    iteration to start from. Every rank returns only once all have read the folder."""
    config, main = distiller.config, distributed.is_main()
    if main:  # one rank probes the folder (the launcher stops the others if it fails)
        # Room for three checkpoints (current, previous, the one being written) and the synthetic set beside them.
        need = 4 * _tensor_bytes(distiller.state_dict())
        check_output_folder(out, resume=resume, overwrite=overwrite, need_bytes=need)
    distributed.check_same(json.dumps(config.to_dict(), sort_keys=True), "settings")
    if overwrite and main:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    if (overwrite or resume) and main:  # half-written files of a killed process
        remove_stale_temporaries(out, RUN_FILES)
    start = 0
    if resume:
        state = load_checkpoint(out)
        differences = settings_differences(json.loads(state["config"]), config.to_dict())
        if differences:
            raise FastddError(
                f"the checkpoint in {out} was made with other settings ({'; '.join(differences)}); rerun with the "
                "same options (only --iterations may change) or choose another --out."
            )
        start = int(state["iteration"])
        if start > config.iterations:
            raise FastddError(f"--iterations {config.iterations} is below the {start} iterations the checkpoint in "
                              f"{out} already holds; give --iterations {start} or more.")
        distiller.load_state_dict(state["distiller"])
    # Every rank has read the folder (and the checkpoint) before rank 0 writes into it.
    distributed.barrier()
    out.mkdir(parents=True, exist_ok=True)
    return start


class _Checkpoints:
    """Writes the checkpoint and the synthetic set of an iteration (rank 0), after checking the ranks agree and the
    images are finite; remembers the last iteration saved for the messages of a failed write."""

    def __init__(self, distiller: Distiller, out: Path, sinks: Sinks, *, last_saved: int) -> None:
        self.distiller, self.out, self.sinks, self.last_saved = distiller, out, sinks, last_saved
        self.current = last_saved  # the iteration being run (for the message of an interrupt)
        self.saved_at = self.started = time.monotonic()
        self.first = True

    def due(self, minutes: float) -> bool:
        """Whether a checkpoint is due by time: ``minutes`` since the last one, or a first iteration of a minute."""
        now = time.monotonic()
        first, self.first = self.first, False
        return now - self.saved_at >= 60 * minutes or (first and now - self.started >= _SLOW_FIRST_ITERATION)

    def write(self, iteration: int) -> SyntheticSet | None:
        distiller, out = self.distiller, self.out
        # The ranks must hold the same synthetic set (they apply the same summed gradients): a cheap guard.
        if distributed.world_size() > 1:
            distributed.check_same(distributed.tensor_digest(distiller.synthetic_tensors()), "synthetic images")
        if not distributed.is_main():
            return None
        if not all(bool(torch.isfinite(t).all()) for t in distiller.synthetic_tensors()):
            raise FastddError(
                f"the synthetic images became non-finite by iteration {iteration}; nothing of it was written and the "
                f"last checkpoint in {out} was kept (try a smaller --lr-img)."
            )
        self.sinks.flush()  # what the checkpoint covers is on disk before it
        state = {
            "iteration": iteration,
            "method": distiller.name,
            "config": json.dumps(distiller.config.to_dict(), sort_keys=True),
            "distiller": distiller.state_dict(),
        }
        try:
            save_checkpoint(out, state)
            synset = save_synthetic_set(distiller, out)
        except OSError as exc:
            raise _write_failed(out, f"the checkpoint of iteration {iteration}", exc, self.last_saved) from None
        self.last_saved, self.saved_at = iteration, time.monotonic()
        return synset


@contextlib.contextmanager
def _interruptible(out: Path, checkpoints: "_Checkpoints") -> Iterator[None]:
    """Turn Ctrl-C into one sentence saying which iteration was kept and how to continue."""
    try:
        yield
    except KeyboardInterrupt:
        if checkpoints.last_saved > 0:
            kept = (f"the checkpoint of iteration {checkpoints.last_saved} and the synthetic set beside it are kept: "
                    f"continue with `fastdd distill --out {out} --resume`")
        else:
            kept = "no checkpoint had been written yet: start again with --overwrite"
        raise Interrupted(f"interrupted during iteration {checkpoints.current}; {kept}.") from None


def _log_images(distiller: Distiller, sinks: Sinks, step: int) -> None:
    to_unit, ipc = distiller.dataset.to_unit_range, distiller.config.ipc
    sinks.log_images("synset", to_unit(distiller.images.detach()), step, nrow=ipc)
    for name, images in distiller.plugins.image_logs().items():
        sinks.log_images(name, to_unit(images), step, nrow=ipc)


def _write_failed(out: Path, what: str, exc: OSError, last_saved: int) -> FastddError:
    """One sentence for a write that failed mid-run (full disk, folder gone read-only, ...)."""
    reason = (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")
    if last_saved > 0:
        then = (f"the checkpoint of iteration {last_saved} and the synthetic set beside it are intact: free some space "
                "or fix the folder, then continue with --resume")
    else:
        then = "no checkpoint had been written yet: free some space or fix the folder, then start again with --overwrite"
    return FastddError(f"could not write {what} into {out} ({reason}); {then}.")


def _tensor_bytes(obj) -> int:
    """Bytes of all tensors in a nested state (dicts, lists, tuples)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def settings_differences(saved: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's settings and this run's, beside ``iterations``, one phrase per setting:
    ``--lr-img was 0.1, now 0.2`` (a setting only one side has is shown as absent there)."""
    current = json.loads(json.dumps(current))  # the JSON form the checkpoint stores
    absent = object()
    phrases = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, absent), current.get(key, absent)
        if key != "iterations" and old != new:
            show = lambda v: "absent" if v is absent else json.dumps(v)  # noqa: E731
            phrases.append(f"--{key.replace('_', '-')} was {show(old)}, now {show(new)}")
    return phrases
