"""A fastdd set written in the layout another tool reads (`export_synthetic_set`), in that tool's conventions.

- ``fastdd``: ``synset.safetensors`` + ``synset.json`` (a copy of the set);
- ``mtt``: ``images_best.pt``, ``labels_best.pt`` and, only when the set learned one, ``lr_best.pt`` (MTT, TESLA,
  DATM and FTD's evaluation scripts read these; without ``lr_best.pt`` they use their own step size);
- ``ddranking``: ``images.pt``, ``labels.pt`` and, only when learned, ``lr.pt`` (an absent lr lets DD-Ranking
  search its own); RGB CIFAR-10 / CIFAR-100 sets only, as DD-Ranking evaluates no other fastdd dataset;
- ``dc-bench``: DC's ``res_<METHOD>_<DATASET>_ConvNet_<IPC>ipc.pt`` (``{"data": [(images, labels)]}``), the file
  DC-BENCH's DC / DSA / DM loaders read; hard-label, unwhitened CIFAR sets only;
- ``imagefolder``: one folder of PNGs per class (``000/0.png`` ...), [0, 1] pixels quantised to 8 bits.

Soft labels are written as logits where the tool applies a softmax to what it loads (``mtt``, ``ddranking``):
``log p`` (clamped at ``1e-30``), whose softmax is ``p``. Images are re-normalised to the tool's statistics
(`fastdd.interop.conventions`); ZCA-whitened sets stay whitened (the tools whiten the same way). Every export also
writes ``export.json``: what was written, in which convention.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from fastdd.config.artifacts import EXPORT_FORMATS
from fastdd.errors import FastddError, FastddWarning
from fastdd.interop.conventions import (
    normalization_statistics,
    renormalized,
    tool_normalization,
)
from fastdd.io import SyntheticSet, atomic_write, synset_unit_images, write_json

EXPORT_NOTE = "export.json"
# The smallest probability kept when soft labels become logits (log 0 is -inf).
LOGIT_FLOOR = 1e-30
_CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def export_synthetic_set(synset: SyntheticSet, folder: str | Path, format: str) -> list[Path]:
    """Write ``synset`` into ``folder`` in the layout of ``format`` (one of ``EXPORT_FORMATS``).

    Returns:
        the paths written, ``export.json`` last.
    Raises:
        FastddError: a set the target tool cannot take (one sentence saying why and what to use instead).
    """
    if format not in EXPORT_FORMATS:
        raise FastddError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}.")
    folder = Path(folder)
    dataset = synset.meta.get("dataset")
    zca = synset.zca is not None or bool(synset.meta.get("zca"))
    _check_target(synset, format, dataset, zca)
    folder.mkdir(parents=True, exist_ok=True)
    note: dict[str, Any] = {"format": format, "dataset": dataset, "images": int(synset.images.shape[0]),
                            "ipc": synset.meta.get("ipc")}
    if format == "fastdd":
        synset.save(folder)
        written = [folder / "synset.safetensors", folder / "synset.json"]
    elif format == "imagefolder":
        written = _write_image_folder(synset, folder)
        note["pixels"] = "PNG, [0, 1] pixels quantised to 8 bits"
    else:
        images, normalization = _tool_images(synset, format, dataset, zca)
        labels = _labels_for_tools(synset)
        names = {"mtt": ("images_best.pt", "labels_best.pt", "lr_best.pt"),
                 "ddranking": ("images.pt", "labels.pt", "lr.pt")}.get(format)
        if names is None:  # dc-bench
            method = str(synset.meta.get("method") or "imported").upper()
            path = folder / f"res_{method}_{_CIFAR[dataset]}_ConvNet_{synset.meta['ipc']}ipc.pt"
            payload = {"data": [[images, synset.labels.clone()]], "accs_all_exps": {}}
            atomic_write(path, lambda tmp: torch.save(payload, tmp))
            written = [path]
        else:
            tensors = {names[0]: images, names[1]: labels}
            if synset.syn_lr is not None:
                tensors[names[2]] = synset.syn_lr.detach().reshape(()).to(torch.float32).clone()
            written = []
            for name, tensor in tensors.items():
                atomic_write(folder / name, lambda tmp, t=tensor: torch.save(t.contiguous(), tmp))
                written.append(folder / name)
        note["normalization"] = normalization
        note["labels"] = "soft, as logits" if synset.soft_labels is not None else "hard class indices, class-major"
    note["lr"] = (float(synset.syn_lr) if synset.syn_lr is not None
                  else "none: the set learned no step size, so none is written")
    note["files"] = [p.name if p.parent == folder else str(p.relative_to(folder)) for p in written]
    write_json(folder / EXPORT_NOTE, note)
    return [*written, folder / EXPORT_NOTE]


def soft_labels_as_logits(probabilities: torch.Tensor) -> torch.Tensor:
    """Logits ``[K, classes]`` whose softmax is ``probabilities`` (a probability below ``LOGIT_FLOOR`` becomes it)."""
    return probabilities.to(torch.float32).clamp_min(LOGIT_FLOOR).log()


def _check_target(synset: SyntheticSet, format: str, dataset: str | None, zca: bool) -> None:
    channels = int(synset.images.shape[1])
    if format == "ddranking":
        if channels != 3:
            raise FastddError(f"DD-Ranking takes RGB images only and this set has {channels} channel(s); export it "
                              "with --format mtt or fastdd, or rank it in fastdd with `fastdd evaluate --scores`.")
        if dataset not in _CIFAR:
            raise FastddError(f"DD-Ranking evaluates CIFAR-10, CIFAR-100, Tiny ImageNet and ImageNet sets, not "
                              f"{dataset}; rank it with `fastdd evaluate --scores` (DD-Ranking's HLR, IOR and LRS).")
    if format == "dc-bench":
        if dataset not in _CIFAR:
            raise FastddError(f"DC-BENCH evaluates CIFAR-10, CIFAR-100 and Tiny ImageNet sets, not {dataset}; use "
                              "--format mtt or fastdd.")
        if synset.soft_labels is not None:
            raise FastddError("DC's res_*.pt layout holds hard labels only and this set has soft labels; use --format "
                              "mtt (soft labels as logits).")
        if zca:
            raise FastddError("DC-BENCH reads DC-format sets unwhitened and this set is ZCA-whitened; use --format "
                              "mtt.")
    if format in ("ddranking", "dc-bench") and synset.meta.get("ipc") is None:
        raise FastddError(f"{'DD-Ranking' if format == 'ddranking' else 'DC-BENCH'} needs the same number of images "
                          "in every class, and this set's classes differ in size.")


def _tool_images(synset: SyntheticSet, tool: str, dataset: str | None, zca: bool) -> tuple[torch.Tensor, Any]:
    """The images in ``tool``'s normalisation, and its description for ``export.json``."""
    if zca:
        return synset.images.detach().to(torch.float32).clone(), "zca (kornia ZCAWhitening eps 0.1, as stored)"
    name = tool_normalization(tool, dataset or "")
    mean, std = synset.meta.get("mean"), synset.meta.get("std")
    if mean is None or std is None:
        raise FastddError("the set's synset.json records no mean / std, so its images cannot be re-normalised.")
    target = normalization_statistics(name, dataset_mean=mean, dataset_std=std)
    images = renormalized(synset.images.detach(), (tuple(mean), tuple(std)), target)
    return images, {"name": name, "mean": list(target[0]), "std": list(target[1])}


def _labels_for_tools(synset: SyntheticSet) -> torch.Tensor:
    if synset.soft_labels is not None:
        return soft_labels_as_logits(synset.soft_labels)
    return synset.labels.to(torch.int64).clone()


def _write_image_folder(synset: SyntheticSet, folder: Path) -> list[Path]:
    dropped = [what for what, present in (("soft labels", synset.soft_labels is not None),
                                          ("learned lr", synset.syn_lr is not None)) if present]
    if dropped:
        warnings.warn(f"an image folder holds images and hard labels only: the set's {' and '.join(dropped)} "
                      f"{'is' if len(dropped) == 1 else 'are'} not written (use --format mtt to keep them).",
                      FastddWarning, stacklevel=3)
    unit = synset_unit_images(synset)
    classes = int(synset.meta.get("num_classes") or int(synset.labels.max()) + 1)
    width = max(3, len(str(classes - 1)))
    written, seen = [], {}
    for image, label in zip(unit, synset.labels.tolist()):
        index = seen.get(label, 0)
        seen[label] = index + 1
        path = folder / f"{label:0{width}d}" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_png(image, path)
        written.append(path)
    return written


def _write_png(unit_image: torch.Tensor, path: Path) -> None:
    """One ``[C, H, W]`` [0, 1] image as an 8-bit PNG of its own size (grey for one channel)."""
    from PIL import Image

    array = (unit_image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
