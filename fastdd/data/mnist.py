"""MNIST and Fashion-MNIST: four idx files (plain or ``.gz``) per dataset, read with :func:`fastdd.data.idx.read_idx`.

Folders searched, in order: ``data_root`` itself (default ``./data``), torchvision's ``data_root/MNIST/raw``
(``FashionMNIST/raw``), and for Fashion-MNIST the Debian package ``dataset-fashion-mnist``'s
``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastdd.data.idx import read_idx
from fastdd.data.raw import DEFAULT_DATA_ROOT, RawSplits
from fastdd.errors import FastddError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def load_mnist(data_root: Path | None, image_size: int | None) -> RawSplits:
    """MNIST from ``data_root`` or ``data_root/MNIST/raw`` (28x28x1 uint8)."""
    root = DEFAULT_DATA_ROOT if data_root is None else data_root
    folders = [root, root / "MNIST" / "raw"]
    return _load_idx_dataset("mnist", folders, MNIST_CLASSES)


def load_fashion_mnist(data_root: Path | None, image_size: int | None) -> RawSplits:
    """Fashion-MNIST from ``data_root``, ``data_root/FashionMNIST/raw`` or the system folder (28x28x1 uint8)."""
    root = DEFAULT_DATA_ROOT if data_root is None else data_root
    folders = [root, root / "FashionMNIST" / "raw", SYSTEM_FASHION_MNIST]
    return _load_idx_dataset("fashion-mnist", folders, FASHION_MNIST_CLASSES)


def find_idx_files(folder: Path) -> list[Path] | None:
    """The four idx files in ``folder`` (each plain or ``.gz``, plain preferred), or None if any is missing."""
    found = []
    for stem in IDX_FILES:
        candidates = [folder / stem, folder / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found


def _load_idx_dataset(name: str, folders: list[Path], class_names: list[str]) -> RawSplits:
    files = next((found for folder in folders if (found := find_idx_files(folder)) is not None), None)
    if files is None:
        searched = ", ".join(str(folder.resolve()) for folder in folders)
        hint = "install the Debian package dataset-fashion-mnist or " if name == "fashion-mnist" else ""
        raise FastddError(
            f"{name} was not found: searched {searched} for {', '.join(IDX_FILES)} (each optionally .gz); "
            f"{hint}set data_root to the folder holding them."
        )
    train_images, train_labels, test_images, test_labels = (read_idx(path) for path in files)
    return RawSplits(
        train_images=_as_images(train_images, files[0]),
        train_labels=_as_labels(train_labels, train_images.shape[0], files[1], len(class_names)),
        test_images=_as_images(test_images, files[2]),
        test_labels=_as_labels(test_labels, test_images.shape[0], files[3], len(class_names)),
        class_names=list(class_names),
        source=str(files[0].parent.resolve()),
    )


def _as_images(values: torch.Tensor, path: Path) -> torch.Tensor:
    if values.dim() != 3 or values.dtype != torch.uint8:
        raise FastddError(f"{path} should hold uint8 images [N, H, W] but holds {values.dtype} {tuple(values.shape)}.")
    return values.unsqueeze(1)


def _as_labels(values: torch.Tensor, count: int, path: Path, num_classes: int) -> torch.Tensor:
    if values.dim() != 1 or values.shape[0] != count:
        raise FastddError(f"{path} holds labels of shape {tuple(values.shape)} for {count} images; they must match.")
    labels = values.to(torch.int64)
    if labels.numel() and int(labels.max()) >= num_classes:
        raise FastddError(f"{path} holds label {int(labels.max())}, but the dataset has {num_classes} classes.")
    return labels
