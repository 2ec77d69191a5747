"""A synthetic set written for people and other tools: PNG grids, and the ``*_best.pt`` files of the MTT family."""

from __future__ import annotations

from pathlib import Path

import torch

from fastdd.io import SyntheticSet, atomic_write, save_image_grid, synset_unit_images

BEST_FILES = ("images_best.pt", "labels_best.pt", "lr_best.pt")
# The lr written when the set learned none (the MTT code's default student lr).
DEFAULT_EXPORT_LR = 0.01


def save_synset_grids(synset: SyntheticSet, target: str | Path) -> list[Path]:
    """The images as a PNG grid at ``target`` (one row per class, in [0, 1] space), and the outlier images of a
    TrustDD set as ``NAME_outliers.png`` beside it; returns the paths written."""
    target = Path(target)
    save_image_grid(synset_unit_images(synset), target, nrow=synset.meta.get("ipc"))
    paths = [target]
    if synset.outlier_images is not None:
        paths.append(target.with_name(f"{target.stem}_outliers{target.suffix}"))
        save_image_grid(synset_unit_images(synset, outliers=True), paths[1], nrow=synset.meta.get("ipc"))
    return paths


def export_best_files(synset: SyntheticSet, folder: str | Path) -> tuple[str, ...]:
    """Write ``images_best.pt`` ``[K, C, H, W]``, ``labels_best.pt`` (soft labels ``[K, classes]`` when the set has
    them, else ``[K]`` int64) and ``lr_best.pt`` (a scalar) into ``folder``, atomically; returns the file names."""
    folder = Path(folder)
    lr = synset.syn_lr if synset.syn_lr is not None else torch.tensor(DEFAULT_EXPORT_LR)
    labels = synset.soft_labels if synset.soft_labels is not None else synset.labels
    for name, tensor in zip(BEST_FILES, (synset.images, labels, lr)):
        atomic_write(folder / name, lambda tmp, t=tensor: torch.save(t.clone(), tmp))
    return BEST_FILES
