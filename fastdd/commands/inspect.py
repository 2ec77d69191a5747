"""``fastdd inspect``: SVD curve and max-logit spread of synthetic sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer

from fastdd.commands.errors import user_errors
from fastdd.commands.models_option import split_models
from fastdd.errors import FastddError
from fastdd.progress import SHARED_CORES_HINT, Progress


@user_errors
def inspect_command(
    synset_dirs: list[Path] = typer.Argument(..., help="Folders written by `fastdd distill`."),
    plots: Optional[Path] = typer.Option(
        None, "--plots", help="Folder for svd.png (the SVD curves of all sets, with the diagonal) and max_logits.png "
        "(histograms of their max logits; not with --no-train).",
    ),
    no_train: bool = typer.Option(False, "--no-train", help="Only the SVD curves: train no networks."),
    model: Optional[str] = typer.Option(
        None, help="Architecture to train (default: the one the set was distilled with, else convnet)."
    ),
    runs: int = typer.Option(1, help="Fresh networks per set; their test-set max logits are pooled."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default 1000 with DSA, 300 without)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the set's learned lr, else 0.01)."),
    dsa: bool = typer.Option(True, "--dsa/--no-dsa", help="Augment while training on the synthetic set."),
    seed: int = typer.Option(0, help="Seed of the training generator."),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (default: the one used to distill)."),
    device: str = typer.Option("cpu", help="Torch device."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results (and full curves) to this "
                                            "JSON file."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Print two diagnostics of synthetic sets from "Do Not Overlook Calibration": the SVD curve (cumulative sum of
    the singular values of the flattened, uncentred images over their total; near the diagonal = evenly spread
    information) at a few fractions of the components, with the components needed for 50/90/99 %; and the max-logit
    spread (mean, std, percentiles) on the real test set of networks trained on each set, the networks of `fastdd
    evaluate --models MODEL --ignore-outliers` with the same options (cross-entropy)."""
    import torch

    from fastdd.evaluate import EvalConfig, dataset_for_synset
    from fastdd.evaluate.diagnostics import (
        explained_variance_curve,
        max_logit_summary,
        save_explained_variance_plot,
        svd_summary,
        trained_test_logits,
    )
    from fastdd.io import SyntheticSet, write_json

    if runs < 1:
        raise FastddError(f"--runs must be at least 1, got {runs}.")
    if epochs is not None and epochs < 1:
        raise FastddError(f"--epochs must be at least 1, got {epochs}.")
    chosen_model = split_models([model])[0] if model is not None else None
    # Read every set (and its dataset) before any training, so bad input fails at once.
    synsets = [(str(folder), SyntheticSet.load(folder)) for folder in synset_dirs]
    datasets = {} if no_train else {name: dataset_for_synset(s, data_root=data_root) for name, s in synsets}
    config = EvalConfig(runs=runs, epochs=epochs, lr=lr, dsa=dsa, seed=seed, device=device)

    def model_of(synset: SyntheticSet) -> str:
        return chosen_model or synset.meta.get("model") or "convnet"

    logits: dict[str, torch.Tensor] = {}

    def train_all(on_epoch: Callable[[str, int], None]) -> None:
        for name, synset in synsets:
            logits[name] = trained_test_logits(
                synset, datasets[name], model=model_of(synset), config=config,
                on_epoch=lambda run, epoch, n=name: on_epoch(n, run),
            )
            if not bool(torch.isfinite(logits[name]).all()):
                raise FastddError(
                    f"the networks trained on {name} give non-finite test logits (training diverged); try a lower --lr."
                )

    if not no_train:
        total = len(synsets) * runs * config.epochs_or_default()
        with Progress("inspect", total, unit="epoch", enabled=not quiet, hint=SHARED_CORES_HINT) as progress:
            train_all(lambda name, run: progress.advance(description=f"inspect {name} run {run + 1}/{runs}"))

    curves: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"sets": []}
    for name, synset in synsets:
        meta = synset.meta
        curves[name] = curve = explained_variance_curve(synset.images)
        svd = svd_summary(curve)
        entry: dict[str, Any] = {
            "synset": name, "dataset": meta.get("dataset"), "method": meta.get("method"), "ipc": meta.get("ipc"),
            "images": int(synset.images.shape[0]), "center": False, "svd": {**svd, "curve": curve.tolist()},
        }
        shape = "x".join(str(s) for s in synset.images.shape[1:])
        typer.echo(f"{name} ({meta.get('dataset')}, {meta.get('method')}, IPC {meta.get('ipc')}): "
                   f"{synset.images.shape[0]} images of {shape}, {svd['components']} singular values")
        points = svd["ratio_at"]
        typer.echo("  top components     " + "".join(f"{100 * p['fraction']:>7g}%" for p in points))
        typer.echo("  k                  " + "".join(f"{p['k']:>8d}" for p in points))
        typer.echo("  cumulative ratio   " + "".join(f"{p['ratio']:>8.3f}" for p in points)
                   + "   (diagonal: k / n)")
        reach = svd["components_for"]
        typer.echo(f"  components reaching {' / '.join(reach)} % of the singular-value sum: "
                   f"{' / '.join(str(k) for k in reach.values())} of {svd['components']}")
        if name in logits:
            dataset = datasets[name]
            pooled = logits[name].reshape(-1, logits[name].shape[-1])
            summary = max_logit_summary(pooled)
            accs = [100.0 * float((run.argmax(dim=1) == dataset.test_labels).float().mean()) for run in logits[name]]
            acc = torch.tensor(accs, dtype=torch.float64)
            entry.update(
                model=model_of(synset), runs=runs, epochs=config.epochs_or_default(), seed=seed, max_logit=summary,
                acc={"mean": float(acc.mean()), "std": float(acc.std(unbiased=False)), "runs": accs},
            )
            typer.echo(f"  max logit on the {dataset.name} test set ({model_of(synset)}, {runs} run(s) of "
                       f"{config.epochs_or_default()} epochs, pooled): "
                       + ", ".join(f"{k} {v:.2f}" for k, v in summary.items())
                       + f"; acc {float(acc.mean()):.2f} ± {float(acc.std(unbiased=False)):.2f} %")
        report["sets"].append(entry)
    if plots is not None:
        from fastdd.evaluate.calibration import save_max_logit_histogram

        paths = [plots / "svd.png"]
        save_explained_variance_plot(curves, paths[0], title="SVD curves of the synthetic sets")
        if logits:
            paths.append(plots / "max_logits.png")
            save_max_logit_histogram(
                {name: values.reshape(-1, values.shape[-1]).max(dim=1).values for name, values in logits.items()},
                paths[1], title=f"max logits on the test set, {runs} run(s) pooled",
            )
        report["plots"] = [str(p) for p in paths]
        for path in paths:
            typer.echo(f"plot written to {path}")
    if json_out is not None:
        write_json(json_out, report)
        typer.echo(f"results written to {json_out}")
