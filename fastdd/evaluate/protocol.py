"""The train-on-synthetic, test-on-real protocol: how each fresh evaluation network is built and trained on a synthetic
set. `fastdd.evaluate.plan` strings these into an evaluation scored on real data."""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastdd.config.evaluate import EvalConfig
from fastdd.data import ImageDataset, load_dataset
from fastdd.errors import FastddError
from fastdd.io import SyntheticSet
from fastdd.models import build_model_for
from fastdd.precision import grad_scaler
from fastdd.runtime import kept_heap
from fastdd.training import TrainObjective, train_epoch
from fastdd.trust.outlier_loss import OutlierBatches

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


def evaluation_network(
    shape: Any, model: str, synset_meta: dict[str, Any], *, generator: torch.Generator, device: str = "cpu"
) -> torch.nn.Module:
    """A fresh evaluation network for ``shape`` (``channels``, ``num_classes``, ``image_size``): the width, depth and
    norm the set was distilled with when ``model`` is its distillation model, the defaults otherwise."""
    hyper = synset_meta.get("hyperparameters", {})
    same_as_distillation = model == synset_meta.get("model")
    return build_model_for(
        shape,
        model,
        width=hyper.get("width", 128) if same_as_distillation else 128,
        depth=hyper.get("depth") if same_as_distillation else None,
        norm=hyper.get("norm", "instancenorm") if same_as_distillation else "instancenorm",
        generator=generator,
    ).to(device)


@kept_heap()
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
    outliers: OutlierBatches | None = None,
    objective: TrainObjective | None = None,
) -> torch.nn.Module:
    """Train ``net`` on ``images`` ``[K, C, H, W]`` with ``targets`` (``[K]`` labels or ``[K, classes]`` soft labels).

    SGD with momentum and weight decay, lr x0.1 at half the epochs, DSA per image when ``dsa_strategy`` is given.
    With ``outliers`` each minibatch also carries its share of those outlier images and the loss is TrustDD's
    integrated loss (see `fastdd.training.train_epoch`). ``objective`` replaces the
    cross-entropy (`fastdd.trust.train_losses`, `fastdd.trust.oal`); when it is an ``nn.Module`` its own trainable
    parameters (e.g. OAL's projection networks) are trained by the same SGD optimiser, in the groups of its
    ``parameter_groups(lr)`` when it has one (OAL's authors' recipe trains its CLUB networks at another rate).
    """
    device = next(net.parameters()).device
    images, targets = images.to(device), targets.to(device)
    if outliers is not None:
        outliers = outliers.to(device)
    groups: list[dict[str, Any]] = [{"params": list(net.parameters()), "lr": lr}]
    if hasattr(objective, "parameter_groups"):
        groups += objective.parameter_groups(lr)
    elif isinstance(objective, torch.nn.Module):
        groups.append({"params": [p for p in objective.parameters() if p.requires_grad], "lr": lr})
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    epochs = config.epochs_or_default()
    decay_at = epochs // 2 + 1
    scaler = grad_scaler(config.precision, device)
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
            outliers=outliers,
            objective=objective,
            precision=config.precision,
            grad_scaler=scaler,
        )
        if on_epoch is not None:
            on_epoch(epoch)
    return net
