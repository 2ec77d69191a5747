"""The train-on-synthetic, test-on-real protocol: fresh networks trained on a synthetic set, scored on real data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastdd.data import ImageDataset, load_dataset
from fastdd.errors import FastddError
from fastdd.io import SyntheticSet
from fastdd.models import build_model_for
from fastdd.training import accuracy, train_epoch

DEFAULT_LR = 0.01


@dataclass
class EvalConfig:
    """How each evaluation network is trained (defaults: the protocol of the DC/DSA/MTT papers).

    ``epochs=None`` means 1000 with DSA and 300 without; ``lr=None`` means the synthetic set's learned ``syn_lr``
    when it has one, else 0.01. The learning rate is multiplied by 0.1 from epoch ``epochs // 2 + 1`` on.
    """

    runs: int = 5
    epochs: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    seed: int = 0
    device: str = "cpu"

    def epochs_or_default(self) -> int:
        return self.epochs if self.epochs is not None else (1000 if self.dsa else 300)


def dataset_for_synset(synset: SyntheticSet, *, data_root: str | None = None) -> ImageDataset:
    """Load the real dataset a synthetic set was distilled from, with the same normalisation / ZCA."""
    meta = synset.meta
    if "dataset" not in meta:
        raise FastddError("the synthetic set's synset.json does not name its dataset; it was not written by fastdd.")
    dataset = load_dataset(
        meta["dataset"],
        data_root=data_root if data_root is not None else meta.get("data_root"),
        image_size=meta.get("image_size"),
        zca=bool(meta.get("zca", False)),
    )
    expected = (dataset.channels, *dataset.image_size)
    if tuple(synset.images.shape[1:]) != expected:
        raise FastddError(
            f"the synthetic images have shape {tuple(synset.images.shape[1:])} but {dataset.name} images have shape "
            f"{expected}; pass the --data-root the set was distilled from."
        )
    return dataset


def train_on_synthetic(
    images: torch.Tensor,
    targets: torch.Tensor,
    net: torch.nn.Module,
    *,
    config: EvalConfig,
    lr: float,
    generator: torch.Generator,
    dsa_strategy: str | None,
    on_epoch: Callable[[int], None] | None = None,
) -> torch.nn.Module:
    """Train ``net`` on ``images`` ``[K, C, H, W]`` with ``targets`` (``[K]`` labels or ``[K, classes]`` soft labels).

    SGD with momentum and weight decay, lr x0.1 at half the epochs, DSA per image when ``dsa_strategy`` is given.
    """
    device = next(net.parameters()).device
    images, targets = images.to(device), targets.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    epochs = config.epochs_or_default()
    decay_at = epochs // 2 + 1
    for epoch in range(epochs):
        if epoch == decay_at:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        train_epoch(
            net,
            optimizer,
            images,
            targets,
            batch_size=config.batch_size,
            generator=generator,
            dsa_strategy=dsa_strategy,
        )
        if on_epoch is not None:
            on_epoch(epoch)
    return net


def evaluate_synthetic_set(
    synset: SyntheticSet,
    dataset: ImageDataset,
    *,
    models: list[str],
    config: EvalConfig | None = None,
    on_epoch: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``config.runs`` fresh networks of each of ``models`` on ``synset`` and test them on ``dataset``.

    Returns:
        ``{"dataset", "method", "ipc", "epochs", "lr", "runs", "models": {name: {"acc": {"mean", "std", "runs"}}}}``
        with accuracies in percent (std over runs, population form as in the papers).
    """
    config = config or EvalConfig()
    if config.runs < 1:
        raise FastddError(f"--runs must be at least 1, got {config.runs}.")
    meta = synset.meta
    hyper = meta.get("hyperparameters", {})
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    lr = config.lr if config.lr is not None else (float(synset.syn_lr) if synset.syn_lr is not None else DEFAULT_LR)
    targets = synset.soft_labels if synset.soft_labels is not None else synset.labels
    strategy = (meta.get("dsa_strategy") or dataset.dsa_strategy) if config.dsa else None
    results: dict[str, Any] = {}
    for model in models:
        same_as_distillation = model == meta.get("model")
        accs = []
        for run in range(config.runs):
            net = build_model_for(
                dataset,
                model,
                width=hyper.get("width", 128) if same_as_distillation else 128,
                depth=hyper.get("depth") if same_as_distillation else None,
                norm=hyper.get("norm", "instancenorm") if same_as_distillation else "instancenorm",
                generator=generator,
            ).to(config.device)
            callback = (lambda epoch, m=model, r=run: on_epoch(m, r, epoch)) if on_epoch else None
            train_on_synthetic(
                synset.images,
                targets,
                net,
                config=config,
                lr=lr,
                generator=generator,
                dsa_strategy=strategy,
                on_epoch=callback,
            )
            accs.append(100.0 * accuracy(net, dataset.test_images, dataset.test_labels))
        acc = torch.tensor(accs, dtype=torch.float64)
        results[model] = {
            "acc": {"mean": float(acc.mean()), "std": float(acc.std(unbiased=False)), "runs": accs}
        }
    return {
        "dataset": dataset.name,
        "method": meta.get("method"),
        "ipc": meta.get("ipc"),
        "epochs": config.epochs_or_default(),
        "lr": lr,
        "runs": config.runs,
        "dsa": config.dsa,
        "seed": config.seed,
        "models": results,
    }
