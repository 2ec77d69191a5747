"""Expert trajectories ("buffers") for trajectory matching: train them, store them, read snapshot pairs lazily.

An expert is a network trained on the real data with plain SGD; its trajectory is its flat parameter vector
(``parameters_to_vector`` order) at initialisation and after every epoch. A folder of experts holds::

    expert_0000.safetensors   one float32 tensor "snapshots" [S, P] (row s = parameters after s epochs), and
    expert_0001.safetensors   string metadata in the header (settings digest, expert seed, test accuracy, ...)
    ...
    experts.json              what produced them (dataset, model, normalisation, settings, parameter layout) and
                              the test accuracy of each expert's last snapshot
    metrics.jsonl             one line per trained epoch

Each expert file is written atomically once the expert is finished, so an interrupted run keeps every finished
expert, and training into a folder again trains only the experts it lacks. Expert ``k`` draws its initial
parameters, minibatch orders and augmentations from its own generator seeded by ``expert_seed(seed, k)``, so it
does not depend on which other experts were trained before it (a folder can be extended, and experts are split over
processes under torch.distributed: ``fastdd experts --nproc N``). Same settings and seed on the same backend and
number of CPU threads give bit-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import time
from pathlib import Path
from typing import Any, Callable

import torch

import fastdd
from fastdd.config.experts import ExpertConfig
from fastdd.data import ImageDataset
from fastdd.data.registry import get_spec
from fastdd.distill import distributed
from fastdd.errors import FastddError
from fastdd.io import atomic_write, check_format, check_writable_folder, write_json
from fastdd.models import build_model_for, flat_parameters, parameter_layout
from fastdd.models.registry import default_convnet_depth
from fastdd.observability import TENSORBOARD_DIR, Sinks, check_sinks_available, optional_sinks
from fastdd.training import accuracy, train_epoch
from fastdd.trust.outliers import outlier_source

FORMAT = "fastdd-experts/1"
EXPERTS_META = "experts.json"
EXPERTS_METRICS = "metrics.jsonl"
SNAPSHOTS = "snapshots"
_EXPERT_FILE = re.compile(r"^expert_(\d{4,})\.safetensors$")

# Metadata a caller may require with `load_experts(expect=...)`; `expected_metadata` fills all of them.
EXPECT_FIELDS = (
    "dataset", "model", "width", "depth", "norm", "image_shape", "num_classes", "mean", "std", "zca", "num_params",
    "outliers",
)
# Fields that folders written before they existed lack, with the value those folders implicitly have.
_IMPLICIT_FIELDS = {"outliers": "none"}


def expert_seed(seed: int, index: int) -> int:
    """The seed of expert ``index``'s generator: a 63-bit hash of ``(seed, index)``, independent of other experts."""
    digest = hashlib.sha256(f"fastdd-expert:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def trajectory_settings(config: ExpertConfig) -> dict[str, Any]:
    """The settings that determine the contents of an expert file (not how many experts, nor the device).

    Two configs with equal settings produce interchangeable experts, so they may share a folder.
    """
    dataset = get_spec(config.dataset).name
    data_root = config.data_root
    if dataset == "imagefolder" and data_root is not None:  # there the folder IS the dataset
        data_root = str(Path(data_root).expanduser().resolve())
    else:
        data_root = None
    return {
        "dataset": dataset,
        "data_root": data_root,
        "image_size": config.image_size,
        "zca": bool(config.zca),
        "model": config.model.lower(),
        "width": config.width,
        "depth": config.depth,
        "norm": config.norm,
        "epochs": config.epochs_trained,
        "lr_teacher": float(config.lr_teacher),
        "momentum": float(config.momentum),
        "weight_decay": float(config.weight_decay),
        "batch_size": config.batch_size,
        "dsa_strategy": (config.dsa_strategy or "default") if config.dsa else None,
        "seed": config.seed,
        **_outlier_settings(config),
    }


def _outlier_settings(config: ExpertConfig) -> dict[str, Any]:
    """The TrustDD settings of the experts; empty without outliers, so older folders keep their digest."""
    if config.outliers == "none":
        return {}
    data = config.outlier_data
    if data is not None and Path(data).expanduser().exists():
        data = str(Path(data).expanduser().resolve())
    return {
        "outliers": config.outliers,
        "outlier_data": data,
        "outlier_ratio": float(config.outlier_ratio),
        "outlier_weight": float(config.outlier_weight),
    }


def settings_digest(config: ExpertConfig) -> str:
    """A hex SHA-256 of :func:`trajectory_settings` (stored in every expert file and in ``experts.json``)."""
    text = json.dumps(trajectory_settings(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def default_expert_folder(config: ExpertConfig, root: str | Path) -> Path:
    """A stable cache folder for these settings: ``root / "experts-<dataset>-<model>-<digest[:12]>"``.

    Configs that differ only in ``num_experts``, ``device`` or (except for imagefolder) ``data_root`` share it.
    """
    settings = trajectory_settings(config)
    return Path(root) / f"experts-{settings['dataset']}-{settings['model']}-{settings_digest(config)[:12]}"


# -- training -------------------------------------------------------------------------------------------------------


def train_experts(
    config: ExpertConfig,
    dataset: ImageDataset,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_expert: Callable[[int, float], None] | None = None,
    tensorboard: str | Path | bool | None = None,
    wandb: bool = False,
) -> "ExpertSet":
    """Train the experts ``0 .. num_experts - 1`` that ``out_dir`` does not hold yet, then load the folder.

    Args:
        config: the training settings.
        dataset: the loaded data (``load_dataset(config.dataset, ...)``): ``train_images [N, C, H, W]``.
        out_dir: the experts folder; created if needed. Experts already in it must have the same settings.
        progress: show a rich progress bar over all epochs still to train, with the loss and ETA.
        on_expert: called as ``on_expert(index, test_accuracy)`` after each newly trained expert is saved.
        tensorboard: also write TensorBoard event files, one run per newly trained expert in
            ``<tensorboard>/expert_KKKK`` (True: ``out_dir/tensorboard``): ``loss`` and ``seconds`` per epoch (step =
            epoch) and ``test_accuracy`` at the last epoch, the numbers of ``metrics.jsonl``. A retrained (earlier
            interrupted) expert hides its partial curve.
        wandb: the same scalars to one Weights & Biases run per newly trained expert, named ``FOLDER/expert_KKKK``
            in group ``FOLDER`` (see :class:`fastdd.observability.WandbSink` for the mode).

    In a process group (see :mod:`fastdd.distill.distributed`) every rank calls this with the same arguments: the
    missing experts are dealt out in turn (the ``j``-th missing expert to rank ``j % world``), each rank trains
    its own from their own seeds (so the files equal those of one process), and rank 0 writes ``experts.json``
    once all are saved; every rank then returns the complete set.

    Returns:
        The experts ``0 .. num_experts - 1`` of the folder (``num_snapshots = config.num_snapshots``).

    Raises:
        FastddError: the folder holds experts trained with other settings, or an unreadable expert file.
    """
    if get_spec(config.dataset).name != dataset.name:
        raise ValueError(f"config.dataset is {config.dataset!r} but the dataset given is {dataset.name!r}")
    out = Path(out_dir)
    if tensorboard is True:
        tensorboard = out / TENSORBOARD_DIR
    elif tensorboard is False:
        tensorboard = None
    check_sinks_available(tensorboard=tensorboard is not None, wandb=wandb)
    out.mkdir(parents=True, exist_ok=True)
    digest = settings_digest(config)
    existing = _check_existing(out, config, digest)
    missing = [k for k in range(config.num_experts) if k not in existing]
    rank, world = distributed.rank(), distributed.world_size()
    distributed.barrier()  # every rank has read the folder before any writes into it
    mine = missing[rank::world]
    device = torch.device(config.device)
    strategy = (config.dsa_strategy or dataset.dsa_strategy) if config.dsa else None
    meta = _folder_meta(config, dataset, digest, strategy)
    if mine:  # pre-flight: the folder takes files and the disk has room for this rank's new trajectories
        check_writable_folder(out, need_bytes=len(mine) * config.num_snapshots * meta["num_params"] * 4)
        train_images = dataset.train_images.to(device)
        train_labels = dataset.train_labels.to(device)
        test_images = dataset.test_images.to(device)
        test_labels = dataset.test_labels.to(device)
        with _EpochProgress(len(mine) * config.epochs_trained, enabled=progress and rank == 0) as bar:
            for n, k in enumerate(mine):
                bar.describe(f"expert {k} ({n + 1}/{len(mine)})")
                name = f"expert_{k:04d}"
                sinks = Sinks(optional_sinks(
                    tensorboard=Path(tensorboard) / name if tensorboard is not None else None, wandb=wandb,
                    name=f"{out.name}/{name}", group=out.name, folder=out, first_step=1,
                    config={**trajectory_settings(config), "expert": k},
                ))
                with sinks:
                    snapshots, loss = _train_one(
                        config, dataset, k, strategy, train_images, train_labels, out, bar, sinks
                    )
                    acc = _final_accuracy(config, dataset, snapshots[-1], test_images, test_labels)
                    sinks.log_scalars({"expert": k, "test_accuracy": acc}, config.epochs_trained)
                header = {
                    "format": FORMAT,
                    "fastdd_version": fastdd.__version__,
                    "dataset": dataset.name,
                    "model": meta["model"],
                    "expert": str(k),
                    "expert_seed": str(expert_seed(config.seed, k)),
                    "num_params": str(snapshots.shape[1]),
                    "num_snapshots": str(snapshots.shape[0]),
                    "settings_digest": digest,
                    "final_train_loss": repr(loss),
                    "test_accuracy": repr(acc),
                }
                path = out / expert_file_name(k)
                try:
                    atomic_write(path, lambda tmp: write_snapshots(tmp, snapshots, header), durable=True)
                    existing[k] = acc
                    _append_metrics(out, {"expert": k, "test_accuracy": acc})
                    if world == 1:
                        _write_folder_meta(out, meta, existing)
                    elif rank == 0:  # the experts every rank has finished so far
                        _write_folder_meta(out, meta, _check_existing(out, config, digest))
                except OSError as exc:
                    reason = (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")
                    raise FastddError(
                        f"could not write expert {k} into {out} ({reason}); the experts finished before it are kept: "
                        "free some space or fix the folder, then run the same command again."
                    ) from None
                if on_expert is not None:
                    on_expert(k, acc)
    if world == 1:
        _write_folder_meta(out, meta, existing)
    else:
        distributed.barrier()  # every expert file is written
        if rank == 0:
            _write_folder_meta(out, meta, _check_existing(out, config, digest))
        distributed.barrier()  # experts.json is complete
    return load_experts(out, max_experts=config.num_experts, max_snapshots=config.num_snapshots)


def _train_one(config, dataset, index, strategy, images, labels, out, bar, sinks) -> tuple[torch.Tensor, float]:
    """Train expert ``index``; returns its snapshots ``[epochs_trained + 1, P]`` (CPU float32) and last loss."""
    generator = torch.Generator()
    generator.manual_seed(expert_seed(config.seed, index))
    net = _build(config, dataset, generator).to(config.device)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=config.lr_teacher, momentum=config.momentum, weight_decay=config.weight_decay
    )
    first = flat_parameters(net).detach()
    snapshots = torch.empty(config.num_snapshots, first.numel(), dtype=torch.float32)
    snapshots[0] = first
    loss = float("nan")
    source = outlier_source(
        config.outliers, dataset, outlier_data=config.outlier_data, data_root=config.data_root
    )
    t0 = time.perf_counter()
    for epoch in range(config.epochs_trained):
        outliers = None
        if source is not None:
            count = max(1, round(config.outlier_ratio * images.shape[0]))
            outliers = source.sample(count, generator).to(images.device)
        loss = train_epoch(
            net, optimizer, images, labels,
            batch_size=config.batch_size, generator=generator, dsa_strategy=strategy,
            outliers=outliers, outlier_weight=config.outlier_weight,
        )
        if not math.isfinite(loss):
            raise FastddError(
                f"expert {index} diverged (loss {loss} in epoch {epoch + 1}); lower --lr-teacher. Finished experts "
                f"in {out} were kept."
            )
        snapshots[epoch + 1] = flat_parameters(net).detach()
        record = {"expert": index, "epoch": epoch + 1, "loss": loss, "seconds": round(time.perf_counter() - t0, 3)}
        _append_metrics(out, record)
        sinks.log_scalars(record, epoch + 1)
        bar.advance(loss)
    return snapshots, loss


def _build(config: ExpertConfig, dataset: ImageDataset, generator: torch.Generator | None) -> torch.nn.Module:
    return build_model_for(
        dataset, config.model, width=config.width, depth=config.depth, norm=config.norm, generator=generator
    )


@torch.no_grad()
def _final_accuracy(config, dataset, flat: torch.Tensor, test_images, test_labels) -> float:
    net = _build(config, dataset, torch.Generator()).to(config.device)
    torch.nn.utils.vector_to_parameters(flat.to(config.device), net.parameters())
    return accuracy(net, test_images, test_labels)


def expected_metadata(config: ExpertConfig, dataset: ImageDataset) -> dict[str, Any]:
    """The :data:`EXPECT_FIELDS` values that experts trained with ``config`` on ``dataset`` must have.

    ``depth`` is the network's actual depth (the ConvNet default for the image size when ``config.depth`` is None;
    None for other models) and ``num_params`` its parameter count ``P``.
    """
    net = _build(config, dataset, torch.Generator())
    return {
        "dataset": dataset.name,
        "model": config.model.lower(),
        "width": config.width,
        "depth": getattr(net, "depth", None),
        "norm": config.norm,
        "image_shape": [dataset.channels, *dataset.image_size],
        "num_classes": dataset.num_classes,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "zca": dataset.zca is not None,
        "num_params": parameter_layout(net).numel,
        "outliers": config.outliers,
    }


def _folder_meta(config: ExpertConfig, dataset: ImageDataset, digest: str, strategy: str | None) -> dict[str, Any]:
    net = _build(config, dataset, torch.Generator())
    layout = parameter_layout(net)
    meta = expected_metadata(config, dataset)
    meta.update(
        {
            "format": FORMAT,
            "fastdd_version": fastdd.__version__,
            "class_names": list(dataset.class_names),
            "data_root": config.data_root,
            "image_size": config.image_size,
            "dsa": bool(config.dsa),
            "dsa_strategy": strategy,
            "seed": config.seed,
            "lr_teacher": float(config.lr_teacher),
            "momentum": float(config.momentum),
            "weight_decay": float(config.weight_decay),
            "batch_size": config.batch_size,
            "epochs": config.epochs,
            "epochs_trained": config.epochs_trained,
            "keep_snapshots": config.keep_snapshots,
            "num_snapshots": config.num_snapshots,
            "parameter_layout": [
                {"name": name, "shape": list(shape)} for name, shape in zip(layout.names, layout.shapes)
            ],
            "settings": trajectory_settings(config),
            "settings_digest": digest,
        }
    )
    return meta


def _write_folder_meta(out: Path, meta: dict[str, Any], accuracies: dict[int, float]) -> None:
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


def _check_existing(out: Path, config: ExpertConfig, digest: str) -> dict[int, float]:
    """``{index: test_accuracy}`` of the expert files already in ``out``; other settings raise FastddError."""
    found: dict[int, float] = {}
    for k, path in _expert_files(out).items():
        header = _read_header(path)
        if header.get("settings_digest") != digest:
            raise FastddError(
                f"{out} holds experts trained with other settings ({_settings_difference(out, config)}); "
                "choose another --out, or delete that folder to retrain."
            )
        found[k] = float(header.get("test_accuracy", "nan"))
    return found


def _settings_difference(out: Path, config: ExpertConfig) -> str:
    try:
        saved = json.loads((out / EXPERTS_META).read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return f"see {EXPERTS_META}"
    wanted = trajectory_settings(config)
    for key in wanted:
        if saved.get(key) != wanted[key]:
            return f"{key} {saved.get(key)!r} there, {wanted[key]!r} now"
    return f"see {EXPERTS_META}"


def _append_metrics(out: Path, record: dict[str, Any]) -> None:
    with open(out / EXPERTS_METRICS, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


class _EpochProgress:
    """A rich progress bar over epochs with the last loss and ETA; does nothing when disabled."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.enabled = enabled and total > 0
        if self.enabled:
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("epochs  loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("experts", total=total, loss="-")

    def __enter__(self) -> "_EpochProgress":
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)

    def describe(self, text: str) -> None:
        if self.enabled:
            self.progress.update(self.task, description=text)

    def advance(self, loss: float) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1, loss=f"{loss:.4g}")


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


def _read_header(path: Path) -> dict[str, str]:
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
    present = _expert_files(folder) if folder.is_dir() else {}
    return [k for k in range(num_experts) if k not in present]


def _expert_files(folder: Path) -> dict[int, Path]:
    files = {}
    for path in folder.iterdir():
        match = _EXPERT_FILE.match(path.name)
        if match:
            files[int(match.group(1))] = path
    return dict(sorted(files.items()))


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
    """Open a folder written by :func:`train_experts` (headers only; snapshots are read on demand).

    Args:
        folder: the experts folder.
        expect: metadata the caller requires, e.g. :func:`expected_metadata` (keys of ``experts.json``, typically
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

    files = _expert_files(folder)
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
        header = _read_header(path)
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
    if pick("width") not in (None, ExpertConfig.width):
        parts.append(f"--width {pick('width')}")
    depth, shape = expect.get("depth"), pick("image_shape")
    if depth is not None and not (pick("model") == "convnet" and shape and depth == default_convnet_depth(shape[1:])):
        parts.append(f"--depth {depth}")
    if pick("norm") not in (None, ExpertConfig.norm):
        parts.append(f"--norm {pick('norm')}")
    if pick("zca"):
        parts.append("--zca")
    if pick("outliers") not in (None, "none"):
        parts.append(f"--outliers {pick('outliers')}")
    return " ".join(parts)


def _short_list(values: list[int]) -> str:
    return ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")


def ensure_experts(
    config: ExpertConfig, dataset: ImageDataset, folder: str | Path, *, progress: bool = True
) -> ExpertSet:
    """Train the experts ``folder`` lacks (none if it is complete), then load them checked against ``config``.

    Returns:
        Experts ``0 .. config.num_experts - 1`` with ``config.num_snapshots`` snapshots each.
    """
    train_experts(config, dataset, folder, progress=progress)
    return load_experts(
        folder,
        expect=expected_metadata(config, dataset),
        max_snapshots=config.num_snapshots,
        max_experts=config.num_experts,
    )


__all__ = [
    "EXPECT_FIELDS",
    "ExpertConfig",
    "ExpertSet",
    "default_expert_folder",
    "ensure_experts",
    "expected_metadata",
    "expert_file_name",
    "expert_seed",
    "load_experts",
    "missing_experts",
    "settings_digest",
    "train_experts",
    "trajectory_settings",
    "write_snapshots",
]
