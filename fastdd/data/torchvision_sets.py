"""CIFAR-10, CIFAR-100 and SVHN in torchvision's on-disk layout, read through ``torchvision.datasets``.

Never downloads. The folder layout is checked here first so a missing dataset is reported in one sentence. torchvision
then verifies the files' MD5 checksums before unpickling them (CIFAR files are pickles, so only the official files
are ever unpickled); the arrays are taken whole from the dataset's ``.data``, never image by image.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from fastdd.data.raw import DEFAULT_DATA_ROOT, RawSplits
from fastdd.errors import FastddError

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def load_cifar10(data_root: Path | None, image_size: int | None) -> RawSplits:
    """CIFAR-10 from ``data_root/cifar-10-batches-py`` (32x32x3 uint8)."""
    from torchvision.datasets import CIFAR10

    root = _root(data_root)
    layout = "data_batch_1..5, test_batch and batches.meta (the extracted cifar-10-python.tar.gz)"
    _require_files("cifar10", root / "cifar-10-batches-py", CIFAR10_FILES, layout)
    return _load_cifar("cifar10", CIFAR10, root / "cifar-10-batches-py", root)


def load_cifar100(data_root: Path | None, image_size: int | None) -> RawSplits:
    """CIFAR-100 (fine labels) from ``data_root/cifar-100-python`` (32x32x3 uint8)."""
    from torchvision.datasets import CIFAR100

    root = _root(data_root)
    layout = "train, test and meta (the extracted cifar-100-python.tar.gz)"
    _require_files("cifar100", root / "cifar-100-python", CIFAR100_FILES, layout)
    return _load_cifar("cifar100", CIFAR100, root / "cifar-100-python", root)


def load_svhn(data_root: Path | None, image_size: int | None) -> RawSplits:
    """SVHN (cropped digits, label 10 mapped to 0 by torchvision) from ``data_root/{train,test}_32x32.mat``."""
    from torchvision.datasets import SVHN

    if importlib.util.find_spec("scipy") is None:
        raise FastddError("svhn's .mat files are read with scipy, which is not installed; pip install scipy.")
    root = _root(data_root)
    _require_files("svhn", root, SVHN_FILES, "train_32x32.mat and test_32x32.mat (the cropped-digits format)")
    splits = [
        _checked(lambda split=split: SVHN(str(root), split=split, download=False), "svhn", root)
        for split in ("train", "test")
    ]
    # torchvision's SVHN.data is already [N, C, H, W] uint8.
    images = [torch.from_numpy(np.ascontiguousarray(split.data)) for split in splits]
    labels = [torch.from_numpy(np.asarray(split.labels, dtype=np.int64)) for split in splits]
    return RawSplits(images[0], labels[0], images[1], labels[1], [str(digit) for digit in range(10)],
                     source=str(root.resolve()))


def _load_cifar(name: str, dataset_class: type, folder: Path, root: Path) -> RawSplits:
    train = _checked(lambda: dataset_class(str(root), train=True, download=False), name, folder)
    test = _checked(lambda: dataset_class(str(root), train=False, download=False), name, folder)
    return RawSplits(
        train_images=_nhwc_to_nchw(train.data),
        train_labels=torch.as_tensor(train.targets, dtype=torch.int64),
        test_images=_nhwc_to_nchw(test.data),
        test_labels=torch.as_tensor(test.targets, dtype=torch.int64),
        class_names=list(train.classes),
        source=str(folder.resolve()),
    )


def _root(data_root: Path | None) -> Path:
    return DEFAULT_DATA_ROOT if data_root is None else data_root


def _require_files(name: str, folder: Path, files: tuple[str, ...], layout: str) -> None:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        if not folder.is_dir():
            problem = "that folder does not exist"
        else:
            problem = f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
        raise FastddError(
            f"{name} was not found: expected {folder.resolve()}/ with {layout}, but {problem}; "
            f"set data_root to the folder that holds it (fastdd never downloads)."
        )


def _checked(make, name: str, folder: Path):
    """Run a torchvision constructor, turning its failed checksum check into a FastddError."""
    try:
        return make()
    except RuntimeError:
        raise FastddError(
            f"the {name} files in {folder.resolve()} failed torchvision's MD5 checksum check; "
            f"replace them with the official, unmodified files."
        ) from None


def _nhwc_to_nchw(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()
