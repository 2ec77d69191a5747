"""A synthetic set drawn for people: PNG grids, one named row per class (files for other tools: `fastdd.interop`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from fastdd.errors import FastddError
from fastdd.io import SyntheticSet, save_image_grid, synset_unit_images



def save_synset_grids(synset: SyntheticSet, target: str | Path, *, scale: int | None = None,
                      classes: Sequence[str] | None = None) -> list[Path]:
    """The images as a PNG grid at ``target``, one row per class named on its left (in [0, 1] space, upscaled
    ``scale`` times, default readable), only the rows of ``classes`` (names or indices) when given; and the outlier
    images of a TrustDD set as ``NAME_outliers.png`` beside it. Returns the paths written.

    Raises:
        FastddError: a class that the set does not have.
    """
    target = Path(target)
    images, labels = synset_unit_images(synset), synset.labels
    names = list(synset.meta.get("class_names") or [str(c) for c in range(int(labels.max()) + 1)])
    chosen = _class_indices(classes, names) if classes else list(range(len(names)))
    keep = torch.isin(labels, torch.tensor(chosen))
    ipc = synset.meta.get("ipc")
    save_image_grid(images[keep], target, nrow=ipc, row_names=[names[c] for c in chosen] if ipc else None,
                    scale=scale)
    paths = [target]
    if synset.outlier_images is not None:
        paths.append(target.with_name(f"{target.stem}_outliers{target.suffix}"))
        save_image_grid(synset_unit_images(synset, outliers=True), paths[1], nrow=ipc, scale=scale)
    return paths


def _class_indices(classes: Sequence[str], names: list[str]) -> list[int]:
    indices = []
    for item in classes:
        item = str(item).strip()
        if item in names:
            indices.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            indices.append(int(item))
        else:
            raise FastddError(f"--classes: the set has no class {item!r}; its classes are {', '.join(names)} "
                              f"(or indices 0 to {len(names) - 1}).")
    return sorted(set(indices))
