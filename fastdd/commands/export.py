"""``fastdd export``: the set in the file names other dataset-distillation tools read."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fastdd.commands.errors import user_errors


@user_errors
def export(
    synset_dir: Path = typer.Argument(..., help="Folder written by `fastdd distill`."),
    out: Optional[Path] = typer.Option(None, help="Folder to write into (default SYNSET_DIR)."),
) -> None:
    """Write images_best.pt, labels_best.pt and lr_best.pt so other dataset-distillation tools can read the set."""
    import torch

    from fastdd.io import SyntheticSet, atomic_write

    synset = SyntheticSet.load(synset_dir)
    target = out if out is not None else Path(synset_dir)
    lr = synset.syn_lr if synset.syn_lr is not None else torch.tensor(0.01)
    labels = synset.soft_labels if synset.soft_labels is not None else synset.labels
    for name, tensor in (("images_best.pt", synset.images), ("labels_best.pt", labels), ("lr_best.pt", lr)):
        atomic_write(target / name, lambda tmp, t=tensor: torch.save(t.clone(), tmp))
    typer.echo(f"images_best.pt, labels_best.pt and lr_best.pt written to {target}")
