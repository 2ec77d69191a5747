"""``fastdd report``: evaluate several synthetic sets under one protocol and write a side-by-side trust report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fastdd.commands.errors import user_errors
from fastdd.progress import SHARED_CORES_HINT, Progress


@user_errors
def report(
    synset_dirs: list[Path] = typer.Argument(..., help="Folders written by `fastdd distill`, all of one dataset."),
    out: Path = typer.Option(..., "--out", help="Report folder: report.md, report.json, summary_MODEL.png, plots/."),
    models: list[str] = typer.Option(
        ["convnet"], "--models", help="Models to train, comma separated or repeated (several: cross-architecture)."
    ),
    runs: int = typer.Option(5, help="Fresh networks per set and model."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default 1000 with DSA, 300 without)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: each set's learned lr, else 0.01)."),
    dsa: bool = typer.Option(True, "--dsa/--no-dsa", help="Augment while training on the synthetic sets."),
    seed: int = typer.Option(0, help="Seed of the evaluation generator (the same for every set)."),
    ood: Optional[list[str]] = typer.Option(
        None, "--ood", help="OOD test sets, comma separated or repeated, as in `fastdd evaluate` (default gaussian,"
        "uniform).",
    ),
    score: Optional[list[str]] = typer.Option(
        None, "--score", help="OOD scores, comma separated or repeated: msp, mls, energy, gen (default msp,energy)."
    ),
    ood_size: Optional[int] = typer.Option(None, "--ood-size", help="At most N images per side and OOD set."),
    robustness: bool = typer.Option(
        True, "--robustness/--no-robustness", help="Measure cluster_min, cluster_mean, noise, blur and invert."
    ),
    calibration: Optional[list[str]] = typer.Option(
        None, "--calibration", help="Calibration methods, comma separated or repeated (default none,ts,mts); ts is "
        "skipped, with a note, for a set with a single image in a class.",
    ),
    mask_ratio: Optional[float] = typer.Option(
        None, "--mask-ratio", help="Fraction of pixels MTS masks (default 0.3).", show_default=False
    ),
    use_outliers: bool = typer.Option(
        True, "--use-outliers/--ignore-outliers", help="Train on the outlier images of TrustDD sets too."
    ),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (default: the one used to distill)."),
    device: str = typer.Option("cpu", help="Torch device."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier report in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Evaluate synthetic sets of one dataset under one protocol and write a side-by-side trust report: accuracy,
    OOD detection (AUROC / FPR95 per OOD set and mean), robustness (cluster_min, noise, blur, invert), calibration
    (ECE raw / TS / MTS), size and distillation time, mean ± std over runs."""
    from fastdd.evaluate import EvalConfig
    from fastdd.evaluate.report import (
        DEFAULT_REPORT_OOD,
        DEFAULT_REPORT_SCORES,
        REPORT_MD,
        prepare_report,
    )
    from fastdd.evaluate.robustness import ROBUSTNESS_SETS

    config = EvalConfig(runs=runs, epochs=epochs, lr=lr, dsa=dsa, seed=seed, device=device)
    plan = prepare_report(
        [str(folder) for folder in synset_dirs], out=out, models=models, config=config,
        ood=ood or DEFAULT_REPORT_OOD, scores=score or DEFAULT_REPORT_SCORES,
        robustness=ROBUSTNESS_SETS if robustness else None, calibration=calibration or "none,ts,mts",
        mask_ratio=mask_ratio, ood_size=ood_size, data_root=data_root, use_outliers=use_outliers,
        overwrite=overwrite,
    )
    for report_set in plan.sets:
        for note in report_set.info["notes"]:
            typer.echo(f"note: {report_set.name}: {note}")
    with Progress("report", plan.total_epochs, unit="epoch", enabled=not quiet, hint=SHARED_CORES_HINT) as progress:

        def on_epoch(name: str, model: str, run: int, epoch: int) -> None:
            progress.advance(description=f"report {name} {model} run {run + 1}/{runs}")

        result = plan.run(on_epoch)
    for entry in result["sets"]:
        for model, res in entry["results"]["models"].items():
            typer.echo(f"{entry['name']} ({model}): acc {res['acc']['mean']:.2f} ± {res['acc']['std']:.2f} %")
    typer.echo(f"report written to {out / REPORT_MD} ({len(result['plots'])} plots)")
