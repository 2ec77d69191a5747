"""Expert trajectories ("buffers") for trajectory matching: train them into a folder of expert files.

An expert is a network trained on the real data with plain SGD; its trajectory is its flat parameter vector
(``parameters_to_vector`` order) at initialisation and after every epoch. The folder's files (one safetensors file
of snapshots per expert, ``experts.json``, ``metrics.jsonl``) and their lazy reading are :mod:`fastdd.expert_files`.

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
from fastdd.expert_files import (
    EXPERTS_META,
    EXPERTS_METRICS,
    FORMAT,
    ExpertSet,
    expert_file_name,
    list_expert_files,
    load_experts,
    missing_experts,
    read_header,
    write_folder_meta,
    write_snapshots,
)
from fastdd.io import atomic_write, check_writable_folder
from fastdd.models import build_model_for, flat_parameters, parameter_layout
from fastdd.observability import (
    TENSORBOARD_DIR,
    Sinks,
    check_sinks_available,
    optional_sinks,
)
from fastdd.precision import grad_scaler
from fastdd.progress import SHARED_CORES_HINT, Progress, announce
from fastdd.runtime import kept_heap
from fastdd.training import accuracy, train_epoch
from fastdd.trust.outlier_exposure import FreshOutliers


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
        **FreshOutliers.settings(config),
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


@kept_heap()
def train_experts(
    config: ExpertConfig,
    dataset: ImageDataset,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_expert: Callable[[int, float], None] | None = None,
    tensorboard: str | Path | bool | None = None,
    wandb: bool = False,
) -> ExpertSet:
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
        with Progress("experts", len(mine) * config.epochs_trained, unit="epoch", enabled=progress and rank == 0,
                      hint=SHARED_CORES_HINT) as bar:
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
                        write_folder_meta(out, meta, existing)
                    elif rank == 0:  # the experts every rank has finished so far
                        write_folder_meta(out, meta, _check_existing(out, config, digest))
                except OSError as exc:
                    reason = (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")
                    raise FastddError(
                        f"could not write expert {k} into {out} ({reason}); the experts finished before it are kept: "
                        "free some space or fix the folder, then run the same command again."
                    ) from None
                if on_expert is not None:
                    on_expert(k, acc)
    if world == 1:
        write_folder_meta(out, meta, existing)
    else:
        distributed.barrier()  # every expert file is written
        if rank == 0:
            write_folder_meta(out, meta, _check_existing(out, config, digest))
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
    fresh_outliers = FreshOutliers.for_config(config, dataset, data_root=config.data_root)
    scaler = grad_scaler(config.precision, config.device)
    t0 = time.perf_counter()
    for epoch in range(config.epochs_trained):
        outliers = None if fresh_outliers is None else fresh_outliers.epoch(images.shape[0], generator, images.device)
        loss = train_epoch(
            net, optimizer, images, labels,
            batch_size=config.batch_size, generator=generator, dsa_strategy=strategy, outliers=outliers,
            precision=config.precision, grad_scaler=scaler,
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
        bar.advance(loss=loss)
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
    """The :data:`fastdd.expert_files.EXPECT_FIELDS` values that experts trained with ``config`` on ``dataset`` must have.

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


def _check_existing(out: Path, config: ExpertConfig, digest: str) -> dict[int, float]:
    """``{index: test_accuracy}`` of the expert files already in ``out``; other settings raise FastddError."""
    found: dict[int, float] = {}
    for k, path in list_expert_files(out).items():
        header = read_header(path)
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


def ensure_experts(
    config: ExpertConfig, dataset: ImageDataset, folder: str | Path, *, progress: bool = True
) -> ExpertSet:
    """Train the experts ``folder`` lacks (none if it is complete), then load them checked against ``config``.

    Returns:
        Experts ``0 .. config.num_experts - 1`` with ``config.num_snapshots`` snapshots each.
    """
    missing = missing_experts(folder, config.num_experts)
    if missing:
        announce(f"training {len(missing)} expert(s) ({config.dataset}, {config.model}, {config.epochs_trained} epochs "
                 f"each) into {folder}; later runs with the same settings reuse them", enabled=progress)
    else:
        announce(f"using the {config.num_experts} experts cached in {folder}", enabled=progress)
    train_experts(config, dataset, folder, progress=progress)
    return load_experts(
        folder,
        expect=expected_metadata(config, dataset),
        max_snapshots=config.num_snapshots,
        max_experts=config.num_experts,
    )


__all__ = [
    "ExpertConfig",
    "default_expert_folder",
    "ensure_experts",
    "expected_metadata",
    "expert_seed",
    "settings_digest",
    "train_experts",
    "trajectory_settings",
]
