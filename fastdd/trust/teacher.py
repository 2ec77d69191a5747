"""The teacher network of OAL (``--teacher PATH|expert``): an expert from ``fastdd experts`` or a model checkpoint.

Accepted teachers:

- a folder written by ``fastdd teacher`` (``network.json`` + ``network.safetensors``, :mod:`fastdd.network_files`):
  that network, whatever its architecture.
- ``"expert"``: the experts folder recorded in the synthetic set's metadata (``meta["experts"]``, written by the
  trajectory-matching distillers mtt and tesla); expert 0's last stored snapshot.
- a folder holding ``experts.json``: the same, from that folder.
- one expert file ``expert_NNNN.safetensors``: its last snapshot; the architecture comes from the ``experts.json``
  beside it, or else from the synthetic set.
- a checkpoint: a safetensors file of a state dict, or a ``.pt`` / ``.pth`` file read with
  ``torch.load(weights_only=True)`` holding a state dict (optionally under ``"state_dict"`` or ``"model"``) or one
  flat parameter vector (``parameters_to_vector`` order). The architecture is the synthetic set's own: ``model``,
  and ``width`` / ``depth`` / ``norm`` from its hyperparameters.

Nothing is unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdd.errors import FastddError
from fastdd.expert_files import EXPERTS_META, FORMAT, SNAPSHOTS, load_experts, same_setting_value
from fastdd.network_files import DATA_FIELDS, NETWORK_META, is_network_folder, load_network

EXPERT_SPEC = "expert"


def load_teacher(
    spec: str, *, synset_meta: Mapping[str, Any], shape: Any, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load the teacher named by ``spec``, in eval mode with ``requires_grad`` off, on ``device``.

    Args:
        spec: ``"expert"`` or a path (see the module docstring).
        synset_meta: the synthetic set's metadata (``SyntheticSet.meta``): the experts folder for ``"expert"``, the
            architecture for checkpoints, and the dataset / image shape / normalisation an expert must share.
        shape: what the evaluation networks are built for: ``channels``, ``image_size`` (H, W) and ``num_classes``
            attributes (as for ``build_model_for``). The teacher classifies all ``synset_meta["num_classes"]``
            classes (``shape.num_classes`` when the metadata has none); a task restricted to fewer classes uses the
            first ones of the teacher's outputs.
        device: where the teacher lives.

    Returns:
        The network (``embed(x)`` gives its penultimate features; ``forward`` its logits).

    Raises:
        FastddError: ``"expert"`` for a set that records no experts, a missing path, a file that is neither an
            experts folder, an expert file nor a checkpoint of the synthetic set's architecture, or an expert trained
            on other data (dataset, image shape, normalisation) than the synthetic set.
    """
    if spec is None or str(spec).strip() == "":
        raise FastddError("--train-plugin oal needs a teacher: pass --teacher PATH (an experts folder or a checkpoint) "
                          "or --teacher expert.")
    if str(spec) == EXPERT_SPEC:
        recorded = synset_meta.get("experts")
        if not recorded:
            raise FastddError(
                f"this synthetic set ({synset_meta.get('method', 'unknown method')}) records no experts folder; pass "
                "--teacher PATH to an experts folder from `fastdd experts` or to a model checkpoint."
            )
        path = Path(str(recorded)).expanduser()
        if not path.is_dir():
            raise FastddError(
                f"the experts folder {path} recorded in the synthetic set does not exist here; pass --teacher PATH to "
                "that folder (or to a model checkpoint)."
            )
    else:
        path = Path(str(spec)).expanduser()
        if not path.exists():
            raise FastddError(f"the teacher {path} does not exist; pass --teacher an experts folder, an expert file or "
                              "a model checkpoint, or --teacher expert.")
    net = _load(path, synset_meta, shape)
    net = net.to(device).eval()
    net.requires_grad_(False)
    return net


def _load(path: Path, synset_meta: Mapping[str, Any], shape: Any) -> nn.Module:
    if path.is_dir():
        if is_network_folder(path):
            net, meta = load_network(path)
            _check_same_data(path, meta, synset_meta, what="the network")
            return net
        if not (path / EXPERTS_META).is_file():
            raise FastddError(f"{path} is a folder without {EXPERTS_META} or {NETWORK_META}; pass --teacher a folder "
                              "from `fastdd teacher` or `fastdd experts`, an expert file or a model checkpoint.")
        return _from_expert_folder(path, synset_meta, shape)
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path, synset_meta)
        from fastdd.io import check_format

        found = metadata.get("format")
        if isinstance(found, str) and found.startswith(FORMAT.rpartition("/")[0] + "/"):
            check_format(found, FORMAT, path, "an expert file")  # a newer expert format: say so
        if found == FORMAT and SNAPSHOTS in tensors:
            return _from_expert_file(path, tensors[SNAPSHOTS], synset_meta, shape)
        return _from_state(path, tensors, synset_meta, shape)
    if path.suffix in (".pt", ".pth"):
        from fastdd.errors import UnsafeFileError
        from fastdd.io import safe_torch_load

        try:
            obj = safe_torch_load(path, path)
        except UnsafeFileError:
            raise
        except Exception as exc:
            raise _not_a_teacher(path, synset_meta, _first_line(exc)) from exc
        if isinstance(obj, Mapping):
            for key in ("state_dict", "model"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
        return _from_state(path, obj, synset_meta, shape)
    raise _not_a_teacher(path, synset_meta, None)


def _from_expert_folder(folder: Path, synset_meta: Mapping[str, Any], shape: Any) -> nn.Module:
    experts = load_experts(folder, max_experts=1)
    try:
        _check_same_data(folder, experts.meta, synset_meta)
        net = _build_from_expert_meta(folder, experts.meta, shape)
        flat = experts.snapshot(0, experts.num_snapshots - 1)
    finally:
        experts.close()
    return _load_flat(folder, net, flat)


def _from_expert_file(path: Path, snapshots: torch.Tensor, synset_meta: Mapping[str, Any], shape: Any) -> nn.Module:
    meta_path = path.parent / EXPERTS_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise FastddError(f"{meta_path} is not valid JSON ({exc}); pass --teacher another expert.") from exc
        _check_same_data(path.parent, meta, synset_meta)
        net = _build_from_expert_meta(path.parent, meta, shape)
    else:
        net = _build_from_synset(synset_meta, shape)
    if snapshots.dim() != 2 or snapshots.shape[0] == 0:
        raise _not_a_teacher(path, synset_meta, None)
    return _load_flat(path, net, snapshots[-1].float())


def _from_state(path: Path, state: Any, synset_meta: Mapping[str, Any], shape: Any) -> nn.Module:
    net = _build_from_synset(synset_meta, shape)
    if isinstance(state, torch.Tensor) and state.dim() == 1:
        return _load_flat(path, net, state.float())
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise _not_a_teacher(path, synset_meta, None)
    try:
        net.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise _not_a_teacher(path, synset_meta, _first_line(exc)) from exc
    return net


def _read_safetensors(path: Path, synset_meta: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = f.keys()
            tensors = {key: f.get_tensor(key) for key in names}
    except Exception as exc:
        raise _not_a_teacher(path, synset_meta, exc) from exc
    return tensors, metadata


def _load_flat(where: Path, net: nn.Module, flat: torch.Tensor) -> nn.Module:
    expected = sum(p.numel() for p in net.parameters())
    if flat.numel() != expected:
        raise FastddError(
            f"the teacher parameters in {where} hold {flat.numel()} values but the {type(net).__name__} they are "
            f"loaded into has {expected}; pass --teacher a network of the synthetic set's architecture."
        )
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat.to(torch.float32), net.parameters())
    return net


def _build_from_expert_meta(where: Path, meta: Mapping[str, Any], shape: Any) -> nn.Module:
    from fastdd.models import build_model

    image_shape = meta.get("image_shape")
    if not image_shape or "model" not in meta or "num_classes" not in meta:
        raise FastddError(f"{where} does not record the experts' architecture; retrain them with this fastdd version.")
    if list(image_shape) != [shape.channels, *shape.image_size]:
        raise FastddError(
            f"the experts in {where} take images of shape {list(image_shape)} but the evaluation images have shape "
            f"{[shape.channels, *shape.image_size]}; pass --teacher a network trained on this data."
        )
    return build_model(
        meta["model"], channels=image_shape[0], num_classes=int(meta["num_classes"]), image_size=tuple(image_shape[1:]),
        width=meta.get("width", 128), depth=meta.get("depth"), norm=meta.get("norm", "instancenorm"),
        generator=torch.Generator(),
    )


def _build_from_synset(synset_meta: Mapping[str, Any], shape: Any) -> nn.Module:
    from fastdd.models import build_model

    hyper = synset_meta.get("hyperparameters") or {}
    model = synset_meta.get("model") or hyper.get("model") or "convnet"
    return build_model(
        model, channels=shape.channels, num_classes=int(synset_meta.get("num_classes") or shape.num_classes),
        image_size=tuple(shape.image_size), width=hyper.get("width", 128), depth=hyper.get("depth"),
        norm=hyper.get("norm", "instancenorm"), generator=torch.Generator(),
    )


def _check_same_data(
    where: Path, expert_meta: Mapping[str, Any], synset_meta: Mapping[str, Any], what: str = "the experts"
) -> None:
    """The teacher must have seen the synthetic set's data: same dataset, classes, image shape, normalisation."""
    for field in DATA_FIELDS:
        if field not in expert_meta or field not in synset_meta:
            continue
        if not same_setting_value(expert_meta[field], synset_meta[field]):
            raise FastddError(
                f"{what} in {where} have {field} = {expert_meta[field]!r} but the synthetic set has "
                f"{synset_meta[field]!r}; pass a network trained on the synthetic set's data."
            )


def _not_a_teacher(path: Path, synset_meta: Mapping[str, Any], reason: Any) -> FastddError:
    model = synset_meta.get("model") or "convnet"
    because = f" ({reason})" if reason else ""
    return FastddError(
        f"{path} is not an experts folder, an expert file or a checkpoint of a {model} state dict{because}; pass "
        "--teacher one of those."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["EXPERT_SPEC", "load_teacher"]
