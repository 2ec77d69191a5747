"""A synthetic set made by another tool, checked and turned into a fastdd set (`import_synthetic_set`).

What the files cannot say (the dataset, how the images were normalised, whether soft labels are logits) comes from
the caller; everything is checked before anything is written: shapes, channel count against the dataset, labels
(explicit or class-major), their range, finite values, a plausible normalisation, a positive learned lr. What was
read and assumed is recorded in ``synset.json`` under ``"imported"``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

import fastdd
from fastdd.config.artifacts import IMPORT_FORMATS, SOFT_LABEL_FORMS
from fastdd.data import ImageDataset, load_dataset
from fastdd.errors import FastddError, FastddWarning
from fastdd.interop.conventions import (
    check_normalization,
    normalization_statistics,
    renormalized,
)
from fastdd.interop.foreign_files import ForeignTensors, read_foreign_set
from fastdd.io import SyntheticSet

# How far a row of soft labels given as probabilities may sum from 1.
PROBABILITY_SUM_TOLERANCE = 1e-3


def import_synthetic_set(
    format: str,
    paths: Sequence[str | Path],
    *,
    dataset: str,
    data_root: str | None = None,
    normalization: str | None = None,
    zca: bool = False,
    soft_labels: str = "logits",
    experiment: int = -1,
) -> SyntheticSet:
    """Read a set written by another tool into a `SyntheticSet` in ``dataset``'s model space.

    Args:
        format: one of ``IMPORT_FORMATS`` (see `fastdd.interop.foreign_files`).
        paths: ``IMAGES [LABELS] [LR]`` (a folder for ``mtt`` / ``ddranking`` / ``imagefolder``).
        dataset: the registered dataset the set was distilled from.
        data_root: its folder, when not the default.
        normalization: how the stored images were normalised (``NORMALIZATIONS``; default ``dataset``); not with
            ``zca`` or ``imagefolder`` (whose files are pixels).
        zca: the images are ZCA-whitened (kornia ``ZCAWhitening(eps=0.1)`` on the [0, 1] training images, as the
            MTT code, DD-Ranking and fastdd do); the set is then kept whitened.
        soft_labels: what ``[K, classes]`` labels hold: ``logits`` (DD-Ranking's and TESLA's convention: a softmax
            gives the targets) or ``probs``; fastdd stores probabilities.
        experiment: ``dc``: the entry of its ``data`` list (default the last).
    Returns:
        the set: images ``[K, C, H, W]`` float32 in class-major order, labels ``[K]``, optional soft labels
        ``[K, classes]`` (probabilities), optional ``syn_lr``.
    Raises:
        FastddError: one sentence for anything that does not fit.
    """
    if format not in IMPORT_FORMATS:
        raise FastddError(f"--format must be one of {', '.join(IMPORT_FORMATS)}, got {format!r}.")
    if soft_labels not in SOFT_LABEL_FORMS:
        raise FastddError(f"--soft-labels must be one of {', '.join(SOFT_LABEL_FORMS)}, got {soft_labels!r}.")
    if format == "imagefolder" and (normalization is not None or zca):
        raise FastddError("--format imagefolder reads image files, which hold pixels: --normalization and --zca do not "
                          "apply.")
    if zca and normalization is not None:
        raise FastddError("--normalization applies without --zca only: ZCA-whitened images were not normalised.")
    data = load_dataset(dataset, data_root=data_root, zca=zca)
    foreign = read_foreign_set(format, paths, channels=data.channels, class_names=data.class_names,
                               experiment=experiment)
    images = _checked_images(foreign.images, data)
    image_size = None
    if tuple(images.shape[2:]) != tuple(data.image_size):
        if data.name != "imagefolder":
            raise FastddError(f"the images are {images.shape[2]}x{images.shape[3]} but {data.name} images are "
                              f"{data.image_size[0]}x{data.image_size[1]}; check --dataset.")
        image_size = int(images.shape[2])
        data = load_dataset(dataset, data_root=data_root, zca=zca, image_size=image_size)
    normalization = normalization or ("none" if foreign.unit_pixels else "dataset")
    model_images, measured = _to_model_space(images, data, normalization, zca, foreign)
    hard, soft = _labels(foreign, data.num_classes, len(model_images), soft_labels)
    order = torch.sort(hard, stable=True).indices
    reordered = bool((order != torch.arange(len(order))).any())
    counts = torch.bincount(hard, minlength=data.num_classes)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise FastddError(f"the set has no image of class(es) {', '.join(map(str, missing[:10]))}"
                          f"{' ...' if len(missing) > 10 else ''}; every class of {data.name} needs at least one.")
    ipc = int(counts[0]) if bool((counts == counts[0]).all()) else None
    meta: dict[str, Any] = {
        "fastdd_version": fastdd.__version__,
        "method": "imported",
        "dataset": data.name,
        "data_root": data_root,
        "data_source": data.source,
        "image_size": image_size,
        "ipc": ipc,
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "image_shape": list(model_images.shape[1:]),
        "mean": list(data.mean),
        "std": list(data.std),
        "zca": zca,
        "dsa_strategy": data.dsa_strategy,
        "seed": None,
        "hyperparameters": {},
        "imported": {
            "format": format,
            "files": foreign.files,
            "normalization": "zca" if zca else normalization,
            "soft_labels": soft_labels if soft is not None else None,
            "labels": "explicit" if foreign.labels is not None else "class-major",
            "reordered_to_class_major": reordered,
            "class_folders": foreign.class_folders,
            "pixel_check": measured,
            **({"experiment": int(foreign.files["images"]["experiment"])} if format == "dc" else {}),
        },
    }
    return SyntheticSet(
        images=model_images[order].contiguous(),
        labels=hard[order].contiguous(),
        meta=meta,
        soft_labels=None if soft is None else soft[order].contiguous(),
        syn_lr=_learned_lr(foreign),
        zca=data.zca.state_tensors() if data.zca is not None else None,
    )


def _checked_images(images: torch.Tensor, data: ImageDataset) -> torch.Tensor:
    if images.dim() != 4:
        raise FastddError(f"the images must be one tensor [K, C, H, W]; got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise FastddError(f"the images are {images.dtype} values; a synthetic set stores float images (uint8 pixels "
                          "belong in --format imagefolder as image files).")
    if images.shape[0] == 0:
        raise FastddError("the set holds no images.")
    if images.shape[1] != data.channels:
        raise FastddError(f"the images have {images.shape[1]} channel(s) but {data.name} images have "
                          f"{data.channels}; check --dataset.")
    if images.shape[2] != images.shape[3]:
        raise FastddError(f"the images are {images.shape[2]}x{images.shape[3]}; fastdd datasets are square.")
    if not bool(torch.isfinite(images).all()):
        raise FastddError(f"the images hold {int((~torch.isfinite(images)).sum())} NaN or infinite value(s); a set "
                          "with them cannot be trained on.")
    return images.to(torch.float32)


def _to_model_space(
    images: torch.Tensor, data: ImageDataset, normalization: str, zca: bool, foreign: ForeignTensors
) -> tuple[torch.Tensor, dict[str, float]]:
    """The images in ``data``'s model space (normalised with its statistics, or whitened as given), and the pixel
    check's measurements."""
    if zca:
        low, high = float(images.min()), float(images.max())
        if low >= 0.0 and high <= 1.0:
            raise FastddError(f"the images all lie in [0, 1] (min {low:.3g}, max {high:.3g}), as pixels do, but --zca "
                              "says they are ZCA-whitened; leave out --zca for pixels or normalised images.")
        return images.clone(), {"min": low, "max": high}
    source = normalization_statistics(normalization, dataset_mean=data.mean, dataset_std=data.std)
    measured = check_normalization(images, normalization, source) if not foreign.unit_pixels else {
        "min": float(images.min()), "max": float(images.max())}
    return renormalized(images, source, (tuple(data.mean), tuple(data.std))), measured


def _labels(
    foreign: ForeignTensors, num_classes: int, count: int, soft_form: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hard [K] int64, soft [K, classes] float32 probabilities or None)``."""
    labels = foreign.labels
    if labels is None:
        if count % num_classes:
            raise FastddError(f"without a labels file the images are taken as class-major ({num_classes} classes, "
                              f"the same count each), but there are {count} images; give the labels file.")
        return torch.arange(num_classes).repeat_interleave(count // num_classes), None
    if labels.shape[0] != count:
        raise FastddError(f"there are {count} images but {labels.shape[0]} labels.")
    if labels.dim() == 2:
        if labels.shape[1] != num_classes:
            raise FastddError(f"the soft labels have {labels.shape[1]} columns but the dataset has {num_classes} "
                              "classes.")
        if not labels.is_floating_point() or not bool(torch.isfinite(labels).all()):
            raise FastddError("the soft labels must be finite float values.")
        values = labels.to(torch.float64)
        looks_like_probs = bool((values >= 0).all()) and bool(
            ((values.sum(1) - 1).abs() <= PROBABILITY_SUM_TOLERANCE).all())
        if soft_form == "probs":
            if not looks_like_probs:
                raise FastddError("--soft-labels probs: the rows are not probabilities (negative values, or rows that "
                                  "do not sum to 1); pass --soft-labels logits if they are logits.")
            probs = values / values.sum(1, keepdim=True)
        else:
            if looks_like_probs:
                warnings.warn("the soft labels look like probabilities (every row is non-negative and sums to 1) but "
                              "are read as logits (--soft-labels logits); pass --soft-labels probs if they are.",
                              FastddWarning, stacklevel=3)
            probs = torch.softmax(values, dim=1)
        return probs.argmax(1), probs.to(torch.float32)
    if labels.dim() != 1:
        raise FastddError(f"the labels must be [K] class indices or [K, classes] soft labels; got shape "
                          f"{tuple(labels.shape)}.")
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
            raise FastddError("the labels are [K] values but not whole numbers; class indices are expected.")
    hard = labels.to(torch.int64)
    if bool((hard < 0).any()) or bool((hard >= num_classes).any()):
        raise FastddError(f"the labels run from {int(hard.min())} to {int(hard.max())}, outside the dataset's classes "
                          f"0 to {num_classes - 1}.")
    return hard, None


def _learned_lr(foreign: ForeignTensors) -> torch.Tensor | None:
    if foreign.lr is None:
        return None
    lr = foreign.lr
    if lr.numel() != 1 or not lr.is_floating_point():
        raise FastddError(f"the lr file must hold one float (the learned step size); it holds shape "
                          f"{tuple(lr.shape)} of {lr.dtype}.")
    value = float(lr.reshape(()))
    if not value > 0 or value != value or value == float("inf"):
        raise FastddError(f"the learned lr is {value}; a step size must be a positive finite number.")
    return torch.tensor(value, dtype=torch.float32)
