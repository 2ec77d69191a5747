"""``fastdd evaluate``: train fresh networks on a synthetic set and print accuracy, OOD, robustness, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from fastdd.commands.errors import user_errors
from fastdd.commands.options import (
    config_file_option,
    given_options,
    with_config_options,
)
from fastdd.config.evaluate import EvaluateConfig, EvaluationSettings
from fastdd.config.options import from_options, pick
from fastdd.progress import SHARED_CORES_HINT, Progress


@user_errors
@with_config_options(EvaluateConfig)
def evaluate(
    synset_dir: Path = typer.Argument(..., metavar="SYNSET_DIR",
                                      help="Folder written by `fastdd distill` or `fastdd import`."),
    config: Optional[Path] = config_file_option(),
    **options: Any,
) -> None:
    """Train fresh networks on a synthetic set and report accuracy, OOD detection, robustness and calibration.

    The test accuracy is the mean ± std over runs; with --ood also their OOD detection (AUROC, AUPR-IN/OUT, FPR95 in
    TrustDD's and OpenOOD's conventions), with --robustness their worst-cluster and shifted-input accuracies, with
    --calibration their ECE / NLL raw, after TS and after MTS, and with --scores DD-Ranking's HLR, IOR and LRS."""
    from fastdd.determinism import deterministic_algorithms
    from fastdd.evaluate import dataset_for_synset, plan_evaluation
    from fastdd.io import SyntheticSet, write_json

    settings = from_options(EvaluateConfig, given_options(config, options), context="fastdd evaluate")
    synset = SyntheticSet.load(synset_dir)
    plan = plan_evaluation(synset, dataset_for_synset(synset, data_root=settings.data_root),
                           pick(EvaluationSettings, settings))
    with deterministic_algorithms(settings.deterministic), Progress(
        "evaluate", plan.total_epochs, unit="epoch", enabled=not settings.quiet, hint=SHARED_CORES_HINT
    ) as progress:
        result = plan.run(lambda model, run, epoch: progress.advance(
            description=f"evaluate {model} run {run + 1}/{settings.runs}"))
    print_evaluation(result, settings.runs)
    for path in result.get("plots", []):
        typer.echo(f"plot written to {path}")
    if settings.json_out is not None:
        write_json(settings.json_out, result)
        typer.echo(f"results written to {settings.json_out}")


def print_evaluation(result: dict[str, Any], runs: int) -> None:
    """The result of :func:`fastdd.evaluate.evaluate_synthetic_set` as the tables ``fastdd evaluate`` prints."""
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
                if "mask_ratio" in metrics:
                    extra += (f"  (ratio chosen on held-out real images: {metrics['mask_ratio']['mean']:.2f} ± "
                              f"{metrics['mask_ratio']['std']:.2f})")
                typer.echo(f"  {method:<8}" + "".join(f"  {cell:>17}" for cell in cells) + extra)
        if "label_scores" in res:
            scores = res["label_scores"]
            typer.echo(f"  DD-Ranking scores (%, mean ± std over {runs} runs; hard labels; full-data accuracy "
                       f"{scores['acc_full']:.2f} from {result['label_scores_protocol']['full_data'][name]})")
            columns = ("hlr", "ior", "lrs", "acc_hard", "acc_random")
            typer.echo("  " + "  ".join(f"{c:>15}" for c in columns))
            typer.echo("  " + "  ".join(f"{scores[c]['mean']:.2f} ± {scores[c]['std']:.2f}".rjust(15) for c in columns))
