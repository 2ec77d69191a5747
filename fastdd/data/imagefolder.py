"""A folder of class sub-folders: ``data_root/train/<class>/*`` and ``data_root/val/<class>/*`` (or ``test``).

Classes are the sub-folder names in sorted order (torchvision ImageFolder's convention) and must be the same in
both splits. Every image is converted to RGB, resized so its shorter side is ``image_size`` (bilinear) and
center-cropped to ``image_size`` x ``image_size``; without ``image_size`` the images keep their own size (the
shorter side of the first training image), so a folder of 32x32 images stays 32x32. Files are decoded in a thread pool (PIL releases the GIL).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fastdd.data.raw import RawSplits
from fastdd.errors import FastddError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "train/<class>/* and val/<class>/* (or test/<class>/*) image files"


def load_imagefolder(data_root: Path | None, image_size: int | None) -> RawSplits:
    """Both splits of an image folder as ``[N, 3, S, S]`` uint8, ``S = image_size`` (default: the shorter side of
    the first training image)."""
    if data_root is None:
        raise FastddError(f"the imagefolder dataset needs data_root: a folder holding {LAYOUT}.")
    if image_size is not None and image_size < 1:
        raise FastddError(f"image_size must be a positive number of pixels, got {image_size}.")
    train_dir = data_root / "train"
    val_dir = next((data_root / n for n in ("val", "test") if (data_root / n).is_dir()), data_root / "val")
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise FastddError(
                f"imagefolder: {folder.resolve()} does not exist; {data_root.resolve()} must hold {LAYOUT}."
            )
    classes = class_folders(train_dir)
    val_classes = class_folders(val_dir)
    if not classes:
        raise FastddError(f"imagefolder: {train_dir.resolve()} has no class sub-folders; it must hold {LAYOUT}.")
    if classes != val_classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise FastddError(
            f"imagefolder: the classes of {train_dir.resolve()} and {val_dir.resolve()} differ "
            f"(only in train: {only_train or 'none'}; only in {val_dir.name}: {only_val or 'none'}); "
            f"both splits need the same class sub-folders."
        )
    train_files, train_labels = list_images(train_dir, classes)
    val_files, val_labels = list_images(val_dir, classes)
    for folder, files in ((train_dir, train_files), (val_dir, val_files)):
        if not files:
            raise FastddError(
                f"imagefolder: {folder.resolve()} holds no image files ({', '.join(IMAGE_EXTENSIONS)})."
            )
    empty = [c for c, count in zip(classes, np.bincount(train_labels, minlength=len(classes))) if count == 0]
    if empty:
        raise FastddError(f"imagefolder: the training classes {empty} in {train_dir.resolve()} have no image files.")
    size = image_size if image_size is not None else native_size(train_files[0])
    return RawSplits(
        train_images=decode_images(train_files, size),
        train_labels=torch.as_tensor(train_labels, dtype=torch.int64),
        test_images=decode_images(val_files, size),
        test_labels=torch.as_tensor(val_labels, dtype=torch.int64),
        class_names=classes,
        source=str(data_root.resolve()),
    )


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``split_dir``."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def list_images(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image files of every class (sorted by name within a class) and their labels (index into ``classes``)."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            Path(entry.path)
            for entry in os.scandir(split_dir / name)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        files.extend(found)
        labels.extend([label] * len(found))
    return files, labels


def native_size(path: Path) -> int:
    """The shorter side of the image in ``path`` (its header is read, not its pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return min(image.size)
    except (UnidentifiedImageError, OSError) as err:
        raise FastddError(f"imagefolder: {path} is not a readable image ({err}); remove or replace it.") from None


def decode_images(files: list[Path], size: int) -> torch.Tensor:
    """Decode, resize (shorter side to ``size``) and center-crop every file.

    Returns:
        ``[len(files), 3, size, size]`` uint8.
    """
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        arrays = list(pool.map(lambda path: _decode_one(path, size), files))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _decode_one(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise FastddError(f"imagefolder: {path} is not a readable image ({err}); remove or replace it.") from None
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)
