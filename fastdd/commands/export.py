"""``fastdd export``: the set in the layout and conventions another dataset-distillation tool reads."""

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
    synset_dir: Path = typer.Argument(..., metavar="SYNSET_DIR", help="Folder of a fastdd set (distill or import)."),
    config: Optional[Path] = config_file_option(),
    **options: Any,
) -> None:
    """Write the set in the layout another dataset-distillation tool reads (--format; default mtt: images_best.pt,
    labels_best.pt and, when the set learned one, lr_best.pt).

    Soft labels become logits where the tool applies a softmax, the images are re-normalised to the tool's
    statistics, and a set the tool cannot take is refused; export.json beside the files says what was written."""
    from fastdd.errors import FastddError
    from fastdd.interop import export_synthetic_set
    from fastdd.io import SyntheticSet

    settings = from_options(ExportConfig, given_options(config, options), context="fastdd export")
    target = Path(settings.out) if settings.out is not None else Path(synset_dir)
    if settings.format == "fastdd" and target.resolve() == Path(synset_dir).resolve():
        raise FastddError(f"{synset_dir} is already a fastdd set; give --out to copy it elsewhere.")
    written = export_synthetic_set(SyntheticSet.load(synset_dir), target, settings.format)
    names = [str(p.relative_to(target)) for p in written]
    shown = names if len(names) <= 4 else [*names[:2], f"... ({len(names) - 3} more)", names[-1]]
    typer.echo(f"{settings.format}: {', '.join(shown)} written to {target}")
