"""Expert trajectory files: write, list, read and check a folder of experts (training is in fastdd.distill.experts).

An expert's trajectory is its flat parameter vector (``parameters_to_vector`` order) at initialisation and after
every epoch. A folder of experts holds::

    expert_0000.safetensors   one float32 tensor "snapshots" [S, P] (row s = parameters after s epochs), and
    expert_0001.safetensors   string metadata in the header (settings digest, expert seed, test accuracy, ...)
    ...
    experts.json              what produced them (dataset, model, normalisation, settings, parameter layout) and
                              the test accuracy of each expert's last snapshot
    metrics.jsonl             one line per trained epoch

:func:`load_experts` opens such a folder lazily (headers only) and checks it against the metadata a run needs;
its errors say which ``fastdd experts`` command trains matching experts.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch

from fastdd.config.experts import ExpertConfig
from fastdd.errors import FastddError
from fastdd.io import check_format, write_json
from fastdd.models.registry import default_convnet_depth

FORMAT = "fastdd-experts/1"
EXPERTS_META = "experts.json"
EXPERTS_METRICS = "metrics.jsonl"
SNAPSHOTS = "snapshots"
_EXPERT_FILE = re.compile(r"^expert_(\d{4,})\.safetensors$")

# Metadata a caller may require with `load_experts(expect=...)`; `fastdd.distill.experts.expected_metadata` fills
# all of them.
EXPECT_FIELDS = (
    "dataset", "model", "width", "depth", "norm", "image_shape", "num_classes", "mean", "std", "zca", "num_params",
    "outliers",
)
# Fields that folders written before they existed lack, with the value those folders implicitly have.
_IMPLICIT_FIELDS = {"outliers": "none"}

# -- the file format ------------------------------------------------------------------------------------------------


def expert_file_name(index: int) -> str:
    """``expert_{index:04d}.safetensors``."""
    return f"expert_{index:04d}.safetensors"


def write_snapshots(path: str | Path, snapshots: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write ``snapshots`` ``[S, P]`` (float32) as a safetensors file with one tensor ``"snapshots"``.

    The file is laid out by hand (8-byte little-endian header length, JSON header padded with spaces to a multiple
    of 8, raw little-endian data) because ``safetensors.torch.save_file`` writes the metadata in hash order, which
    changes from one process to the next; here the header is sorted, so equal inputs give equal bytes.
    """
    if snapshots.dim() != 2 or snapshots.dtype != torch.float32:
        raise ValueError(f"snapshots must be a float32 [S, P] tensor, got {snapshots.dtype} {tuple(snapshots.shape)}")
    data = snapshots.detach().to("cpu").contiguous().numpy().astype("<f4", copy=False)
    header = {
        "__metadata__": {str(k): str(v) for k, v in metadata.items()},
        SNAPSHOTS: {"dtype": "F32", "shape": list(data.shape), "data_offsets": [0, data.nbytes]},
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data.tobytes())


def read_header(path: Path) -> dict[str, str]:
    """The string metadata of one expert file (reads only the header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if SNAPSHOTS not in f.keys():
                raise ValueError(f"no {SNAPSHOTS!r} tensor")
            header = dict(f.metadata() or {})
    except Exception as exc:  # foreign or damaged file: one sentence for the user
        raise FastddError(
            f"the expert file {path} could not be read ({exc}); delete it to retrain that expert."
        ) from exc
    if "format" in header:  # experts.json carries the folder's format; a file's own is checked when it has one
        check_format(header["format"], FORMAT, path, "an expert file")
    return header


def missing_experts(folder: str | Path, num_experts: int) -> list[int]:
    """The indices ``0 .. num_experts - 1`` that have no expert file in ``folder`` (all of them without the folder)."""
    folder = Path(folder)
    present = list_expert_files(folder) if folder.is_dir() else {}
    return [k for k in range(num_experts) if k not in present]


def list_expert_files(folder: Path) -> dict[int, Path]:
    """``{index: path}`` of the expert files in ``folder``, by index."""
    files = {}
    for path in folder.iterdir():
        match = _EXPERT_FILE.match(path.name)
        if match:
            files[int(match.group(1))] = path
    return dict(sorted(files.items()))


def write_folder_meta(out: Path, meta: dict[str, Any], accuracies: dict[int, float]) -> None:
    """Write ``experts.json``: ``meta`` plus the list of experts with their test accuracies (unless unchanged)."""
    experts = [
        {"index": k, "file": expert_file_name(k), "test_accuracy": accuracies[k]} for k in sorted(accuracies)
    ]
    content = {**meta, "num_experts": len(experts), "experts": experts}
    try:
        unchanged = json.loads((out / EXPERTS_META).read_text()) == content
    except (OSError, ValueError):
        unchanged = False
    if not unchanged:  # a complete folder is only read (it may be a shared, read-only cache)
        write_json(out / EXPERTS_META, content)


# -- loading --------------------------------------------------------------------------------------------------------


class ExpertSet:
    """A folder of expert trajectories, read lazily from memory-mapped files.

    Only headers are read when the set is loaded. :meth:`snapshot` and :meth:`pair` copy just the requested rows out
    of the mapped file, so only their pages are ever read (a pair of CIFAR-10 ConvNet snapshots is 2.6 MB of a 65 MB
    50-epoch trajectory). The copies are the caller's: changing them changes neither the file nor later reads.

    Attributes:
        folder: the experts folder.
        meta: the contents of ``experts.json``.
        paths: the expert files used, expert ``i`` of this set being ``paths[i]``.
        num_experts: ``len(paths)``.
        num_snapshots: ``S``, snapshots usable per expert (row ``s`` = parameters after ``s`` epochs).
        num_params: ``P``, the flat parameter count (``parameters_to_vector`` order of the model in ``meta``).
    """

    def __init__(self, folder: Path, meta: dict[str, Any], paths: list[Path], num_snapshots: int, num_params: int):
        self.folder = folder
        self.meta = meta
        self.paths = tuple(paths)
        self.num_snapshots = num_snapshots
        self.num_params = num_params
        self._handles: list[Any] = [None] * len(paths)

    @property
    def num_experts(self) -> int:
        return len(self.paths)

    @property
    def test_accuracies(self) -> list[float]:
        """Test accuracy (fraction) of each expert's last stored snapshot, from ``experts.json``."""
        by_file = {e["file"]: e["test_accuracy"] for e in self.meta.get("experts", [])}
        return [float(by_file.get(p.name, float("nan"))) for p in self.paths]

    def snapshot(self, expert: int, index: int) -> torch.Tensor:
        """Parameters of ``expert`` after ``index`` epochs: ``[P]`` float32 on the CPU (a fresh tensor)."""
        self._check(expert, index)
        return self._rows(expert)[index].clone()

    def pair(self, expert: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta_start, theta_target)``: snapshots ``start`` and ``start + length`` of ``expert``, each ``[P]``."""
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self._check(expert, start)
        self._check(expert, start + length)
        rows = self._rows(expert)
        # safetensors hands out views of its private mapping, which later reads would see modified: copy.
        return rows[start].clone(), rows[start + length].clone()

    def trajectory(self, expert: int) -> torch.Tensor:
        """All usable snapshots of ``expert``: ``[num_snapshots, P]`` float32 (reads them all)."""
        self._check(expert, 0)
        return self._rows(expert)[0 : self.num_snapshots].clone()

    def close(self) -> None:
        """Release the file mappings (they are reopened on the next read)."""
        self._handles = [None] * len(self.paths)

    def _rows(self, expert: int):
        if self._handles[expert] is None:
            from safetensors import safe_open

            self._handles[expert] = safe_open(str(self.paths[expert]), framework="pt")
        return self._handles[expert].get_slice(SNAPSHOTS)

    def _check(self, expert: int, index: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} is out of range [0, {self.num_experts})")
        if not 0 <= index < self.num_snapshots:
            raise IndexError(f"snapshot {index} is out of range [0, {self.num_snapshots})")

    def __repr__(self) -> str:
        return (
            f"ExpertSet({str(self.folder)!r}, experts={self.num_experts}, snapshots={self.num_snapshots}, "
            f"params={self.num_params})"
        )


def load_experts(
    folder: str | Path,
    *,
    expect: dict[str, Any] | None = None,
    max_snapshots: int | None = None,
    max_experts: int | None = None,
) -> ExpertSet:
    """Open a folder written by :func:`fastdd.distill.experts.train_experts` (headers only; snapshots are read on demand).

    Args:
        folder: the experts folder.
        expect: metadata the caller requires, e.g. :func:`fastdd.distill.experts.expected_metadata` (keys of ``experts.json``, typically
            :data:`EXPECT_FIELDS`); floats are compared to 1e-6 relative.
        max_snapshots: the number of snapshots the caller needs (``max_start_epoch + expert_epochs + 1``); the set
            exposes exactly that many, and experts with fewer raise. None exposes all.
        max_experts: use experts ``0 .. max_experts - 1`` only (all must be present); None uses every expert file.

    Returns:
        The :class:`ExpertSet`.

    Raises:
        FastddError: a missing or empty folder, a metadata mismatch with ``expect`` (naming the field, the folder's
            value and the expected one), too few snapshots or experts, or unreadable files.
    """
    folder = Path(folder)
    meta_path = folder / EXPERTS_META
    if not folder.is_dir() or not meta_path.is_file():
        raise FastddError(
            f"{folder} holds no expert trajectories (no {EXPERTS_META}); train them with `fastdd experts --out "
            f"{folder}` or pass the right --experts folder."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise FastddError(f"{meta_path} is not valid JSON ({exc}); retrain the experts into a new folder.") from exc
    if not isinstance(meta, dict):
        raise FastddError(f"{meta_path} is not a fastdd experts file (a JSON object was expected).")
    check_format(meta.get("format"), FORMAT, meta_path, "a fastdd experts file")
    if expect:
        _check_expected(folder, meta, expect)

    files = list_expert_files(folder)
    if max_experts is not None:
        absent = [k for k in range(max_experts) if k not in files]
        if absent:
            raise FastddError(
                f"{folder} holds {len(files)} experts but experts 0 to {max_experts - 1} are needed (missing: "
                f"{_short_list(absent)}); train them with `fastdd experts --num-experts {max_experts} --out {folder}` "
                "using the same options as before."
            )
        files = {k: files[k] for k in range(max_experts)}
    if not files:
        raise FastddError(
            f"{folder} holds no expert files yet; train them with `fastdd experts --out {folder}` (an interrupted "
            "run continues where it stopped)."
        )

    from safetensors import safe_open

    shapes = set()
    for path in files.values():
        header = read_header(path)
        if header.get("settings_digest") != meta.get("settings_digest"):
            raise FastddError(
                f"{path} was trained with other settings than {EXPERTS_META} describes; delete it (or the folder) "
                "and train again."
            )
        with safe_open(str(path), framework="pt") as f:
            rows = f.get_slice(SNAPSHOTS)
            shapes.add((tuple(rows.get_shape()), rows.get_dtype()))
    if len(shapes) != 1:
        raise FastddError(f"the expert files in {folder} disagree in shape ({sorted(shapes)}); retrain the folder.")
    (shape, dtype), = shapes
    if len(shape) != 2 or dtype != "F32":
        raise FastddError(f"the expert files in {folder} hold {dtype} {list(shape)}, not float32 [S, P].")
    available, num_params = shape
    if num_params != meta.get("num_params"):
        raise FastddError(
            f"the expert files in {folder} hold {num_params} parameters but {EXPERTS_META} says "
            f"{meta.get('num_params')}; retrain the folder."
        )
    num_snapshots = available
    if max_snapshots is not None:
        if max_snapshots > available:
            raise FastddError(
                f"the experts in {folder} have {available} snapshots ({available - 1} epochs) but "
                f"{max_snapshots} are needed (max_start_epoch + expert_epochs + 1); lower --max-start-epoch or "
                f"--expert-epochs, or retrain with `fastdd experts --epochs {max_snapshots - 1}`."
            )
        num_snapshots = max_snapshots
    return ExpertSet(folder, meta, list(files.values()), num_snapshots, num_params)


def _check_expected(folder: Path, meta: dict[str, Any], expect: dict[str, Any]) -> None:
    for field, wanted in expect.items():
        if field not in meta and field in _IMPLICIT_FIELDS:
            meta = {**meta, field: _IMPLICIT_FIELDS[field]}
        if field not in meta:
            raise FastddError(
                f"{folder / EXPERTS_META} does not record {field!r}; retrain the experts with this fastdd version "
                "or pass the right --experts folder."
            )
        have = meta[field]
        if not same_setting_value(have, wanted):
            raise FastddError(
                f"the experts in {folder} have {field} = {_show(have)} but this run needs {field} = {_show(wanted)}; "
                f"retrain them with `{_retrain_command(expect, meta)}` or pass the right --experts folder."
            )


def same_setting_value(a: Any, b: Any) -> bool:
    """Equal settings as read back from JSON: lists element-wise, bools only to bools, floats to 1e-6 relative."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_setting_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
        return False
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value) if isinstance(value, str) else str(value)


def _retrain_command(expect: dict[str, Any], meta: dict[str, Any]) -> str:
    """The ``fastdd experts`` command that trains experts matching ``expect`` (default options left out)."""

    def pick(key: str) -> Any:
        return expect.get(key, meta.get(key))

    parts = ["fastdd experts", f"--dataset {pick('dataset')}", f"--model {pick('model')}"]
    defaults = ExpertConfig.__dataclass_fields__  # a retrain command leaves out `fastdd experts`' defaults
    if pick("width") not in (None, defaults["width"].default):
        parts.append(f"--width {pick('width')}")
    depth, shape = expect.get("depth"), pick("image_shape")
    if depth is not None and not (pick("model") == "convnet" and shape and depth == default_convnet_depth(shape[1:])):
        parts.append(f"--depth {depth}")
    if pick("norm") not in (None, defaults["norm"].default):
        parts.append(f"--norm {pick('norm')}")
    if pick("zca"):
        parts.append("--zca")
    if pick("outliers") not in (None, "none"):
        parts.append(f"--outliers {pick('outliers')}")
    return " ".join(parts)


def _short_list(values: list[int]) -> str:
    return ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")

__all__ = [
    "EXPECT_FIELDS",
    "EXPERTS_META",
    "EXPERTS_METRICS",
    "ExpertSet",
    "FORMAT",
    "SNAPSHOTS",
    "expert_file_name",
    "list_expert_files",
    "load_experts",
    "missing_experts",
    "read_header",
    "same_setting_value",
    "write_folder_meta",
    "write_snapshots",
]
