"""Overlaid density histograms of several named sets of values (OOD scores, max logits), written as one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_density_histograms(
    arrays: dict[str, np.ndarray], path: str | Path, *, xlabel: str, title: str | None = None
) -> None:
    """Write a PNG with one density histogram (area 1) per named array, on 50 shared bins over their pooled range,
    so sets of different sizes compare by shape. Drawn with matplotlib's object API on the Agg canvas (no pyplot
    state, no display needed); the file is written atomically and its folders created.

    Args:
        arrays: label -> ``[N_label]`` finite values (the legend shows the label and ``N_label``); not empty.
        path: the PNG file.
        xlabel: the x-axis label.
        title: the figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastdd.io import atomic_write

    if not arrays:
        raise ValueError("save_density_histograms needs at least one named array")
    low = min(float(a.min()) for a in arrays.values())
    high = max(float(a.max()) for a in arrays.values())
    if high <= low:
        high = low + 1.0
    bins = np.linspace(low, high, 51)
    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, values in arrays.items():
        axes.hist(values, bins=bins, density=True, histtype="stepfilled", alpha=0.45, label=f"{label} ({values.size})")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("density")
    if title:
        axes.set_title(title)
    axes.legend(fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
