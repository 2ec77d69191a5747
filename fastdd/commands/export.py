"""``fastdd export``: the set in the file names other dataset-distillation tools read."""

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
from fastdd.config.artifacts import ExportConfig
from fastdd.config.options import from_options


@user_errors
@with_config_options(ExportConfig)
def export(
    synset_dir: Path = typer.Argument(..., metavar="SYNSET_DIR", help="Folder written by `fastdd distill`."),
    config: Optional[Path] = config_file_option(),
    **options: Any,
) -> None:
    """Write images_best.pt, labels_best.pt and lr_best.pt so other dataset-distillation tools can read the set."""
    from fastdd.exports import export_best_files
    from fastdd.io import SyntheticSet

    settings = from_options(ExportConfig, given_options(config, options), context="fastdd export")
    target = Path(settings.out) if settings.out is not None else Path(synset_dir)
    names = export_best_files(SyntheticSet.load(synset_dir), target)
    typer.echo(f"{', '.join(names[:-1])} and {names[-1]} written to {target}")
