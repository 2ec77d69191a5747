"""The registered datasets and :func:`load_dataset`, which turns a loader's pixels into an :class:`ImageDataset`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdd.data.dataset import ImageDataset
from fastdd.data.digits import load_digits
from fastdd.data.imagefolder import load_imagefolder
from fastdd.data.mnist import load_fashion_mnist, load_mnist
from fastdd.data.raw import RawSplits, channel_mean_std, unit_pixels
from fastdd.data.torchvision_sets import load_cifar10, load_cifar100, load_svhn
from fastdd.data.zca import ZCA
from fastdd.errors import FastddError

STRATEGY = "color_crop_cutout_flip_scale_rotate"
STRATEGY_NO_FLIP = "color_crop_cutout_scale_rotate"  # digits: a mirrored digit is another symbol


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset.

    Attributes:
        name: registry name.
        load: ``load(data_root, image_size) -> RawSplits``.
        mean: per-channel mean of the [0, 1] training pixels, or None to compute it from the training split.
        std: per-channel standard deviation, or None to compute it.
        dsa_strategy: default DSA strategy.
    """

    name: str
    load: Callable[[Path | None, int | None], RawSplits]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    dsa_strategy: str


_SPECS = (
    # digits: mean/std of the 1,438-image training split of fastdd's fixed split (values / 16).
    DatasetSpec("digits", load_digits, (0.3059,), (0.3765,), STRATEGY_NO_FLIP),
    DatasetSpec("fashion-mnist", load_fashion_mnist, (0.2860,), (0.3530,), STRATEGY),
    DatasetSpec("mnist", load_mnist, (0.1307,), (0.3081,), STRATEGY_NO_FLIP),
    DatasetSpec("cifar10", load_cifar10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), STRATEGY),
    DatasetSpec("cifar100", load_cifar100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), STRATEGY),
    DatasetSpec("svhn", load_svhn, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), STRATEGY_NO_FLIP),
    DatasetSpec("imagefolder", load_imagefolder, None, None, STRATEGY),
)
SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
DATASETS: tuple[str, ...] = tuple(SPECS)


def get_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset (case-insensitive; ``_`` may stand for ``-``)."""
    if not isinstance(name, str):
        raise TypeError(f"the dataset name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in SPECS:
        raise FastddError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return SPECS[key]


def load_dataset(
    name: str, *, data_root: str | Path | None = None, image_size: int | None = None, zca: bool = False
) -> ImageDataset:
    """Load a registered dataset with both splits in model space.

    Args:
        name: one of :data:`DATASETS`.
        data_root: folder holding the dataset files (see each loader; ``digits`` needs none, ``fashion-mnist`` falls
            back to ``/usr/share/datasets/fashion-mnist``, the other file-based datasets default to ``./data``).
        image_size: side of the square images; None keeps the native size (64 for ``imagefolder``). Other sizes are
            reached by antialiased bilinear resizing of the [0, 1] pixels (mean/std stay the registered ones).
        zca: ZCA-whiten with a :class:`ZCA` fitted on the [0, 1] training images instead of normalising.

    Returns:
        The dataset: ``train_images [N, C, H, W]`` and ``test_images [M, C, H, W]`` float32 in model space.

    Raises:
        FastddError: unknown name, missing or malformed files.
    """
    spec = get_spec(name)
    if image_size is not None and image_size < 1:
        raise FastddError(f"image_size must be a positive number of pixels, got {image_size}.")
    raw = spec.load(None if data_root is None else Path(data_root), image_size)
    train = unit_pixels(raw.train_images, image_size)
    test = unit_pixels(raw.test_images, image_size)
    if spec.mean is None:
        mean, std = channel_mean_std(train)
    else:
        mean, std = spec.mean, spec.std
    whitening = None
    if zca:
        whitening = ZCA().fit(train)
        train, test = whitening(train), whitening(test)
    else:
        for images in (train, test):
            images.sub_(_column(mean)).div_(_column(std))
    return ImageDataset(
        name=spec.name,
        train_images=train,
        train_labels=raw.train_labels,
        test_images=test,
        test_labels=raw.test_labels,
        num_classes=len(raw.class_names),
        class_names=list(raw.class_names),
        mean=tuple(mean),
        std=tuple(std),
        zca=whitening,
        dsa_strategy=spec.dsa_strategy,
        source=raw.source,
    )


def _column(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
