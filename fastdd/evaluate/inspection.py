"""``fastdd inspect`` as a library call: the SVD curve of each synthetic set and, unless told not to train, the max
logits and accuracy of networks trained on it (the two diagnostics of "Do Not Overlook Calibration")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from fastdd.data import ImageDataset
from fastdd.errors import FastddError
from fastdd.evaluate.diagnostics import (
    explained_variance_curve,
    max_logit_summary,
    save_explained_variance_plot,
    svd_summary,
    trained_test_logits,
)
from fastdd.io import SyntheticSet

InspectProgress = Callable[[str, int], None]  # (set name, run)


def inspect_sets(
    synsets: list[tuple[str, SyntheticSet]],
    datasets: dict[str, ImageDataset],
    *,
    config: Any,
    model: str | None = None,
    on_epoch: InspectProgress | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Diagnose each named set: its SVD curve, and when ``datasets`` has its name, ``config.runs`` networks (of
    ``model``, default the set's own, else convnet) trained with ``config`` (an :class:`~fastdd.config.EvalConfig`)
    and scored on the test set.

    Returns:
        ``(report, curves, logits)``: the JSON-able report (``{"sets": [entry, ...]}``), each set's SVD curve ``[n]``
        and each trained set's test logits ``[runs, N_test, classes]``.

    Raises:
        FastddError: networks whose test logits are not finite (training diverged).
    """
    report: dict[str, Any] = {"sets": []}
    curves: dict[str, torch.Tensor] = {}
    logits: dict[str, torch.Tensor] = {}
    for name, synset in synsets:
        curves[name] = curve = explained_variance_curve(synset.images)
        meta = synset.meta
        entry: dict[str, Any] = {
            "synset": name, "dataset": meta.get("dataset"), "method": meta.get("method"), "ipc": meta.get("ipc"),
            "images": int(synset.images.shape[0]), "center": False,
            "svd": {**svd_summary(curve), "curve": curve.tolist()},
        }
        if name in datasets:
            chosen = model or meta.get("model") or "convnet"
            logits[name] = trained_test_logits(
                synset, datasets[name], model=chosen, config=config,
                on_epoch=lambda run, epoch, n=name: on_epoch(n, run) if on_epoch is not None else None,
            )
            if not bool(torch.isfinite(logits[name]).all()):
                raise FastddError(
                    f"the networks trained on {name} give non-finite test logits (training diverged); try a lower --lr."
                )
            entry.update(_trained_entry(logits[name], datasets[name], chosen, config))
        report["sets"].append(entry)
    return report, curves, logits


def _trained_entry(logits: torch.Tensor, dataset: ImageDataset, model: str, config: Any) -> dict[str, Any]:
    accs = [100.0 * float((run.argmax(dim=1) == dataset.test_labels).float().mean()) for run in logits]
    acc = torch.tensor(accs, dtype=torch.float64)
    return dict(
        model=model, runs=config.runs, epochs=config.epochs_or_default(), seed=config.seed, test_set=dataset.name,
        max_logit=max_logit_summary(logits.reshape(-1, logits.shape[-1])),
        acc={"mean": float(acc.mean()), "std": float(acc.std(unbiased=False)), "runs": accs},
    )


def save_inspection_plots(curves: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], folder: Path,
                          runs: int) -> list[Path]:
    """``svd.png`` (every set's SVD curve) and, with trained networks, ``max_logits.png`` into ``folder``."""
    from fastdd.evaluate.calibration import save_max_logit_histogram

    paths = [folder / "svd.png"]
    save_explained_variance_plot(curves, paths[0], title="SVD curves of the synthetic sets")
    if logits:
        paths.append(folder / "max_logits.png")
        save_max_logit_histogram(
            {name: values.reshape(-1, values.shape[-1]).max(dim=1).values for name, values in logits.items()},
            paths[1], title=f"max logits on the test set, {runs} run(s) pooled",
        )
    return paths
