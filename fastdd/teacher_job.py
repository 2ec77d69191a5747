"""``fastdd teacher`` as a library call: train one network on the whole real training set and save it as a network
folder (:mod:`fastdd.network_files`), for OAL's ``--teacher`` or the evaluation's ``--init``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

import fastdd
from fastdd.config.teacher import TeacherConfig
from fastdd.data import load_dataset
from fastdd.errors import FastddError
from fastdd.models import build_model_for
from fastdd.network_files import NETWORK_META, save_network
from fastdd.precision import grad_scaler
from fastdd.runtime import kept_heap
from fastdd.training import accuracy, train_epoch


def check_before_start(config: TeacherConfig) -> Path:
    """The output folder, refused before any work when it already holds a network and ``overwrite`` is off."""
    out = Path(config.output_folder())
    if (out / NETWORK_META).exists() and not config.overwrite:
        raise FastddError(f"{out} already holds a network; pass --overwrite to replace it or --out another folder.")
    return out


@kept_heap()
def train_teacher(
    config: TeacherConfig, *, on_epoch: Callable[[int, float], None] | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``config.model`` on all real training images of ``config.dataset`` and write it to the output folder.

    SGD (``lr``, ``momentum``, ``weight_decay``), lr x0.1 after half the epochs, minibatches of ``batch_size`` in an
    order drawn from a generator seeded by ``seed`` (which also draws the initial weights and, with ``dsa``, one
    augmentation per image).

    Args:
        on_epoch: ``on_epoch(epoch, mean loss)`` after every epoch.
    Returns:
        ``(network, metadata written to network.json)``; the metadata holds the test accuracy in %.
    """
    out = check_before_start(config)
    dataset = load_dataset(config.dataset, data_root=config.data_root, image_size=config.image_size, zca=config.zca)
    generator = torch.Generator().manual_seed(config.seed)
    net = build_model_for(dataset, config.model, width=config.width, depth=config.depth, norm=config.norm,
                          generator=generator).to(config.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    strategy = (config.dsa_strategy or dataset.dsa_strategy) if config.dsa else None
    images, labels = dataset.train_images.to(config.device), dataset.train_labels.to(config.device)
    scaler = grad_scaler(config.precision, config.device)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        if epoch == config.epochs // 2 + 1:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        loss = train_epoch(net, optimizer, images, labels, batch_size=config.batch_size, generator=generator,
                           dsa_strategy=strategy, precision=config.precision, grad_scaler=scaler)
        if on_epoch is not None:
            on_epoch(epoch, loss)
    test = 100 * accuracy(net, dataset.test_images.to(config.device), dataset.test_labels.to(config.device))
    meta = {
        "model": config.model, "width": config.width, "depth": config.depth, "norm": config.norm,
        "dataset": dataset.name, "num_classes": dataset.num_classes,
        "image_shape": [dataset.channels, *dataset.image_size], "mean": list(dataset.mean), "std": list(dataset.std),
        "zca": config.zca, "data_root": config.data_root, "test_accuracy": test,
        "train_seconds": round(time.perf_counter() - start, 1), "fastdd_version": fastdd.__version__,
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("quiet", "overwrite", "out")},
    }
    save_network(out, net.cpu(), meta)
    return net, meta
