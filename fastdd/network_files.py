"""One trained network as a folder of two files: ``network.safetensors`` (its state dict, tensors only) and
``network.json`` (the architecture that loads it and the data it was trained on). ``fastdd teacher`` writes them;
``--teacher`` (OAL) and ``--init`` (evaluation networks that fine-tune a trained one) read them.

``network.json`` holds ``format`` (``"fastdd-network/1"``), ``model``, ``width``, ``depth``, ``norm``, the data fields
an evaluation compares with a synthetic set's (``dataset``, ``num_classes``, ``image_shape``, ``mean``, ``std``,
``zca``), and what the training recorded (``epochs``, ``lr``, ``test_accuracy``, ``seed``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdd.errors import FastddError

NETWORK_FORMAT = "fastdd-network/1"
NETWORK_TENSORS = "network.safetensors"
NETWORK_META = "network.json"
# The fields that must agree with a synthetic set's for a network to teach or initialise its evaluation networks.
DATA_FIELDS = ("dataset", "num_classes", "image_shape", "mean", "std", "zca")


def is_network_folder(path: str | Path) -> bool:
    """True for a folder holding ``network.json`` (a folder written by :func:`save_network`)."""
    return (Path(path) / NETWORK_META).is_file()


def save_network(folder: str | Path, net: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``net``'s state dict and ``meta`` (with ``format`` added) into ``folder`` (created); returns it.

    Args:
        net: a fastdd network (:func:`fastdd.models.build_model`); its tensors are saved on the CPU, contiguous.
        meta: at least ``model``, ``width``, ``depth``, ``norm``, ``num_classes`` and ``image_shape`` (``[C, H, W]``).
    """
    from safetensors.torch import save_file

    from fastdd.io import atomic_write, write_json

    missing = [k for k in ("model", "width", "depth", "norm", "num_classes", "image_shape") if k not in meta]
    if missing:
        raise ValueError(f"save_network needs meta fields {', '.join(missing)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(folder / NETWORK_TENSORS, lambda tmp: save_file(state, tmp, metadata={"format": NETWORK_FORMAT}))
    write_json(folder / NETWORK_META, {"format": NETWORK_FORMAT, **meta})
    return folder


def read_network_meta(folder: str | Path) -> dict[str, Any]:
    """The ``network.json`` of ``folder``, its format checked.

    Raises:
        FastddError: no such file, not JSON, or another format.
    """
    from fastdd.io import check_format

    path = Path(folder) / NETWORK_META
    if not path.is_file():
        raise FastddError(f"{folder} holds no {NETWORK_META}; pass a folder written by `fastdd teacher`.")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise FastddError(f"{path} is not valid JSON ({exc}); write the network again with `fastdd teacher`.") from exc
    check_format(meta.get("format"), NETWORK_FORMAT, path, "a fastdd network file")
    return meta


def load_network(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network saved in ``folder`` (built from its ``network.json``, weights loaded strictly) and that metadata.

    Raises:
        FastddError: a missing or foreign file, or weights that do not fit the recorded architecture.
    """
    from safetensors.torch import load_file

    from fastdd.models import build_model

    meta = read_network_meta(folder)
    channels, *size = meta["image_shape"]
    net = build_model(
        meta["model"], channels=int(channels), num_classes=int(meta["num_classes"]), image_size=tuple(size),
        width=int(meta["width"]), depth=meta.get("depth"), norm=meta["norm"], generator=torch.Generator(),
    )
    path = Path(folder) / NETWORK_TENSORS
    try:
        state = load_file(str(path))
        net.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FastddError(f"{path} does not hold the weights of the {meta['model']} its {NETWORK_META} describes "
                          f"({first}); write it again with `fastdd teacher`.") from exc
    return net.to(device), meta


__all__ = [
    "DATA_FIELDS", "NETWORK_FORMAT", "NETWORK_META", "NETWORK_TENSORS", "is_network_folder", "load_network",
    "read_network_meta", "save_network",
]
