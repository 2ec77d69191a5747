"""Synthetic-set and checkpoint files, and the checks that an output folder can take them.

A synthetic set is a folder with ``synset.safetensors`` (tensors) and ``synset.json`` (what produced it, with its
``"format"``), plus a ``synset.png`` grid for a quick look. Nothing here unpickles arbitrary objects: tensors go
through safetensors and checkpoints are read with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain values. Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted write never destroys the previous version.

A checkpoint is ``checkpoint.pt`` (the training state, with ``"format": "fastdd-checkpoint/1"``) plus
``checkpoint.json`` (format, iteration, byte count and SHA-256 of ``checkpoint.pt``), written after it. Before a new
checkpoint replaces a valid one, the valid pair is kept as ``checkpoint.prev.pt`` / ``checkpoint.prev.json`` (hard
links, else copies, each renamed into place). So at every moment of a write at least one complete pair exists (once
the first checkpoint is complete), and :func:`load_checkpoint` uses the newest pair whose checksum matches.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from fastdd.errors import FastddError, FastddWarning, UnsafeFileError
from fastdd.image_grids import image_grid_array, labelled_grid_image

SYNSET_TENSORS = "synset.safetensors"
SYNSET_META = "synset.json"
SYNSET_GRID = "synset.png"
SYNSET_OUTLIER_GRID = "synset_outliers.png"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_SUM = "checkpoint.json"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
PREVIOUS_CHECKPOINT_SUM = "checkpoint.prev.json"
CHECKPOINT_FILES = (CHECKPOINT, CHECKPOINT_SUM, PREVIOUS_CHECKPOINT, PREVIOUS_CHECKPOINT_SUM)
METRICS = "metrics.jsonl"

SYNSET_FORMAT = "fastdd-synset/1"
CHECKPOINT_FORMAT = "fastdd-checkpoint/1"

# Pre-flight: refuse to start work in a folder whose disk has less free space than this (bytes). Tests lower or
# raise it; callers may ask for more (e.g. the size of three checkpoints).
MIN_FREE_BYTES = 64 * 2**20

_OPTIONAL_TENSORS = ("soft_labels", "outlier_images", "syn_lr")
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None], *, durable: bool = False) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` (same folder, so the rename is atomic).

    With ``durable`` the file's data is flushed to the disk (fsync) before the rename, so that after a power cut the
    name never points at data that was not written (flush the folder too, with ``fsync_path(path.parent)``, to make
    the rename itself durable). On any error the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 (and some writers replace the file): give it the permissions open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...]) -> None:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` for these file names when a process was
    killed mid-write (``.NAME.XXXX.tmp``). Only call this where no other process writes into ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def fsync_path(path: str | Path) -> None:
    """Flush a file's or folder's data to the disk (best effort: does nothing where that is not possible)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders cannot be opened on some systems: nothing to flush there
        return
    try:
        with contextlib.suppress(OSError):  # best effort: some filesystems cannot fsync a folder
            os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any, *, durable: bool = False) -> None:
    """Atomically write ``obj`` as indented JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write, durable=durable)


def check_format(found: Any, expected: str, where: str | Path, what: str) -> None:
    """Raise FastddError unless the format string ``found`` (``"name/version"``) is ``expected``.

    A newer version of the same format asks the user to upgrade fastdd; anything else is named as foreign.
    """
    if found == expected:
        return
    name, _, version = expected.rpartition("/")
    if isinstance(found, str) and found.startswith(name + "/"):
        theirs = found[len(name) + 1 :]
        if theirs.isdigit() and int(theirs) > int(version):
            import fastdd

            raise FastddError(
                f"{where} was written by a newer fastdd (format {found!r}; fastdd {fastdd.__version__} reads "
                f"{expected!r}); upgrade fastdd to read it."
            )
    raise FastddError(
        f"{where} is not {what} this fastdd can read (format {found!r}, expected {expected!r})."
    )


def safe_torch_load(source: str | Path | bytes, where: str | Path) -> Any:
    """``torch.load(source, weights_only=True)`` on the CPU: tensors and plain containers only, never code.

    Args:
        source: a path, or the file's bytes.
        where: the file's name for messages.

    Raises:
        UnsafeFileError: the file holds other pickled objects (it is refused, nothing of it runs).
        Exception: whatever ``torch.load`` raises for a damaged file (the caller words it).
    """
    try:
        return torch.load(
            BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu", weights_only=True
        )
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only" not in text.lower() or "global" not in text.lower():
            raise  # not a refused object (e.g. "Unsupported operand": a damaged or foreign file); the caller words it
        found = re.search(r"GLOBAL\s+([\w.]+)", text)
        named = f" ({found.group(1)})" if found else ""
        raise UnsafeFileError(
            f"{where} holds pickled Python objects other than tensors and plain values{named}, and fastdd refuses to "
            "unpickle them because that could run arbitrary code; use a file of tensors written by fastdd or torch."
        ) from None


def check_writable_folder(folder: str | Path, *, need_bytes: int = 0) -> None:
    """Pre-flight check before long work writes into ``folder``: it can be created, a file can be written into it
    and deleted, and its disk has at least ``max(MIN_FREE_BYTES, need_bytes)`` bytes free.

    Folders created for the check are removed again, so a failure later (or here) leaves the disk as it was.

    Raises:
        FastddError: one sentence naming the folder and the reason.
    """
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    created: list[Path] = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise FastddError(
                    f"cannot create the output folder {folder} ({_reason(exc)}); choose another output folder "
                    "(--out) or fix the permissions of its parent."
                ) from None
            created.append(path)
        try:
            fd, name = tempfile.mkstemp(prefix=".fastdd-probe-", dir=folder)
            try:
                os.write(fd, b"fastdd write probe\n")
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError as exc:
            raise FastddError(
                f"cannot write into the output folder {folder} ({_reason(exc)}); choose another output folder "
                "(--out) or fix its permissions."
            ) from None
        free = shutil.disk_usage(folder).free
    finally:
        for path in reversed(created):
            with contextlib.suppress(OSError):  # a folder someone else filled meanwhile stays
                path.rmdir()
    need = max(int(MIN_FREE_BYTES), int(need_bytes))
    if free < need:
        raise FastddError(
            f"only {_megabytes(free)} are free on the disk holding {folder} but this needs at least "
            f"{_megabytes(need)}; free some space or choose another output folder (--out)."
        )


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class SyntheticSet:
    """A distilled dataset.

    Attributes:
        images: ``[K, C, H, W]`` float32 in the dataset's model space (normalised or ZCA-whitened).
        labels: ``[K]`` int64 class labels (class-major order: ``ipc`` images of class 0, then class 1, ...).
        meta: JSON-serialisable description (method, dataset, ipc, image shape, normalisation, zca, seed, version,
            hyperparameters).
        soft_labels: optional ``[K, num_classes]`` float32 targets.
        outlier_images: optional ``[K_out, C, H, W]`` unlabelled outlier images (TrustDD).
        syn_lr: optional learned student learning rate (0-d tensor), used by evaluation when present.
        zca: optional ZCA tensors (``{"zca_mean", "zca_transform", "zca_inverse"}``) to view whitened images.
    """

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    soft_labels: torch.Tensor | None = None
    outlier_images: torch.Tensor | None = None
    syn_lr: torch.Tensor | None = None
    zca: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images must be [K, C, H, W], got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be [K] with K = {self.images.shape[0]}, got shape {tuple(self.labels.shape)}"
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors to store, detached, contiguous and on the CPU."""
        out = {"images": self.images, "labels": self.labels}
        for name in _OPTIONAL_TENSORS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.reshape(()) if name == "syn_lr" else value
        if self.zca is not None:
            out.update(self.zca)
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def save(
        self, folder: str | Path, *, grid: torch.Tensor | None = None, outlier_grid: torch.Tensor | None = None
    ) -> None:
        """Write ``synset.safetensors`` and ``synset.json``, plus ``synset.png`` from ``grid`` ([K, C, H, W] in [0,1])
        and ``synset_outliers.png`` from ``outlier_grid`` ([K_out, C, H, W] in [0,1]) when given."""
        folder = Path(folder)
        tensors = self.tensors()
        atomic_write(folder / SYNSET_TENSORS, lambda tmp: save_file(tensors, tmp))
        write_json(folder / SYNSET_META, {"format": SYNSET_FORMAT, **self.meta})
        if grid is not None:
            save_image_grid(grid, folder / SYNSET_GRID, nrow=self.meta.get("ipc") or None,
                            row_names=self.meta.get("class_names") if self.meta.get("ipc") else None)
        if outlier_grid is not None:
            save_image_grid(outlier_grid, folder / SYNSET_OUTLIER_GRID, nrow=self.meta.get("ipc") or None)

    @classmethod
    def load(cls, folder: str | Path) -> "SyntheticSet":
        """Read a folder written by :meth:`save` (safetensors and JSON: nothing is unpickled).

        A missing, damaged or foreign folder, or one written in a newer format, raises ``FastddError``."""
        folder = Path(folder)
        tensors_path, meta_path = folder / SYNSET_TENSORS, folder / SYNSET_META
        if not tensors_path.is_file() or not meta_path.is_file():
            raise FastddError(
                f"{folder} is not a synthetic set: expected {SYNSET_TENSORS} and {SYNSET_META} in it "
                "(written by `fastdd distill --out`)."
            )
        # Corrupt or foreign files: one sentence that names the file.
        try:
            tensors = load_file(str(tensors_path))
        except Exception as exc:
            raise FastddError(f"could not read the synthetic set in {folder}: {tensors_path} is damaged or not a "
                              f"safetensors file ({exc}).") from exc
        try:
            meta = json.loads(meta_path.read_text())
        except Exception as exc:
            raise FastddError(f"could not read the synthetic set in {folder}: {meta_path} is damaged or not JSON "
                              f"({exc}).") from exc
        if not isinstance(meta, dict):
            raise FastddError(f"{meta_path} is not a synthetic-set description (a JSON object was expected).")
        if "format" in meta:  # sets written before formats were recorded have none
            check_format(meta["format"], SYNSET_FORMAT, meta_path, "a synthetic set")
        if "images" not in tensors or "labels" not in tensors:
            raise FastddError(f"{tensors_path} holds no images or labels; it was not written by fastdd.")
        zca_keys = ("zca_mean", "zca_transform", "zca_inverse")
        zca = {k: tensors[k] for k in zca_keys if k in tensors} or None
        return cls(
            images=tensors["images"],
            labels=tensors["labels"],
            meta=meta,
            soft_labels=tensors.get("soft_labels"),
            outlier_images=tensors.get("outlier_images"),
            syn_lr=tensors.get("syn_lr"),
            zca=zca,
        )


def save_image_grid(
    images: torch.Tensor, path: str | Path, *, nrow: int | None = None, row_names: Sequence[str] | None = None,
    scale: int | None = None,
) -> None:
    """Save ``images`` (``[K, C, H, W]``, values in [0, 1]) as one PNG grid, ``nrow`` images per row, upscaled
    ``scale`` times (default: readable, see :mod:`fastdd.image_grids`), with ``row_names`` left of the rows."""
    from PIL import Image

    if row_names:
        image = labelled_grid_image(images, row_names, per_row=nrow or 10, scale=scale)
    else:
        image = Image.fromarray(image_grid_array(images, nrow=nrow, scale=scale))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> None:
    """Write a training state (tensors, numbers, strings, nested dicts/lists) as ``checkpoint.pt`` + ``checkpoint.json``.

    The state gets ``"format": CHECKPOINT_FORMAT``. A valid current pair is first kept as the previous one; then the
    payload and its checksum file are each written atomically (and flushed to disk), in that order. A failure (e.g.
    ``OSError`` for a full disk) raises with the previous valid pair intact.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {**state, "format": CHECKPOINT_FORMAT}
    buffer = BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    import fastdd

    record = {
        "format": CHECKPOINT_FORMAT,
        "file": CHECKPOINT,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "iteration": state.get("iteration"),
        "fastdd_version": fastdd.__version__,
    }
    current, current_sum = folder / CHECKPOINT, folder / CHECKPOINT_SUM
    if _verify_checkpoint(current, current_sum)[0] is None:
        _keep_copy(current, folder / PREVIOUS_CHECKPOINT)
        _keep_copy(current_sum, folder / PREVIOUS_CHECKPOINT_SUM, rename={CHECKPOINT: PREVIOUS_CHECKPOINT})
    atomic_write(current, lambda tmp: Path(tmp).write_bytes(payload), durable=True)
    write_json(current_sum, record, durable=True)
    fsync_path(folder)


def _keep_copy(source: Path, target: Path, *, rename: dict[str, str] | None = None) -> None:
    """Atomically make ``target`` a copy of ``source`` (a hard link when the file system allows it)."""
    if rename:  # the checksum file names its payload: point the copy at the previous one
        record = json.loads(source.read_text())
        record["file"] = rename.get(record.get("file"), record.get("file"))
        write_json(target, record)
        return

    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(source, tmp)  # the same data, already on disk
        except OSError:
            shutil.copyfile(source, tmp)
            fsync_path(tmp)

    atomic_write(target, write)


def _verify_checkpoint(payload_path: Path, sum_path: Path) -> tuple[str | None, bytes | None]:
    """``(None, bytes)`` when the payload matches its checksum file, else ``(reason, None)``.

    A checksum file in a newer format raises FastddError (an older fastdd must not guess at it).
    """
    if not payload_path.is_file():
        return f"{payload_path.name} is missing", None
    if not sum_path.is_file():
        return f"its checksum file {sum_path.name} is missing", None
    try:
        record = json.loads(sum_path.read_text())
        expected_size, expected_sum = int(record["bytes"]), str(record["sha256"])
        found_format = record["format"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its checksum file {sum_path.name} is unreadable ({type(exc).__name__})", None
    check_format(found_format, CHECKPOINT_FORMAT, sum_path, "a checkpoint checksum file")
    data = payload_path.read_bytes()
    if len(data) != expected_size:
        return f"it has {len(data)} bytes where {expected_size} were written (truncated or replaced)", None
    if hashlib.sha256(data).hexdigest() != expected_sum:
        return "its SHA-256 does not match the one recorded when it was written (the file is damaged)", None
    return None, data


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Read the newest valid checkpoint in ``folder`` safely (``weights_only=True``).

    ``checkpoint.pt`` is used when it matches ``checkpoint.json`` (size and SHA-256); otherwise ``checkpoint.prev.pt``
    (with a one-line ``FastddWarning`` naming what was wrong with the latest). A lone ``checkpoint.pt`` without
    ``"format"`` (written before checkpoints carried checksums) is accepted, with a warning, when nothing else is.

    Raises:
        FastddError: no checkpoint, none valid (naming why for each), or one in a newer format.
        UnsafeFileError: a checkpoint holds pickled objects other than tensors and plain values.
    """
    folder = Path(folder)
    pairs = ((CHECKPOINT, CHECKPOINT_SUM), (PREVIOUS_CHECKPOINT, PREVIOUS_CHECKPOINT_SUM))
    if not any((folder / name).exists() for name in CHECKPOINT_FILES):
        raise FastddError(f"there is no checkpoint to resume in {folder} (expected {CHECKPOINT}).")
    problems: list[str] = []
    for payload_name, sum_name in pairs:
        payload_path = folder / payload_name
        if payload_name == PREVIOUS_CHECKPOINT and not payload_path.exists():
            continue
        problem, data = _verify_checkpoint(payload_path, folder / sum_name)
        state = None
        if problem is None:
            try:
                state = safe_torch_load(data, payload_path)
            except UnsafeFileError:
                raise
            except Exception as exc:  # matches its checksum yet unreadable: written wrongly, treat as damaged
                problem = f"it cannot be read ({_first_line(exc)})"
        if state is not None:
            if not isinstance(state, dict):
                problem = "it holds no training state"
            else:
                check_format(state.get("format"), CHECKPOINT_FORMAT, payload_path, "a fastdd checkpoint")
        if problem is None:
            if problems:
                warnings.warn(
                    f"the latest checkpoint {folder / CHECKPOINT} is unusable ({problems[0]}), so the run continues "
                    f"from the previous one, {payload_name} (iteration {state.get('iteration')}).",
                    FastddWarning,
                    stacklevel=2,
                )
            return state
        problems.append(f"{payload_name}: {problem}")
    legacy = _legacy_checkpoint(folder)
    if legacy is not None:
        return legacy
    raise FastddError(
        f"no usable checkpoint in {folder} ({'; '.join(problems)}); start the run again with --overwrite or choose "
        "another --out."
    )


def _legacy_checkpoint(folder: Path) -> dict[str, Any] | None:
    """A ``checkpoint.pt`` written before checkpoints carried a format and checksum, if that is all there is."""
    path = folder / CHECKPOINT
    if not path.is_file() or (folder / CHECKPOINT_SUM).exists() or (folder / PREVIOUS_CHECKPOINT).exists():
        return None
    try:
        state = safe_torch_load(path, path)
    except UnsafeFileError:
        raise
    except Exception:
        return None
    if not isinstance(state, dict) or "format" in state or "iteration" not in state:
        return None
    warnings.warn(
        f"{path} was written before checkpoints carried checksums, so it cannot be verified; continuing from it "
        f"(iteration {state['iteration']}).",
        FastddWarning,
        stacklevel=3,
    )
    return state


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(".")


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``.

    On resume (``resume_from`` = the iteration of the checkpoint actually loaded) it keeps exactly the records of
    iterations up to it, and drops the rest and a last line cut short by a killed process; the file is rewritten
    atomically.
    """

    def __init__(self, folder: str | Path, *, resume_from: int | None = None) -> None:
        self.path = Path(folder) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(""))
        elif self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if isinstance(record, dict) and record.get("iteration", 0) <= resume_from:
                    kept.append(line)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def synset_unit_images(synset: SyntheticSet, *, outliers: bool = False) -> torch.Tensor:
    """The synthetic images (or, with ``outliers``, the outlier images) mapped back to [0, 1] for viewing (inverse
    ZCA, or de-normalised with the stored mean/std).

    Returns:
        ``[K, C, H, W]`` (or ``[K_out, C, H, W]``) float32 in [0, 1].
    """
    images = (synset.outlier_images if outliers else synset.images).to(torch.float32)
    if synset.zca is not None:
        from fastdd.data.zca import ZCA

        return ZCA.from_tensors(**synset.zca).inverse(images).clamp(0, 1)
    mean = torch.tensor(synset.meta.get("mean", [0.0] * images.shape[1])).view(1, -1, 1, 1)
    std = torch.tensor(synset.meta.get("std", [1.0] * images.shape[1])).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)
