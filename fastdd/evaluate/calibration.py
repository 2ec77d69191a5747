"""Calibration of a classifier's logits: expected calibration error, negative log-likelihood, and their plots.

``ece`` is the top-label expected calibration error with equal-width confidence bins and the L1 norm, computed by
torchmetrics' ``multiclass_calibration_error``: ``sum_b (n_b / N) |acc_b - conf_b|`` over the bins ``b`` of the top
softmax probability (a confidence on a bin edge falls in the upper bin). The softmax is taken in float64; torchmetrics
then bins the top confidence in float32, so ECE values agree with torchmetrics' to about 1e-7.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastdd.evaluate.histograms import save_density_histograms

CALIBRATION_METRICS: tuple[str, ...] = ("ece", "nll")


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label expected calibration error (L1, ``n_bins`` equal-width bins on ``[0, 1]``), as a fraction.

    Args:
        logits: ``[N, K]`` floating-point logits, ``K >= 2``.
        labels: ``[N]`` integer class indices in ``[0, K)``.
        n_bins: number of confidence bins, ``>= 1``.
    Returns:
        ECE in ``[0, 1]``.
    """
    from torchmetrics.functional.classification import multiclass_calibration_error

    _check(logits, labels)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    probs = logits.detach().to(torch.float64).softmax(dim=1)
    targets = labels.detach().to(probs.device)
    classes = logits.shape[1]
    value = multiclass_calibration_error(probs, targets, classes, n_bins=n_bins, norm="l1", validate_args=False)
    return float(value)


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits)`` (cross-entropy, computed in float64).

    Args:
        logits: ``[N, K]`` floating-point logits.
        labels: ``[N]`` integer class indices in ``[0, K)``.
    Returns:
        the mean NLL in nats.
    """
    _check(logits, labels)
    return float(F.cross_entropy(logits.detach().to(torch.float64), labels.detach().to(logits.device)))


def calibration_metrics(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, *, n_bins: int = 15
) -> dict[str, float]:
    """ECE (``n_bins`` bins), NLL and accuracy of ``logits / temperature``.

    Args:
        logits: ``[N, K]`` floating-point logits.
        labels: ``[N]`` integer class indices in ``[0, K)``.
        temperature: ``T > 0`` dividing the logits (1 = uncalibrated). Accuracy does not depend on it.
    Returns:
        ``{"ece": percent, "nll": nats, "acc": percent}``.
    """
    _check(logits, labels)
    _check_temperature(temperature)
    scaled = logits.detach().to(torch.float64) / temperature
    correct = scaled.argmax(dim=1) == labels.to(scaled.device)
    return {
        "ece": 100.0 * ece(scaled, labels, n_bins=n_bins),
        "nll": nll(scaled, labels),
        "acc": 100.0 * float(correct.to(torch.float64).mean()),
    }


def save_reliability_diagram(
    logits: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    *,
    n_bins: int = 15,
    title: str | None = None,
    temperature: float = 1.0,
) -> None:
    """Write a PNG reliability diagram of ``logits / temperature``: per confidence bin, accuracy against confidence.

    Top panel: one bar per non-empty bin at the bin's accuracy, the gap to the bin's mean confidence drawn on top of
    it, and the diagonal of perfect calibration; the legend gives the ECE (percent). Bottom panel: the share of
    samples per bin. A confidence of exactly 1 is drawn in the last bin. Drawn with matplotlib's object API on the
    Agg canvas; the parent folders are created and the file is written atomically.

    Args:
        logits: ``[N, K]`` floating-point logits.
        labels: ``[N]`` integer class indices in ``[0, K)``.
        path: the PNG file.
        n_bins: number of equal-width confidence bins.
        title: the figure title.
        temperature: ``T > 0`` dividing the logits.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastdd.io import atomic_write

    _check(logits, labels)
    _check_temperature(temperature)
    scaled = logits.detach().to(torch.float64) / temperature
    error = 100.0 * ece(scaled, labels, n_bins=n_bins)
    probs = scaled.softmax(dim=1).cpu()
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels.detach().cpu()).to(torch.float64)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    which = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, which, torch.ones_like(confidence))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, which, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, which, correct)
    filled = (count > 0).numpy()
    count, conf_mean, acc_mean = count.numpy(), (conf_sum / count).numpy(), (acc_sum / count).numpy()
    centres = ((edges[:-1] + edges[1:]) / 2).numpy()
    width = 1.0 / n_bins

    figure = Figure(figsize=(5.2, 6.2), dpi=100)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres[filled], acc_mean[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    top.bar(
        centres[filled],
        conf_mean[filled] - acc_mean[filled],
        bottom=acc_mean[filled],
        width=width,
        edgecolor="tab:red",
        color="tab:red",
        alpha=0.3,
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.plot([], [], linestyle="none", label=f"ECE {error:.2f} %")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize="small")
    if title:
        top.set_title(title)
    bottom.bar(centres, count / count.sum(), width=width, edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (top softmax probability)")
    bottom.set_ylabel("share of samples")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def save_max_logit_histogram(
    max_logits_by_name: dict[str, torch.Tensor], path: str | Path, *, title: str | None = None
) -> None:
    """Write a PNG with one density histogram of max logits per named set, on shared bins.

    Args:
        max_logits_by_name: name -> ``[N_name]`` max logits (``logits.max(dim=1).values``), 1-D, non-empty, finite.
        path: the PNG file (parent folders created, written atomically).
        title: the figure title.
    """
    if not max_logits_by_name:
        raise ValueError("max_logits_by_name is empty: give at least one named set of max logits")
    arrays = {}
    for name, values in max_logits_by_name.items():
        array = torch.as_tensor(values).detach().to("cpu", torch.float64).numpy()
        if array.ndim != 1 or array.size == 0:
            raise ValueError(f"max logits of {name!r} must be a non-empty 1-D tensor, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"max logits of {name!r} hold {int((~np.isfinite(array)).sum())} non-finite values")
        arrays[name] = array
    save_density_histograms(arrays, path, xlabel="max logit", title=title)


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [N, K] with N >= 1 and K >= 2, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [N] = [{logits.shape[0]}] class indices, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"logits hold {int((~torch.isfinite(logits)).sum())} non-finite values")


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
