"""Synthetic-set and checkpoint files.

A synthetic set is a folder with ``synset.safetensors`` (tensors) and ``synset.json`` (what produced it), plus a
``synset.png`` grid for a quick look. Nothing here unpickles arbitrary objects: tensors go through safetensors and
checkpoints are read with ``torch.load(weights_only=True)``. Every file is written to a temporary name in the same
folder and renamed into place, so an interrupted write never destroys the previous version.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from fastdd.errors import FastddError

SYNSET_TENSORS = "synset.safetensors"
SYNSET_META = "synset.json"
SYNSET_GRID = "synset.png"
SYNSET_OUTLIER_GRID = "synset_outliers.png"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"

_OPTIONAL_TENSORS = ("soft_labels", "outlier_images", "syn_lr")
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


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
        write_json(folder / SYNSET_META, self.meta)
        if grid is not None:
            save_image_grid(grid, folder / SYNSET_GRID, nrow=self.meta.get("ipc") or None)
        if outlier_grid is not None:
            save_image_grid(outlier_grid, folder / SYNSET_OUTLIER_GRID, nrow=self.meta.get("ipc") or None)

    @classmethod
    def load(cls, folder: str | Path) -> "SyntheticSet":
        """Read a folder written by :meth:`save`. A missing or foreign folder raises ``FastddError``."""
        folder = Path(folder)
        tensors_path, meta_path = folder / SYNSET_TENSORS, folder / SYNSET_META
        if not tensors_path.is_file() or not meta_path.is_file():
            raise FastddError(
                f"{folder} is not a synthetic set: expected {SYNSET_TENSORS} and {SYNSET_META} in it "
                "(written by `fastdd distill --out`)."
            )
        try:
            tensors = load_file(str(tensors_path))
            meta = json.loads(meta_path.read_text())
        except Exception as exc:  # corrupt or foreign files: one sentence for the user
            raise FastddError(f"could not read the synthetic set in {folder}: {exc}.") from exc
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


def image_grid_array(images: torch.Tensor, *, nrow: int | None = None) -> "numpy.ndarray":
    """``images`` ([K, C, H, W], values in [0, 1]) as one grid, ``nrow`` images per row, images under 32 pixels
    upscaled so the grid is readable.

    Returns:
        A uint8 array, ``[H', W']`` for one channel, else ``[H', W', C]``.
    """
    from torchvision.utils import make_grid

    images = images.detach().to("cpu", torch.float32).clamp(0, 1)
    small = max(images.shape[-2:]) < 32
    if small:  # upscale tiny images so the grid is readable
        factor = max(1, 32 // max(images.shape[-2:]))
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    grid = make_grid(images, nrow=nrow or 10, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    return array


def save_image_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None) -> None:
    """Save ``images`` ([K, C, H, W], values in [0, 1]) as one PNG grid, ``nrow`` images per row."""
    from PIL import Image

    array = image_grid_array(images, nrow=nrow)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a training state (tensors, numbers, strings, nested dicts/lists) to ``checkpoint.pt``."""
    atomic_write(Path(folder) / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Read ``checkpoint.pt`` safely (``weights_only=True``); a missing file raises ``FastddError``."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise FastddError(f"there is no checkpoint to resume in {path.parent} (expected {CHECKPOINT}).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FastddError(f"the checkpoint {path} could not be read ({exc}); it may be corrupt.") from exc


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; on resume, drops lines past the checkpoint."""

    def __init__(self, folder: str | Path, *, resume_from: int | None = None) -> None:
        self.path = Path(folder) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= resume_from
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

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
