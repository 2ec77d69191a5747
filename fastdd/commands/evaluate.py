"""``fastdd evaluate``: train fresh networks on a synthetic set and print accuracy, OOD, robustness, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fastdd.commands.errors import user_errors
from fastdd.commands.models_option import split_models
from fastdd.progress import SHARED_CORES_HINT, Progress


@user_errors
def evaluate(
    synset_dir: Path = typer.Argument(..., help="Folder written by `fastdd distill`."),
    models: list[str] = typer.Option(["convnet"], "--models", help="Models to train, comma separated or repeated."),
    runs: int = typer.Option(5, help="Fresh networks per model."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default 1000 with DSA, 300 without)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the set's learned lr, else 0.01)."),
    dsa: bool = typer.Option(True, "--dsa/--no-dsa", help="Augment while training on the synthetic set."),
    seed: int = typer.Option(0, help="Seed of the evaluation generator."),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (default: the one used to distill)."),
    device: str = typer.Option("cpu", help="Torch device."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    ood: Optional[list[str]] = typer.Option(
        None,
        "--ood",
        help="OOD test sets, comma separated or repeated: gaussian, uniform, a dataset name (its test split), a folder "
        "of images, or holdout:K (train on classes < K, the other classes are OOD).",
    ),
    score: Optional[list[str]] = typer.Option(
        None, "--score", help="OOD scores, comma separated or repeated: msp, mls, energy, gen (default msp, TrustDD's)."
    ),
    plots: Optional[Path] = typer.Option(
        None, "--plots", help="Folder for PNGs: histograms of the ID vs OOD scores (ood_MODEL_SCORE.png) with --ood; "
        "reliability diagrams (calibration_MODEL_METHOD.png) and max-logit histograms (max_logits_MODEL.png) with "
        "--calibration.",
    ),
    ood_size: Optional[int] = typer.Option(
        None, "--ood-size", help="At most N images per side and OOD set (default: ID:OOD 1:1, all of the smaller side)."
    ),
    use_outliers: bool = typer.Option(
        True, "--use-outliers/--ignore-outliers", help="Train on the set's outlier images too, when it has them."
    ),
    robustness: bool = typer.Option(
        False, "--robustness", help="Also report cluster_min, cluster_mean (10 KMeans test clusters), and the accuracy "
        "under noise (Gaussian, std 0.0707), blur (Gaussian, radius 2) and invert (1 - x).",
    ),
    robustness_sets: Optional[list[str]] = typer.Option(
        None, "--robustness-sets", help="Only these robustness measures, comma separated or repeated (implies "
        "--robustness): cluster_min, cluster_mean, noise, blur, invert.",
    ),
    calibration: Optional[list[str]] = typer.Option(
        None, "--calibration", help="Calibration methods, comma separated or repeated: none (raw networks), ts (one "
        "more network per run trained on 90 % of S per class, temperature fitted on the other 10 %), mts (masked "
        "temperature scaling: temperature fitted on all of S, each image under 10 random pixel masks). Reports ECE "
        "(15 bins), NLL, "
        "temperature and accuracy.",
    ),
    mask_ratio: Optional[float] = typer.Option(
        None, "--mask-ratio", help="Fraction of pixels MTS masks (0 = temperature scaling on S; default 0.3).",
        show_default=False,
    ),
    train_loss: str = typer.Option(
        "ce", "--train-loss", help="Loss of the evaluation networks: ce, ls (label smoothing 0.1), mixup, focal."
    ),
    train_plugin: Optional[str] = typer.Option(
        None, "--train-plugin", help="oal: train with OAL (CE + distillation from --teacher + MICL on boundary "
        "outliers); its default OOD score is energy.",
    ),
    teacher: Optional[str] = typer.Option(
        None, "--teacher", help="OAL's teacher: 'expert' (the experts folder the set was distilled from), an experts "
        "folder, an expert file or a model checkpoint (.safetensors, .pt).",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train fresh networks on a synthetic set and report their test accuracy (mean ± std over runs), with --ood
    their OOD detection (AUROC, AUPR-IN/OUT, FPR95 in TrustDD's and OpenOOD's conventions), with --robustness
    their worst-cluster and shifted-input accuracies, and with --calibration their ECE / NLL raw, after TS and after
    MTS."""
    from fastdd.evaluate import EvalConfig, dataset_for_synset, evaluate_synthetic_set
    from fastdd.evaluate.calibration_runs import parse_calibrations
    from fastdd.evaluate.robustness import ROBUSTNESS_SETS, parse_robustness_sets
    from fastdd.io import SyntheticSet, write_json

    names = split_models(models)
    chosen_robustness = (
        parse_robustness_sets(robustness_sets) if robustness_sets else (ROBUSTNESS_SETS if robustness else None)
    )
    synset = SyntheticSet.load(synset_dir)
    data = dataset_for_synset(synset, data_root=data_root)
    config = EvalConfig(runs=runs, epochs=epochs, lr=lr, dsa=dsa, seed=seed, device=device)
    calibrations = parse_calibrations(calibration) if calibration else None
    networks_per_run = 2 if calibrations and "ts" in calibrations else 1
    total = len(names) * runs * networks_per_run * config.epochs_or_default()
    ood_options = dict(
        ood=ood or None, scores=score or None, plots=plots, ood_size=ood_size, use_outliers=use_outliers,
        data_root=data_root, robustness=chosen_robustness, calibration=calibrations, mask_ratio=mask_ratio,
        train_loss=train_loss.strip().lower(), train_plugin=train_plugin.strip().lower() if train_plugin else None,
        teacher=teacher,
    )
    with Progress("evaluate", total, unit="epoch", enabled=not quiet, hint=SHARED_CORES_HINT) as progress:

        def on_epoch(model: str, run: int, epoch: int) -> None:
            progress.advance(description=f"evaluate {model} run {run + 1}/{runs}")

        result = evaluate_synthetic_set(synset, data, models=names, config=config, on_epoch=on_epoch, **ood_options)
    trained_on = []
    if result["holdout"] is not None:
        trained_on.append(f"classes < {result['holdout']}")
    if result["outliers"]:
        trained_on.append(f"{result['outliers']} outlier images")
    if result["train_plugin"] is not None:
        trained_on.append(f"{result['train_plugin']} with teacher {result['teacher']}")
    elif result["train_loss"] != "ce":
        trained_on.append(f"{result['train_loss']} loss")
    for name, res in result["models"].items():
        acc = res["acc"]
        typer.echo(f"{name}: acc {acc['mean']:.2f} ± {acc['std']:.2f} % over {runs} runs "
                   f"({result['dataset']}, {result['method']}, IPC {result['ipc']}, {result['epochs']} epochs"
                   + "".join(f", {t}" for t in trained_on) + ")")
        for score_name, sets in res.get("ood", {}).items():
            typer.echo(f"  OOD score {score_name} (%, mean ± std over {runs} runs; images per side: "
                       + ", ".join(f"{k} {v}" for k, v in result["ood_sets"].items()) + ")")
            columns = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood")
            label_width = max(len(s) for s in ["set", *sets])
            typer.echo(f"  {'set':<{label_width}}" + "".join(f"  {c:>15}" for c in columns))
            for set_name, metrics in sets.items():
                cells = [f"{metrics[c]['mean']:.2f} ± {metrics[c]['std']:.2f}" for c in columns]
                typer.echo(f"  {set_name:<{label_width}}" + "".join(f"  {cell:>15}" for cell in cells))
        if "robustness" in res:
            sizes = " ".join(map(str, result.get("cluster_sizes", [])))
            typer.echo(f"  robustness (accuracy %, mean ± std over {runs} runs"
                       + (f"; test images per cluster: {sizes}" if sizes else "") + ")")
            columns = list(res["robustness"])
            widths = [max(15, len(c)) for c in columns]
            typer.echo("  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
            cells = [f"{res['robustness'][c]['mean']:.2f} ± {res['robustness'][c]['std']:.2f}" for c in columns]
            typer.echo("  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))
        if "calibration" in res:
            typer.echo(f"  calibration on the test set (mean ± std over {runs} runs; MTS mask ratio "
                       f"{result['mask_ratio']}; TS networks train on 90 % of S)")
            columns = ("acc", "ece", "nll", "temperature")
            typer.echo(f"  {'method':<8}" + "".join(f"  {c + (' %' if c in ('acc', 'ece') else ''):>17}"
                                                    for c in columns))
            for method, metrics in res["calibration"].items():
                cells = [f"{metrics[c]['mean']:.{2 if c in ('acc', 'ece') else 3}f} ± "
                         f"{metrics[c]['std']:.{2 if c in ('acc', 'ece') else 3}f}" for c in columns]
                extra = (f"  (before scaling: ece {metrics['ece_before']['mean']:.2f} %, nll "
                         f"{metrics['nll_before']['mean']:.3f})" if "ece_before" in metrics else "")
                typer.echo(f"  {method:<8}" + "".join(f"  {cell:>17}" for cell in cells) + extra)
    for path in result.get("plots", []):
        typer.echo(f"plot written to {path}")
    if json_out is not None:
        write_json(json_out, result)
        typer.echo(f"results written to {json_out}")
