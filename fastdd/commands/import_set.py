"""``fastdd import``: a synthetic set made by another tool, checked and written as a fastdd set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from fastdd.commands.errors import user_errors
from fastdd.commands.options import (
    config_file_option,
    given_options,
    with_config_options,
)
from fastdd.config.artifacts import ImportConfig
from fastdd.config.options import from_options


@user_errors
@with_config_options(ImportConfig)
def import_set(
    paths: List[Path] = typer.Argument(..., metavar="IMAGES [LABELS] [LR]", help="The set's files: images, then "
                                       "optionally labels and learned lr; or the folder holding them (mtt, ddranking, "
                                       "imagefolder), or a res_*.pt file (dc)."),
    config: Optional[Path] = config_file_option(),
    **options: Any,
) -> None:
    """Turn a synthetic set made by another tool into a fastdd set that evaluate, report, show, inspect and export
    read.

    Everything the files cannot say comes from the options and is checked: the channels against --dataset, the labels
    (explicit, else class-major), their range, finite values, a plausible --normalization, a positive lr. The images
    are stored normalised with the dataset's statistics (or whitened, with --zca), soft labels as probabilities, and
    synset.json records the files read (with their SHA-256) and what was assumed."""
    from fastdd.interop import import_synthetic_set
    from fastdd.io import SYNSET_TENSORS, synset_unit_images

    settings = from_options(ImportConfig, given_options(config, options), context="fastdd import")
    out = Path(settings.out)
    if (out / SYNSET_TENSORS).exists() and not settings.overwrite:
        from fastdd.errors import FastddError

        raise FastddError(f"{out} already holds a synthetic set; choose another --out or pass --overwrite.")
    synset = import_synthetic_set(
        settings.format, paths, dataset=settings.dataset, data_root=settings.data_root,
        normalization=settings.normalization, zca=settings.zca, soft_labels=settings.soft_labels,
        experiment=settings.experiment,
    )
    out.mkdir(parents=True, exist_ok=True)
    synset.save(out, grid=synset_unit_images(synset))
    ipc = synset.meta["ipc"]
    extras = [name for name, present in (("soft labels", synset.soft_labels is not None),
                                         ("a learned lr", synset.syn_lr is not None)) if present]
    shape = f"IPC {ipc}" if ipc else "classes of different sizes"
    with_extras = f", with {' and '.join(extras)}" if extras else ""
    typer.echo(f"imported {len(synset.images)} images of {synset.meta['dataset']} ({shape}{with_extras}) into {out}; "
               f"next: fastdd evaluate {out}")
