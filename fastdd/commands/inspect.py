"""``fastdd inspect``: SVD curve and max-logit spread of synthetic sets."""

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
from fastdd.config.evaluate import EvalConfig, InspectConfig
from fastdd.config.options import from_options, pick
from fastdd.progress import SHARED_CORES_HINT, Progress


@user_errors
@with_config_options(InspectConfig)
def inspect_command(
    synset_dirs: list[Path] = typer.Argument(
        ..., metavar="SYNSET_DIRS...", help="Folders written by `fastdd distill`."
    ),
    config: Optional[Path] = config_file_option(),
    **options: Any,
) -> None:
    """Print the SVD curve and the max-logit spread of synthetic sets.

    These are the two diagnostics of "Do Not Overlook Calibration": the SVD curve (cumulative sum of
    the singular values of the flattened, uncentred images over their total; near the diagonal = evenly spread
    information) at a few fractions of the components, with the components needed for 50/90/99 %; and the max-logit
    spread (mean, std, percentiles) on the real test set of networks trained on each set, the networks of `fastdd
    evaluate --models MODEL --ignore-outliers` with the same options (cross-entropy)."""
    from fastdd.determinism import deterministic_algorithms
    from fastdd.evaluate import dataset_for_synset
    from fastdd.evaluate.inspection import inspect_sets, save_inspection_plots
    from fastdd.io import SyntheticSet, write_json

    settings = from_options(InspectConfig, given_options(config, options), context="fastdd inspect")
    protocol = pick(EvalConfig, settings)
    # Read every set (and its dataset) before any training, so bad input fails at once.
    synsets = [(str(folder), SyntheticSet.load(folder)) for folder in synset_dirs]
    datasets = {} if settings.no_train else {
        name: dataset_for_synset(s, data_root=settings.data_root) for name, s in synsets
    }
    total = len(datasets) * protocol.runs * protocol.epochs_or_default()
    with deterministic_algorithms(settings.deterministic), Progress(
        "inspect", total, unit="epoch", enabled=not settings.quiet, hint=SHARED_CORES_HINT
    ) as progress:
        report, curves, logits = inspect_sets(
            synsets, datasets, config=protocol, model=settings.model,
            on_epoch=lambda name, run: progress.advance(description=f"inspect {name} run {run + 1}/{protocol.runs}"),
        )
    for entry in report["sets"]:
        print_inspection(entry)
    if settings.plots is not None:
        paths = save_inspection_plots(curves, logits, Path(settings.plots), protocol.runs)
        report["plots"] = [str(p) for p in paths]
        for path in paths:
            typer.echo(f"plot written to {path}")
    if settings.json_out is not None:
        write_json(settings.json_out, report)
        typer.echo(f"results written to {settings.json_out}")


def print_inspection(entry: dict[str, Any]) -> None:
    """One set's entry of :func:`fastdd.evaluate.inspection.inspect_sets` as ``fastdd inspect`` prints it."""
    svd = entry["svd"]
    typer.echo(f"{entry['synset']} ({entry['dataset']}, {entry['method']}, IPC {entry['ipc']}): "
               f"{entry['images']} images, {svd['components']} singular values")
    points = svd["ratio_at"]
    typer.echo("  top components     " + "".join(f"{100 * p['fraction']:>7g}%" for p in points))
    typer.echo("  k                  " + "".join(f"{p['k']:>8d}" for p in points))
    typer.echo("  cumulative ratio   " + "".join(f"{p['ratio']:>8.3f}" for p in points) + "   (diagonal: k / n)")
    reach = svd["components_for"]
    typer.echo(f"  components reaching {' / '.join(reach)} % of the singular-value sum: "
               f"{' / '.join(str(k) for k in reach.values())} of {svd['components']}")
    if "max_logit" in entry:
        acc = entry["acc"]
        typer.echo(f"  max logit on the {entry['test_set']} test set ({entry['model']}, {entry['runs']} run(s) of "
                   f"{entry['epochs']} epochs, pooled): "
                   + ", ".join(f"{k} {v:.2f}" for k, v in entry["max_logit"].items())
                   + f"; acc {acc['mean']:.2f} ± {acc['std']:.2f} %")
