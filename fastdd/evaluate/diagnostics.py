"""Diagnostics of a synthetic set from "Rethinking Data Distillation: Do Not Overlook Calibration" (Zhu et al.,
ICCV 2023): how evenly its information spreads over singular directions, and how spread out the max logits of a
network trained on it are.

The paper's SVD curve (its supplementary Figure 1, "percentage of top singular values to sum diag(Sigma)") is the
cumulative sum of the singular values of the flattened images over their total. Concentrated information bends the
curve to the top left; evenly spread information keeps it near the diagonal. It is a ratio of singular values, not
of their squares (which would be PCA's explained variance), and the images are not centred, as in the paper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from fastdd.data import ImageDataset
from fastdd.evaluate.protocol import EvalConfig, evaluation_network, train_on_synthetic
from fastdd.io import SyntheticSet
from fastdd.training import predict_logits

# Component counts reported by `svd_summary`, as fractions of all components, and the ratios whose component counts
# it reports.
SVD_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
SVD_LEVELS = (0.5, 0.9, 0.99)


def explained_variance_curve(images: torch.Tensor, *, center: bool = False) -> torch.Tensor:
    """The cumulative explained ratio of the singular values of the flattened images (paper 004's SVD curve).

    ``curve[k - 1] = (s_1 + ... + s_k) / (s_1 + ... + s_n)`` with ``s`` the singular values, in decreasing order, of
    the ``[N, C*H*W]`` matrix of flattened images, ``n = min(N, C*H*W)``. Computed in float64.

    Args:
        images: ``[N, C, H, W]``.
        center: subtract the mean image first (the paper does not).
    Returns:
        ``[min(N, C*H*W)]`` float64, non-decreasing, last entry 1.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got shape {tuple(images.shape)}")
    matrix = images.detach().reshape(images.shape[0], -1).to("cpu", torch.float64)
    if center:
        matrix = matrix - matrix.mean(dim=0, keepdim=True)
    singular = torch.linalg.svdvals(matrix)
    total = singular.sum()
    if not total > 0:
        raise ValueError("the images are all zero" + (" after centring" if center else "") + ": no SVD curve")
    return singular.cumsum(dim=0) / total


def components_reaching(curve: torch.Tensor, level: float) -> int:
    """The smallest number of top components whose cumulative ratio in ``curve`` (``[n]``) reaches ``level``."""
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    reached = (curve >= level - 1e-9).nonzero()
    return int(reached[0, 0]) + 1 if reached.numel() else int(curve.numel())


def svd_summary(
    curve: torch.Tensor, *, fractions: tuple[float, ...] = SVD_FRACTIONS, levels: tuple[float, ...] = SVD_LEVELS
) -> dict[str, Any]:
    """A few points of an SVD curve ``[n]``: ``{"components": n, "ratio_at": [{"fraction", "k", "ratio"}],
    "components_for": {"50": k, ...}}``.

    ``ratio_at`` holds the cumulative ratio at ``k = max(1, round(fraction * n))`` for each of ``fractions`` (the
    diagonal, perfectly even information, would give ``k / n``); ``components_for`` the smallest ``k`` reaching each
    of ``levels`` (keys in percent).
    """
    n = int(curve.numel())
    points = []
    for fraction in fractions:
        k = max(1, round(fraction * n))
        points.append({"fraction": fraction, "k": k, "ratio": float(curve[k - 1])})
    reach = {f"{100 * level:g}": components_reaching(curve, level) for level in levels}
    return {"components": n, "ratio_at": points, "components_for": reach}


def max_logit_summary(logits: torch.Tensor) -> dict[str, float]:
    """Spread of the max logit per image: ``{"mean", "std", "p5", "p50", "p95"}`` of ``logits.max(dim=1)``.

    ``std`` is the population form; percentiles interpolate linearly (``torch.quantile``).

    Args:
        logits: ``[N, K]``.
    """
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty [N, K] tensor, got shape {tuple(logits.shape)}")
    top = logits.detach().max(dim=1).values.to("cpu", torch.float64)
    p5, p50, p95 = torch.quantile(top, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"mean": float(top.mean()), "std": float(top.std(unbiased=False)), "p5": p5, "p50": p50, "p95": p95}


def trained_test_logits(
    synset: SyntheticSet,
    dataset: ImageDataset,
    *,
    model: str = "convnet",
    config: EvalConfig | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Test-set logits of ``config.runs`` fresh networks trained on ``synset`` with the evaluation protocol.

    The networks are those of `fastdd.evaluate.evaluate_synthetic_set` for ``model`` with the same ``config``
    (same generator seeded by ``config.seed``, learning rate, augmentation and architecture settings) trained on
    the synthetic images and their (soft) labels with cross-entropy; the set's outlier images are not used.

    Args:
        synset: the synthetic set.
        dataset: its real dataset (`fastdd.evaluate.dataset_for_synset`).
        model: the architecture.
        config: training protocol (default `EvalConfig()`).
        on_epoch: ``on_epoch(run, epoch)`` after every training epoch.
    Returns:
        ``[runs, M, num_classes]`` logits on the ``M`` test images of ``dataset``.
    """
    config = config or EvalConfig()
    if config.runs < 1:
        raise ValueError(f"config.runs must be at least 1, got {config.runs}")
    meta = synset.meta
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    lr = config.lr_for(synset)
    strategy = (meta.get("dsa_strategy") or dataset.dsa_strategy) if config.dsa else None
    targets = synset.soft_labels if synset.soft_labels is not None else synset.labels
    runs = []
    for run in range(config.runs):
        net = evaluation_network(dataset, model, meta, generator=generator, device=config.device)
        callback = (lambda epoch, r=run: on_epoch(r, epoch)) if on_epoch is not None else None
        train_on_synthetic(
            synset.images, targets, net, config=config, lr=lr, generator=generator, dsa_strategy=strategy,
            on_epoch=callback,
        )
        runs.append(predict_logits(net, dataset.test_images))
    return torch.stack(runs)


def save_explained_variance_plot(
    curves: dict[str, torch.Tensor], path: str | Path, *, title: str | None = None
) -> None:
    """Write one PNG with the SVD curve of each set against the fraction of components, and the diagonal.

    Each curve ``[n]`` is drawn from ``(0, 0)`` through ``(k / n, curve[k - 1])``, so sets of different sizes share
    the axes; the dashed diagonal is perfectly even information. Drawn with matplotlib's object API on the Agg canvas.

    Args:
        curves: set name -> ``[n]`` curve (`explained_variance_curve`).
        path: the PNG file (written atomically).
        title: the figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastdd.io import atomic_write

    if not curves:
        raise ValueError("no curves to plot")
    figure = Figure(figsize=(5.6, 5.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="diagonal (even)")
    for name, curve in curves.items():
        values = curve.detach().to("cpu", torch.float64)
        n = values.numel()
        x = torch.arange(n + 1, dtype=torch.float64) / n
        y = torch.cat([values.new_zeros(1), values])
        axes.plot(x.numpy(), y.numpy(), linewidth=1.5, label=f"{name} ({n} components)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("fraction of top singular values (k / n)")
    axes.set_ylabel("cumulative sum of singular values / total")
    if title:
        axes.set_title(title)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
