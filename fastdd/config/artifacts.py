"""The configs of the commands that turn a synthetic set into other files: ``fastdd show`` and ``fastdd export``."""

from __future__ import annotations

from dataclasses import dataclass

from fastdd.config.options import Section, option
from fastdd.config.run import OUTPUT


@dataclass
class ShowConfig(Section):
    out: str | None = option(None, "PNG to write.", panel=OUTPUT, default_text="SYNSET_DIR/synset.png")


@dataclass
class ExportConfig(Section):
    out: str | None = option(None, "Folder to write into.", panel=OUTPUT, default_text="SYNSET_DIR")
