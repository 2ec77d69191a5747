"""``fastdd show``: the synthetic images (and outliers) as PNG grids."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fastdd.commands.errors import user_errors


@user_errors
def show(
    synset_dir: Path = typer.Argument(..., help="Folder written by `fastdd distill`."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default SYNSET_DIR/synset.png)."),
) -> None:
    """Write the synthetic images as a PNG grid (one row per class, de-normalised or inverse-ZCA'd), and the outlier
    images of a TrustDD set as a second grid beside it (NAME_outliers.png)."""
    from fastdd.io import SYNSET_GRID, SyntheticSet, save_image_grid, synset_unit_images

    synset = SyntheticSet.load(synset_dir)
    target = out if out is not None else Path(synset_dir) / SYNSET_GRID
    save_image_grid(synset_unit_images(synset), target, nrow=synset.meta.get("ipc"))
    typer.echo(f"image grid written to {target}")
    if synset.outlier_images is not None:
        outlier_target = target.with_name(f"{target.stem}_outliers{target.suffix}")
        save_image_grid(synset_unit_images(synset, outliers=True), outlier_target, nrow=synset.meta.get("ipc"))
        typer.echo(f"outlier grid written to {outlier_target}")
