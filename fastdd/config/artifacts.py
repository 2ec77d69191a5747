"""The configs of the commands that turn a synthetic set into other files: ``fastdd show`` and ``fastdd export``."""

from __future__ import annotations

from dataclasses import dataclass

from fastdd.config.options import Section, option
from fastdd.config.run import OUTPUT


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
