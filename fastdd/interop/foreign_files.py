"""Reading the files other dataset-distillation tools write a synthetic set into, as tensors (nothing checked yet).

Pickled files are read with ``torch.load(weights_only=True)`` only (`fastdd.io.safe_torch_load`): tensors and plain
containers, never code. The layouts:

- ``mtt``: MTT / TESLA / DATM / FTD's ``images_best.pt``, ``labels_best.pt`` (hard ``[K]`` or soft ``[K, classes]``)
  and ``lr_best.pt`` (the learned step size); in a folder, ``images_*``/``labels_*``/``syn_lr``-style names too;
- ``ddranking``: DD-Ranking's ``images.pt``, ``labels.pt`` (soft labels as logits), ``lr.pt``;
- ``dc``: DC / DSA / DM's ``res_*.pt``: a dict whose ``"data"`` lists one ``(images, labels)`` pair per experiment;
- ``tensors``: plain tensor files (``.pt``, ``.safetensors`` holding one tensor, ``.npy``), given one by one;
- ``imagefolder``: a folder with one subfolder of image files per class (SRe2L / RDED-style releases).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fastdd.errors import FastddError
from fastdd.io import safe_torch_load

# Names looked for in a folder, most specific first (the MTT code's, then its descendants', then DD-Ranking's).
_FOLDER_NAMES = {
    "mtt": {
        "images": ("images_best.pt", "image_syn.pt", "images_syn.pt", "images.pt"),
        "labels": ("labels_best.pt", "label_syn.pt", "labels_syn.pt", "labels.pt"),
        "lr": ("lr_best.pt", "syn_lr.pt", "lr.pt"),
    },
    "ddranking": {
        "images": ("images.pt", "images_best.pt"),
        "labels": ("labels.pt", "labels_best.pt"),
        "lr": ("lr.pt", "lr_best.pt", "syn_lr.pt"),
    },
}


@dataclass
class ForeignTensors:
    """What a foreign set's files hold, as read.

    Attributes:
        images: ``[K, C, H, W]`` as stored (any float dtype; for ``imagefolder``, [0, 1] pixels).
        labels: ``[K]`` hard labels, ``[K, classes]`` soft labels, or None (class-major order implied).
        lr: the learned step size as stored (any shape), or None.
        files: ``{"images"|"labels"|"lr": {"path", "sha256"}}`` of the files read.
        class_folders: for ``imagefolder``, the subfolder name of each class index read, else None.
        unit_pixels: the images are [0, 1] pixels by construction (decoded image files).
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    lr: torch.Tensor | None = None
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    class_folders: list[str] | None = None
    unit_pixels: bool = False


def read_foreign_set(
    format: str, paths: Sequence[str | Path], *, channels: int, class_names: Sequence[str], experiment: int = -1
) -> ForeignTensors:
    """Read the files of a set written by another tool.

    Args:
        format: ``mtt``, ``ddranking``, ``dc``, ``tensors`` or ``imagefolder``.
        paths: ``IMAGES [LABELS] [LR]``: for ``mtt`` / ``ddranking`` IMAGES may be their folder (the other files are
            then found in it); ``dc`` and ``imagefolder`` take one path.
        channels: the dataset's channel count (how ``imagefolder`` decodes its files).
        class_names: the dataset's class names (``imagefolder`` subfolders may be named by them or by index).
        experiment: ``dc``: which entry of ``"data"`` (default the last, as DC-BENCH reads).
    Raises:
        FastddError: a missing, unreadable or unexpected file, named.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise FastddError("give the set's files: IMAGES [LABELS] [LR].")
    for path in paths:
        if not path.exists():
            raise FastddError(f"{path} does not exist.")
    if format in ("dc", "imagefolder") and len(paths) > 1:
        raise FastddError(f"--format {format} reads one path (the {'res_*.pt file' if format == 'dc' else 'folder'}),"
                          f" got {len(paths)}.")
    if len(paths) > 3:
        raise FastddError(f"give at most three paths (IMAGES LABELS LR), got {len(paths)}.")
    if format in _FOLDER_NAMES:
        return _read_triplet(paths, _FOLDER_NAMES[format])
    if format == "tensors":
        if paths[0].is_dir():
            raise FastddError(f"--format tensors reads files, and {paths[0]} is a folder; name the tensor files.")
        return _read_triplet(paths, None)
    if format == "dc":
        return _read_dc(paths[0], experiment)
    if format == "imagefolder":
        return _read_image_folder(paths[0], channels, class_names)
    raise FastddError(f"unknown --format {format!r}.")


def _read_triplet(paths: list[Path], folder_names: dict[str, tuple[str, ...]] | None) -> ForeignTensors:
    """Images, labels and lr from explicit files, or (``folder_names``) from the files found in one folder."""
    if paths[0].is_dir():
        if folder_names is None or len(paths) > 1:
            raise FastddError(f"{paths[0]} is a folder: give it alone, or give the files (IMAGES [LABELS] [LR]).")
        folder = paths[0]
        found = {role: next((folder / n for n in names if (folder / n).is_file()), None)
                 for role, names in folder_names.items()}
        if found["images"] is None:
            raise FastddError(f"{folder} holds none of {', '.join(folder_names['images'])}; name the images file "
                              "instead of the folder.")
    else:
        found = dict(zip(("images", "labels", "lr"), [*paths, None, None]))
    tensors = {role: _read_tensor(path) for role, path in found.items() if path is not None}
    files = {role: _file_record(path) for role, path in found.items() if path is not None}
    return ForeignTensors(images=tensors["images"], labels=tensors.get("labels"), lr=tensors.get("lr"), files=files)


def _read_tensor(path: Path) -> torch.Tensor:
    """The one tensor of a ``.pt``, ``.safetensors`` or ``.npy`` file."""
    suffix = path.suffix.lower()

    def load() -> Any:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False))
        return safe_torch_load(path, path)

    content = _loaded(path, load, "a tensor file")
    if isinstance(content, dict) and len(content) == 1:
        content = next(iter(content.values()))
    if not isinstance(content, torch.Tensor):
        raise FastddError(f"{path} holds a {type(content).__name__}, not one tensor; give a file holding one tensor "
                          "(or --format dc for a res_*.pt file).")
    return content.detach()


def _read_dc(path: Path, experiment: int) -> ForeignTensors:
    if path.is_dir():
        raise FastddError(f"--format dc reads a res_*.pt file, and {path} is a folder.")
    content = _loaded(path, lambda: safe_torch_load(path, path), "a torch file")
    data = content.get("data") if isinstance(content, dict) else None
    if not isinstance(data, (list, tuple)) or not data:
        raise FastddError(f"{path} has no 'data' list of (images, labels) pairs: it is not a DC res_*.pt file.")
    if not -len(data) <= experiment < len(data):
        raise FastddError(f"--experiment {experiment}: {path} holds {len(data)} experiment(s) (0 to {len(data) - 1}, "
                          "or -1 for the last).")
    entry = data[experiment]
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(t, torch.Tensor) for t in entry)):
        raise FastddError(f"{path}: entry {experiment} of 'data' is not an (images, labels) pair of tensors.")
    record = _file_record(path)
    record["experiment"] = str(experiment % len(data))
    return ForeignTensors(images=entry[0].detach(), labels=entry[1].detach(), files={"images": record})


def _read_image_folder(folder: Path, channels: int, class_names: Sequence[str]) -> ForeignTensors:
    """One subfolder per class; its name is the class's index or its name in the dataset, else the sorted order."""
    from fastdd.data.foreign import image_files

    if not folder.is_dir():
        raise FastddError(f"--format imagefolder reads a folder of class subfolders, and {folder} is a file.")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise FastddError(f"{folder} has no class subfolders (one folder of images per class is expected).")
    names = [p.name for p in subfolders]
    if all(n.isdigit() for n in names):
        indices = [int(n) for n in names]
    elif all(n in class_names for n in names):
        indices = [list(class_names).index(n) for n in names]
    else:
        indices = list(range(len(names)))
    images, labels = [], []
    for index, sub in zip(indices, subfolders):
        files = image_files(sub)
        if not files:
            raise FastddError(f"class folder {sub} holds no image files.")
        for path in files:
            images.append(_decode(path, channels))
            labels.append(index)
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise FastddError(f"the images in {folder} have different sizes ({', '.join(map(str, sorted(shapes)))}); a "
                          "synthetic set has one size.")
    class_folders = [""] * (max(indices) + 1)
    for index, name in zip(indices, names):
        class_folders[index] = name
    return ForeignTensors(images=torch.stack(images), labels=torch.tensor(labels, dtype=torch.int64),
                          files={"images": {"path": str(folder)}}, class_folders=class_folders, unit_pixels=True)


def _decode(path: Path, channels: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise FastddError(f"could not decode {path} as an image ({_first_line(exc)}).") from exc
    pixels = torch.from_numpy(array.copy())
    pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    return pixels.to(torch.float32) / 255


def _loaded(path: Path, load: Callable[[], Any], what: str) -> Any:
    """``load()``, with anything but fastdd's own errors worded as one sentence naming ``path``."""
    try:
        return load()
    except FastddError:
        raise
    except Exception as exc:
        import pickle

        # torch's message for an unreadable pickle advises the unsafe loader, which fastdd never uses
        reason = "its pickle is unreadable" if isinstance(exc, pickle.UnpicklingError) else _first_line(exc)
        raise FastddError(f"could not read {path}: it is damaged or not {what} ({reason}).") from exc


def _file_record(path: Path) -> dict[str, str]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest()}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
