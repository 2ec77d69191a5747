"""``fastdd show``: the synthetic images (and outliers) as PNG grids."""

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
from fastdd.config.artifacts import ShowConfig
from fastdd.config.options import from_options


@user_errors
@with_config_options(ShowConfig)
def show(
    synset_dir: Path = typer.Argument(..., metavar="SYNSET_DIR", help="Folder written by `fastdd distill`."),
    config: Optional[Path] = config_file_option(),
    **options: Any,
) -> None:
    """Write the synthetic images as a PNG grid, one named row per class.

    The images are de-normalised (or inverse-ZCA'd) and upscaled to be readable; the outlier images of a TrustDD set
    go into a second grid beside it (NAME_outliers.png)."""
    from fastdd.exports import save_synset_grids
    from fastdd.io import SYNSET_GRID, SyntheticSet

    settings = from_options(ShowConfig, given_options(config, options), context="fastdd show")
    target = Path(settings.out) if settings.out is not None else Path(synset_dir) / SYNSET_GRID
    classes = settings.classes.split(",") if settings.classes else None
    for path in save_synset_grids(SyntheticSet.load(synset_dir), target, scale=settings.scale, classes=classes):
        typer.echo(f"{'outlier' if path != target else 'image'} grid written to {path}")
