"""``fastdd report``: evaluate several synthetic sets under one protocol and write a side-by-side trust report."""

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
from fastdd.config.evaluate import EvaluationSettings, ReportConfig
from fastdd.config.options import from_options, pick
from fastdd.progress import SHARED_CORES_HINT, Progress


@user_errors
@with_config_options(ReportConfig)
def report(
    synset_dirs: list[Path] = typer.Argument(
        ..., metavar="SYNSET_DIRS...", help="Folders written by `fastdd distill`, all of one dataset."
    ),
    config: Optional[Path] = config_file_option(),
    **options: Any,
) -> None:
    """Evaluate synthetic sets of one dataset under one protocol into a side-by-side trust report.

    The report holds accuracy, OOD detection (AUROC / FPR95 per OOD set and mean), robustness (cluster_min, noise,
    blur, invert), calibration (ECE raw / TS / MTS), size and distillation time, mean ± std over runs."""
    from fastdd.determinism import deterministic_algorithms
    from fastdd.evaluate.report import REPORT_MD, prepare_report

    settings = from_options(ReportConfig, given_options(config, options), context="fastdd report")
    plan = prepare_report([str(folder) for folder in synset_dirs], out=Path(settings.out),
                          overwrite=settings.overwrite, settings=pick(EvaluationSettings, settings))
    for report_set in plan.sets:
        for note in report_set.info["notes"]:
            typer.echo(f"note: {report_set.name}: {note}")
    with deterministic_algorithms(settings.deterministic), Progress(
        "report", plan.total_epochs, unit="epoch", enabled=not settings.quiet, hint=SHARED_CORES_HINT
    ) as progress:

        def on_epoch(name: str, model: str, run: int, epoch: int) -> None:
            progress.advance(description=f"report {name} {model} run {run + 1}/{settings.runs}")

        result = plan.run(on_epoch)
    for entry in result["sets"]:
        for model, res in entry["results"]["models"].items():
            typer.echo(f"{entry['name']} ({model}): acc {res['acc']['mean']:.2f} ± {res['acc']['std']:.2f} %")
    typer.echo(f"report written to {Path(settings.out) / REPORT_MD} ({len(result['plots'])} plots)")
