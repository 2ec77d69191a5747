"""Out-of-distribution scores of a classifier's logits, and the detection metrics computed from them.

Every score follows one orientation: a higher score means "more in-distribution" (ID). The metrics treat the ID
test images as the positive class unless stated otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastdd.errors import FastddError
from fastdd.evaluate.histograms import save_density_histograms

SCORES: tuple[str, ...] = ("msp", "mls", "energy", "gen")
METRICS: tuple[str, ...] = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood")


def ood_score(
    logits: torch.Tensor,
    name: str,
    *,
    temperature: float = 1.0,
    gamma: float = 0.1,
    top_m: int | None = None,
) -> torch.Tensor:
    """An OOD score per sample from the logits ``z`` ``[N, K]``; higher means more in-distribution.

    * ``msp``: maximum softmax probability, ``max_k softmax(z)_k``.
    * ``mls``: maximum logit, ``max_k z_k``.
    * ``energy``: negative free energy, ``T * logsumexp(z / T)`` with ``T = temperature``.
    * ``gen``: generalized entropy, ``-sum_{k in top-M} p_k^gamma (1 - p_k)^gamma`` over the ``M = top_m`` largest
      softmax probabilities ``p``; ``top_m=None`` uses all ``K`` classes.

    Args:
        logits: ``[N, K]`` floating-point logits.
        name: one of :data:`SCORES`.
        temperature: ``T > 0`` of ``energy`` (ignored by the others).
        gamma: ``gamma > 0`` of ``gen``.
        top_m: ``1 <= M <= K`` of ``gen``, or None for ``K``.
    Returns:
        ``[N]`` scores, same dtype and device as ``logits``.
    """
    if name not in SCORES:
        raise FastddError(f"unknown OOD score {name!r}; choose from {', '.join(SCORES)}.")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [N, K] with K >= 1, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if name == "mls":
        return logits.max(dim=1).values
    if name == "energy":
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        return temperature * torch.logsumexp(logits / temperature, dim=1)
    probs = logits.softmax(dim=1)
    if name == "msp":
        return probs.max(dim=1).values
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    classes = logits.shape[1]
    m = classes if top_m is None else top_m
    if not 1 <= m <= classes:
        raise ValueError(f"top_m must lie in [1, {classes}], got {top_m}")
    top = probs.topk(m, dim=1).values if m < classes else probs
    return -(top.pow(gamma) * (1 - top).pow(gamma)).sum(dim=1)


def ood_metrics(
    scores_in: torch.Tensor | Sequence[float], scores_out: torch.Tensor | Sequence[float]
) -> dict[str, float]:
    """Detection metrics of ID scores against OOD scores (higher score = more in-distribution), in percent (as
    ``calibration_metrics`` and every table of fastdd).

    With ID as the positive class, a threshold ``t`` accepts a sample as ID when its score is ``>= t``. Tied scores
    are never split: the ROC points are those of ``sklearn.metrics.roc_curve`` (one point per distinct score, with
    ``drop_intermediate=False``), so all samples sharing a score are accepted or rejected together.

    * ``auroc``: ``roc_auc_score`` with ID positive (an ID/OOD tie counts one half).
    * ``aupr_in``: ``average_precision_score`` with ID positive and the score as is.
    * ``aupr_out``: ``average_precision_score`` with OOD positive and the score negated.
    * ``fpr95`` (TrustDD's convention): the smallest false-positive rate (share of OOD accepted) among the ROC points
      whose true-positive rate (share of ID accepted) is at least 95 %.
    * ``fpr95_openood`` (OpenOOD's convention): the same construction with OOD positive and the score negated: the
      smallest share of ID flagged as OOD among the points where at least 95 % of the OOD samples are flagged.

    "At least 95 %" is decided on counts (``20 * accepted >= 19 * total``), free of float rounding.

    Args:
        scores_in: ``[N_in]`` scores of ID samples (1-D, non-empty, finite).
        scores_out: ``[N_out]`` scores of OOD samples (1-D, non-empty, finite).
    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood"}`` -> percent in [0, 100].
    """
    from sklearn.metrics import average_precision_score, roc_auc_score  # imported on use: ~1.5 s

    s_in = _as_scores(scores_in, "scores_in")
    s_out = _as_scores(scores_out, "scores_out")
    scores = np.concatenate([s_in, s_out])
    is_in = np.concatenate([np.ones(s_in.size, dtype=np.int64), np.zeros(s_out.size, dtype=np.int64)])
    fractions = {
        "auroc": float(roc_auc_score(is_in, scores)),
        "aupr_in": float(average_precision_score(is_in, scores)),
        "aupr_out": float(average_precision_score(1 - is_in, -scores)),
        "fpr95": _fpr_at_95_tpr(is_in, scores),
        "fpr95_openood": _fpr_at_95_tpr(1 - is_in, -scores),
    }
    return {name: 100.0 * value for name, value in fractions.items()}


def _fpr_at_95_tpr(positive: np.ndarray, scores: np.ndarray) -> float:
    """Smallest FPR over the ROC points (ties grouped) whose TPR is at least 95 %."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
    num_positive = int(positive.sum())
    accepted = np.rint(tpr * num_positive)  # true positives at each point, exact integers
    return float(fpr[20 * accepted >= 19 * num_positive].min())


def _as_scores(values: torch.Tensor | Sequence[float], name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        array = values.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(array)).sum())} non-finite values")
    return array


def save_score_histograms(
    scores_in: torch.Tensor,
    scores_out: dict[str, torch.Tensor],
    path: str | Path,
    *,
    score: str,
    title: str | None = None,
) -> None:
    """Write one PNG with the histogram of the ID scores and of each OOD set's scores on shared bins.

    Each histogram is a density (area 1), so sets of different sizes compare by shape. Drawn with matplotlib's
    object API on the Agg canvas (no pyplot state, no display needed).

    Args:
        scores_in: ``[N_in]`` ID scores.
        scores_out: set name -> ``[N_set]`` scores of that OOD set.
        path: the PNG file (written atomically).
        score: the score's name, for the x label.
        title: the figure title.
    """
    arrays = {"in-distribution": _as_scores(scores_in, "scores_in")}
    for name, values in scores_out.items():
        arrays[f"OOD: {name}"] = _as_scores(values, f"scores of {name}")
    save_density_histograms(arrays, path, xlabel=f"{score} score (higher = more in-distribution)", title=title)
