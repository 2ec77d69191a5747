"""The configs of the commands that turn a synthetic set into other files and back: ``fastdd show``, ``fastdd
export`` and ``fastdd import``."""

from __future__ import annotations

from dataclasses import dataclass

from fastdd.config.options import Section, field_error, field_of, option, redefault
from fastdd.config.run import OUTPUT
from fastdd.config.sections import DataConfig, check_folder_exists

# The names live here because configs import nothing heavy; fastdd.interop uses these.
EXPORT_FORMATS = ("fastdd", "mtt", "ddranking", "dc-bench", "imagefolder")
IMPORT_FORMATS = ("mtt", "ddranking", "dc", "tensors", "imagefolder")
NORMALIZATIONS = ("dataset", "cifar10", "none")
SOFT_LABEL_FORMS = ("logits", "probs")
FOREIGN = "Foreign set"


@dataclass
class ShowConfig(Section):
    out: str | None = option(None, "PNG to write.", panel=OUTPUT, default_text="SYNSET_DIR/synset.png")
    scale: int | None = option(None, "Upscale every image this many times (nearest neighbour).", panel=OUTPUT,
                               at_least=1, default_text="until an image is 64 pixels wide")
    classes: str | None = option(None, "Only these classes, by name or index, comma separated or repeated.",
                                 panel=OUTPUT, split=True, default_text="all")


@dataclass
class ExportConfig(Section):
    out: str | None = option(None, "Folder to write into.", panel=OUTPUT, default_text="SYNSET_DIR")
    format: str = option(
        "mtt", "Layout and conventions of the tool that will read the set: mtt (images_best.pt, labels_best.pt, "
        "lr_best.pt: MTT, TESLA, DATM, FTD), ddranking (images.pt, labels.pt, lr.pt; RGB CIFAR sets), dc-bench (DC's "
        "res_*.pt; hard-label CIFAR sets), imagefolder (one folder of PNGs per class) or fastdd (a copy). Soft labels "
        "are written as logits, the lr only when the set learned one, the images normalised as the tool does "
        "(CIFAR-100 with CIFAR-10's statistics for mtt and ddranking).", panel=OUTPUT, choices=EXPORT_FORMATS,
    )


@dataclass
class ImportConfig(Section):
    dataset: str | None = redefault(DataConfig, "dataset", None, default_text="none: required",
                                    help="The dataset the set was distilled from.")
    data_root: str | None = redefault(DataConfig, "data_root", None)
    zca: bool = redefault(DataConfig, "zca", False, help="The images are ZCA-whitened (kornia ZCAWhitening, eps 0.1, "
                          "on the [0, 1] training images, as the MTT code and DD-Ranking do); the set stays whitened.")
    format: str = option(
        None, "What wrote the set: mtt (images_best.pt, labels_best.pt, lr_best.pt, or a folder of them: MTT, TESLA, "
        "DATM, FTD), ddranking (images.pt, labels.pt as logits, lr.pt), dc (DC / DSA / DM res_*.pt), tensors (plain "
        ".pt / .safetensors / .npy files) or imagefolder (a folder of PNGs per class).", panel=FOREIGN,
        choices=IMPORT_FORMATS, default_text="none: required",
    )
    normalization: str | None = option(
        None, "Whose mean and std the stored images were normalised with: dataset (its own, as DC and fastdd), cifar10 "
        "(as the MTT code and DD-Ranking normalise CIFAR-100) or none ([0, 1] pixels).", panel=FOREIGN,
        choices=NORMALIZATIONS, default_text="dataset; not with --zca or imagefolder",
    )
    soft_labels: str = option(
        "logits", "What [K, classes] labels hold: logits (DD-Ranking's and TESLA's files: a softmax gives the "
        "targets) or probs.", panel=FOREIGN, choices=SOFT_LABEL_FORMS,
    )
    experiment: int = option(-1, "dc: which experiment of the file's 'data' list (-1: the last, as DC-BENCH reads).",
                             panel=FOREIGN)
    out: str | None = option(None, "Folder to write the fastdd set into (synset.safetensors, synset.json, "
                             "synset.png).", panel=OUTPUT, default_text="none: required")
    overwrite: bool = option(False, "Replace a synthetic set already in --out.", panel=OUTPUT,
                             flag="--overwrite/--no-overwrite")

    def check_fields(self) -> None:
        check_folder_exists(self, "data_root")
        for name in ("dataset", "format", "out"):
            if getattr(self, name) is None:
                raise field_error(field_of(self, name), "is needed")
        if self.normalization is not None and (self.zca or self.format == "imagefolder"):
            raise field_error(field_of(self, "normalization"), "applies only to unwhitened tensor files (not with "
                              "--zca or --format imagefolder)")
