"""The OOD test sets of an evaluation: what a user may name, and how each becomes model-space images.

A set is one of

* ``gaussian``: per-pixel ``clamp(N(0.5, 0.25^2), 0, 1)``. This is the noise law of the outlier-exposure evaluation
  that TrustDD reuses (``clip(N(0, 0.5^2), -1, 1)`` on pixels scaled to [-1, 1]) expressed in [0, 1] pixels;
* ``uniform``: per-pixel ``U[0, 1]`` (the same evaluation's ``U[-1, 1]`` in [0, 1] pixels);
* a registered dataset name (its test split, converted to the ID channels and size);
* a folder of images (converted the same way);
* ``holdout:K``: the ID test images of classes ``>= K``, the evaluation networks being trained on classes ``< K``.

Noise is drawn in [0, 1] pixel space and, like the foreign images, mapped into the ID model space with the ID
statistics (normalisation or ZCA), so every OOD image goes through the same input transform as the ID test images.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdd.data import DATASETS, ImageDataset
from fastdd.errors import FastddError

GAUSSIAN_MEAN = 0.5
GAUSSIAN_STD = 0.25
NOISE_SETS = ("gaussian", "uniform")
HOLDOUT_PREFIX = "holdout:"


@dataclass(frozen=True)
class OodSetSpec:
    """One parsed OOD set.

    Attributes:
        name: the name used in tables and JSON (the text the user gave, dataset names normalised).
        kind: ``"gaussian"``, ``"uniform"``, ``"dataset"``, ``"folder"`` or ``"holdout"``.
        source: the dataset name or folder path (``"dataset"``/``"folder"``), else None.
        holdout_classes: ``K`` of ``holdout:K``, else None.
    """

    name: str
    kind: str
    source: str | None = None
    holdout_classes: int | None = None


def parse_ood_sets(text: str | list[str], *, num_classes: int | None = None) -> list[OodSetSpec]:
    """Parse ``"gaussian,uniform,svhn,/path/to/images,holdout:5"`` (or a list of such strings) into specs.

    Args:
        text: comma-separated set names, or a list of them (each may hold commas too).
        num_classes: the ID number of classes; when given, ``holdout:K`` must satisfy ``1 <= K < num_classes``.
    Returns:
        The specs in the order given. Raises ``FastddError`` for an unknown name, a missing folder, a repeated set,
        a malformed or out-of-range ``holdout:K``, or more than one holdout.
    """
    items = [text] if isinstance(text, str) else list(text)
    names = [part.strip() for item in items for part in item.split(",") if part.strip()]
    specs = [_parse_one(name, num_classes) for name in names]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise FastddError(f"the OOD set {spec.name!r} is listed twice; name each set once.")
        seen.add(spec.name)
    if sum(spec.kind == "holdout" for spec in specs) > 1:
        raise FastddError("only one holdout:K OOD set is allowed, since it decides which classes the networks learn.")
    return specs


def holdout_spec(specs: list[OodSetSpec]) -> OodSetSpec | None:
    """The ``holdout:K`` spec among ``specs``, or None."""
    return next((spec for spec in specs if spec.kind == "holdout"), None)


def _parse_one(name: str, num_classes: int | None) -> OodSetSpec:
    lowered = name.lower()
    if lowered in NOISE_SETS:
        return OodSetSpec(lowered, lowered)
    if lowered.startswith(HOLDOUT_PREFIX):
        value = name[len(HOLDOUT_PREFIX):].strip()
        if not value.isdigit():
            raise FastddError(f"{name!r} is not a valid holdout set; write holdout:K with an integer K >= 1.")
        k = int(value)
        upper = f" and below the {num_classes} classes of the dataset" if num_classes is not None else ""
        if k < 1 or (num_classes is not None and k >= num_classes):
            raise FastddError(f"holdout:{k} is out of range; K must be at least 1{upper}.")
        return OodSetSpec(f"holdout:{k}", "holdout", holdout_classes=k)
    dataset_name = lowered.replace("_", "-")
    if dataset_name in DATASETS and os.sep not in name:
        return OodSetSpec(dataset_name, "dataset", source=dataset_name)
    if os.sep in name or Path(name).exists():
        if not Path(name).is_dir():
            raise FastddError(f"the OOD image folder {name} does not exist or is not a folder.")
        return OodSetSpec(name, "folder", source=name)
    raise FastddError(
        f"unknown OOD set {name!r}; use gaussian, uniform, holdout:K, a dataset ({', '.join(DATASETS)}) "
        "or a folder of images."
    )


def build_ood_images(
    spec: OodSetSpec,
    dataset: ImageDataset,
    *,
    count: int,
    generator: torch.Generator,
    data_root: str | None = None,
) -> torch.Tensor:
    """The images of one OOD set in ``dataset``'s model space, at most ``count`` of them.

    Args:
        spec: a parsed set.
        dataset: the ID dataset: its channels, image size and input transform (and, for ``holdout``, its test split).
        count: how many images at most (noise sets produce exactly ``count``; the others subsample to it when larger).
        generator: the only source of randomness (noise and subsampling).
        data_root: folder of a registered dataset's files (defaults to the dataset's own default).
    Returns:
        ``[n, C, H, W]`` float32 in model space on the CPU, ``n <= count`` (``n = count`` for the noise sets).
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    shape = (count, dataset.channels, *dataset.image_size)
    if spec.kind == "gaussian":
        unit = (GAUSSIAN_MEAN + GAUSSIAN_STD * torch.randn(shape, generator=generator)).clamp_(0, 1)
        return dataset.to_model_space(unit)
    if spec.kind == "uniform":
        return dataset.to_model_space(torch.rand(shape, generator=generator))
    if spec.kind == "holdout":
        k = spec.holdout_classes
        if not 1 <= k < dataset.num_classes:
            raise FastddError(f"holdout:{k} is out of range; K must be at least 1 and below {dataset.num_classes}.")
        images = dataset.test_images[dataset.test_labels >= k]
        return _subsample(images, count, generator)
    from fastdd.data.foreign import image_files, load_foreign_images

    # The loader refuses a count above what the source holds: a folder is counted first (so only the chosen files
    # are decoded); a dataset's split is loaded whole anyway and subsampled here.
    wanted = (min(count, len(image_files(Path(spec.source)))) or None) if spec.kind == "folder" else None
    unit = load_foreign_images(
        spec.source, like=dataset, split="test", count=wanted, generator=generator, data_root=data_root
    )
    return dataset.to_model_space(_subsample(unit, count, generator).to(torch.float32))


@dataclass
class OodTestSet:
    """One OOD set of an evaluation, with the ID test images it is compared with.

    Attributes:
        images: ``[n, C, H, W]`` the OOD images in model space.
        in_index: ``[n]`` indices of the ID test images of the comparison (the same number on both sides).
    """

    images: torch.Tensor
    in_index: torch.Tensor


def build_ood_test_set(
    spec: OodSetSpec,
    dataset: ImageDataset,
    *,
    num_in: int,
    seed: int,
    ood_size: int | None = None,
    data_root: str | None = None,
) -> OodTestSet:
    """The OOD set ``spec`` of an evaluation with ``num_in`` ID test images: at most ``min(num_in, ood_size)``
    images (`build_ood_images`), then a random ID subsample of the same size.

    Both come from one generator seeded by ``(seed, spec.name)``, so a set does not depend on the other sets, their
    order, or any other randomness of the evaluation.
    """
    generator = torch.Generator()
    generator.manual_seed(zlib.crc32(f"{seed}/ood/{spec.name}".encode()))
    cap = num_in if ood_size is None else min(num_in, ood_size)
    images = build_ood_images(spec, dataset, count=cap, generator=generator, data_root=data_root)
    in_index = torch.randperm(num_in, generator=generator)[: images.shape[0]]
    return OodTestSet(images, in_index)


def _subsample(images: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``images`` itself when it has at most ``count`` rows, else ``count`` distinct random rows."""
    if images.shape[0] <= count:
        return images
    return images[torch.randperm(images.shape[0], generator=generator)[:count]]
