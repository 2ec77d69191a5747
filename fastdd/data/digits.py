"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, pixel values 0..16), with a fixed stratified split.

The CSV is read straight from scikit-learn's package data: importing ``sklearn.datasets`` alone costs about a
second, which would dominate loading this tiny dataset.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from fastdd.data.raw import RawSplits
from fastdd.errors import FastddError

TEST_FRACTION = 0.2
SPLIT_SEED = 0
CLASS_NAMES = [str(digit) for digit in range(10)]


def bundled_digits_csv() -> Path:
    """Path of scikit-learn's ``datasets/data/digits.csv.gz`` (found without importing scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise FastddError("the digits dataset ships with scikit-learn, which is missing; pip install scikit-learn.")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FastddError(f"scikit-learn's digits data file {path} is missing; reinstall scikit-learn.")
    return path


def read_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits.

    Returns:
        ``(images [1797, 1, 8, 8] float32 in [0, 1] (= value / 16), labels [1797] int64)``, in file order.
    """
    with gzip.open(bundled_digits_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1].copy()).reshape(-1, 1, 8, 8).div_(16)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible stratified split: ``round(test_fraction * n_c)`` random samples of each class go to test.

    Args:
        labels: ``[N]`` int64.
        test_fraction: share of each class in the test split.
        seed: seed of the private generator that draws the split (the global RNG is untouched).

    Returns:
        ``(train_indices, test_indices)``, int64, each ascending (file order is kept within a split).
    """
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        shuffled = members[torch.randperm(members.numel(), generator=generator)]
        n_test = round(test_fraction * members.numel())
        test.append(shuffled[:n_test])
        train.append(shuffled[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load_digits(data_root: Path | None, image_size: int | None) -> RawSplits:
    """The digits with the fixed 80/20 stratified split.

    1,438 train / 359 test images; the training pixels have mean 0.3059 and std 0.3765.
    """
    images, labels = read_digits()
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return RawSplits(
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
        class_names=list(CLASS_NAMES),
        source="sklearn.datasets.load_digits (shipped with scikit-learn)",
    )
