"""The ``--models`` option of evaluate and report: names, comma separated or repeated, checked against the registry."""

from __future__ import annotations

from fastdd.errors import FastddError


def split_models(models: list[str]) -> list[str]:
    names = [name.strip() for item in models for name in item.split(",") if name.strip()]
    from fastdd.models import MODELS

    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise FastddError(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}.")
    return names
