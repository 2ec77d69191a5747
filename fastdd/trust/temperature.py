"""Temperature scaling (TS) and Masked Temperature Scaling (MTS) of networks trained on a synthetic set.

TS divides the logits by one temperature ``T > 0`` fitted by negative log-likelihood on validation images. Nets trained
on a synthetic set S have no spare data, so fastdd offers two validation sets:

* ``ts``: a held-out split of S (:func:`per_class_holdout`, 10 % per class); the nets train on the rest.
* ``mts``: the nets train on ALL of S; the validation set is drawn per class from S (:func:`per_class_sample`) and its
  inputs are randomly masked (:mod:`fastdd.trust.masking`), so the net is no longer sure of images it has fitted
  (:func:`masked_temperature`). With ratio 0 this is TS fitted on S itself.

Synthetic sets with soft labels ``[K, num_classes]`` are scaled against their hard labels (the argmax of each row):
every function here accepts either ``[N]`` class indices or ``[N, num_classes]`` soft labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdd.errors import FastddError
from fastdd.trust.masking import mask_images

# The fitted temperature is kept in [T_MIN, T_MAX]. When every validation image is already classified right with a
# margin (a net scored on the images it was trained on), the NLL keeps falling as T -> 0 and has no minimum; the
# bound makes that case return T_MIN instead of wherever the optimiser stopped. NLL(z / T) is convex in 1 / T, so
# clamping the unconstrained minimiser gives the minimiser on the interval.
T_MIN: float = 0.01
T_MAX: float = 100.0
_MAX_ITER = 100


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices ``[N]`` int64 from ``[N]`` integer labels or from ``[N, num_classes]`` soft labels (row argmax)."""
    if labels.dim() == 2 and labels.is_floating_point():
        return labels.argmax(dim=1)
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be [N] integer class indices or [N, num_classes] float soft labels, got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}"
        )
    return labels.long()


def _checked_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, class indices)`` as float64 / int64 CPU tensors, after checking shapes, range and finiteness."""
    if logits.dim() != 2 or logits.shape[0] < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point [N, K] tensor with N >= 1, got {tuple(logits.shape)}")
    targets = hard_labels(labels).detach().cpu()
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"labels must hold {logits.shape[0]} entries, got shape {tuple(labels.shape)}")
    if int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got [{int(targets.min())}, {int(targets.max())}]")
    z = logits.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"logits hold {int((~torch.isfinite(z)).sum())} non-finite values")
    return z, targets


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` minimising the mean NLL of ``labels`` under ``softmax(logits / T)``.

    L-BFGS (strong-Wolfe line search, at most 100 iterations) on ``log T`` from ``T = 1``, in float64 on the CPU, so
    the result is deterministic and independent of the logits' device. The result is clamped to ``[T_MIN, T_MAX]``.

    Args:
        logits: ``[N, K]`` floating-point logits, ``N >= 1``, finite.
        labels: ``[N]`` class indices in ``[0, K)`` (or ``[N, K]`` soft labels, scaled against their argmax).
    Returns:
        the fitted temperature ``T > 0``.
    """
    z, targets = _checked_logits(logits, labels)
    low, high = math.log(T_MIN), math.log(T_MAX)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=_MAX_ITER,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Outside the bounds the loss is flat (zero gradient), which stops L-BFGS there; exp never overflows.
        loss = F.cross_entropy(z * torch.exp(-log_t.clamp(low, high)), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(torch.exp(log_t.detach().clamp(low, high)))


# The calibration authors' fit (ModelWithTemperature.set_temperature of their mtt-distillation fork): T itself starts
# at 1.5 and L-BFGS runs with lr 0.01, at most 50 iterations and no line search, so it often stops short of the
# minimum, pulled toward 1.5.
AUTHORS_START, AUTHORS_LR, AUTHORS_MAX_ITER = 1.5, 0.01, 50
TEMPERATURE_FITS = ("fastdd", "authors")


def fit_temperature_authors(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature as the calibration authors fit it: ``T`` from 1.5, L-BFGS (lr 0.01, at most 50 iterations,
    no line search) on the mean NLL of ``softmax(logits / T)``, without bounds. Computed in float64 on the CPU.

    Args:
        logits: ``[N, K]`` floating-point logits, ``N >= 1``, finite.
        labels: ``[N]`` class indices in ``[0, K)`` (or ``[N, K]`` soft labels, scaled against their argmax).
    Returns:
        the temperature where the optimiser stopped. Without a line search it can overshoot past 0 (seen on
        digits networks with element masks): a result ``<= 0`` (or not finite) is returned as it is, and callers
        treat it as a failed fit (:func:`usable_temperature`).
    """
    z, targets = _checked_logits(logits, labels)
    temperature = torch.full((), AUTHORS_START, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([temperature], lr=AUTHORS_LR, max_iter=AUTHORS_MAX_ITER)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / temperature, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(temperature.detach())


def usable_temperature(temperature: float) -> bool:
    """True for a temperature that can scale logits: finite and positive."""
    return math.isfinite(temperature) and temperature > 0


def fit_temperature_with(fit: str, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """:func:`fit_temperature` (``fit="fastdd"``) or :func:`fit_temperature_authors` (``fit="authors"``)."""
    if fit == "fastdd":
        return fit_temperature(logits, labels)
    if fit == "authors":
        return fit_temperature_authors(logits, labels)
    raise ValueError(f"fit must be one of {', '.join(TEMPERATURE_FITS)}, got {fit!r}")


def per_class_holdout(
    labels: torch.Tensor, fraction: float = 0.1, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the images of each class into training and validation images (the TS validation split).

    Per class ``c`` with ``n_c`` images, ``max(1, round(fraction * n_c))`` images, at most ``n_c - 1``, go to
    validation, chosen uniformly at random. Only classes present in ``labels`` are considered.

    Args:
        labels: ``[N]`` class indices (or ``[N, K]`` soft labels, split by their argmax).
        fraction: share of each class held out, in ``(0, 1)``.
        generator: the source of the random choice (one ``torch.rand(N)`` draw).
    Returns:
        ``(train_idx, val_idx)``: sorted int64 indices into ``labels``, disjoint, together covering ``[0, N)``, on
        ``labels``' device.
    Raises:
        FastddError: a class has a single image, which cannot be both trained on and held out.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    targets = hard_labels(labels).cpu()
    order = _random_order_by_class(targets, generator)
    train, val = [], []
    for c, idx in order.items():
        if idx.numel() == 1:
            raise FastddError(
                f"class {c} has a single synthetic image, so temperature scaling cannot hold one out; use "
                "--calibration mts (which fits the temperature on all of the synthetic set) or distill at least "
                "2 images per class."
            )
        held = min(max(1, round(fraction * idx.numel())), idx.numel() - 1)
        val.append(idx[:held])
        train.append(idx[held:])
    return torch.cat(train).sort().values.to(labels.device), torch.cat(val).sort().values.to(labels.device)


def per_class_sample(labels: torch.Tensor, per_class: int | None, *, generator: torch.Generator) -> torch.Tensor:
    """Indices of a class-balanced validation set drawn from ``labels`` (the MTS validation set).

    ``per_class = None`` takes every image once (``arange(N)``, no draw from ``generator``). Otherwise each class
    present in ``labels`` gets exactly ``per_class`` entries: a uniform random subset without repeats when
    ``per_class <= n_c``, and otherwise the class's images cycled in one random order, so each image appears
    ``floor(per_class / n_c)`` or ``ceil(per_class / n_c)`` times. No class is missing or over-sampled.

    Args:
        labels: ``[N]`` class indices (or ``[N, K]`` soft labels, sampled by their argmax).
        per_class: entries per class (``>= 1``) or None for all images.
        generator: the source of the random choice (one ``torch.rand(N)`` draw when ``per_class`` is given).
    Returns:
        sorted int64 indices into ``labels`` (with repeats only when ``per_class`` exceeds a class's size), on
        ``labels``' device.
    """
    targets = hard_labels(labels)
    if per_class is None:
        return torch.arange(targets.shape[0], device=labels.device)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1 or None, got {per_class!r}")
    order = _random_order_by_class(targets.cpu(), generator)
    picked = [idx.repeat(-(-per_class // idx.numel()))[:per_class] for idx in order.values()]
    return torch.cat(picked).sort().values.to(labels.device)


def masked_temperature(
    net: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    ratio: float,
    generator: torch.Generator,
    patch: int = 1,
    per_class: int | None = None,
    repeats: int = 1,
    unit: str = "pixel",
    fit: str = "fastdd",
) -> float:
    """Masked Temperature Scaling: the temperature fitted on randomly masked images of the net's own training set.

    The validation set is :func:`per_class_sample` ``(labels, per_class)`` over all of S; each selected image is
    masked ``repeats`` times with independent masks (:func:`fastdd.trust.masking.random_mask`, ``ratio``, ``patch``);
    the net (switched to eval mode) gives logits for the masked images; :func:`fit_temperature` fits ``T`` on them.
    Generator draws, in order: the per-class sample (only when ``per_class`` is given), then the masks. With
    ``ratio = 0`` nothing is masked and ``repeats`` is ignored, so the result equals
    ``fit_temperature(predict_logits(net, images[idx]), labels[idx])`` exactly: TS fitted on S.

    Args:
        net: the classifier trained on ``images``.
        images: ``[N, C, H, W]`` synthetic images (normalised).
        labels: ``[N]`` class indices or ``[N, K]`` soft labels (scaled against their argmax).
        ratio: mask ratio in ``[0, 1)``.
        generator: the source of every random choice.
        patch: mask cell side in pixels (1 = pixel masking).
        per_class: validation images per class, or None for every image of S once.
        repeats: masks drawn per validation image, ``>= 1`` (more masks, less noise in ``T``).
        unit: ``"pixel"`` (exact count, shared over channels) or ``"element"`` (each value independently, the
            calibration authors' masks); see :func:`fastdd.trust.masking.mask_images`.
        fit: ``"fastdd"`` (:func:`fit_temperature`) or ``"authors"`` (:func:`fit_temperature_authors`).
    Returns:
        the fitted temperature ``T > 0``.
    """
    from fastdd.training import predict_logits

    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    targets = hard_labels(labels)
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"images hold {images.shape[0]} images but labels {targets.shape[0]} entries")
    if not 0 <= ratio < 1:
        raise ValueError(f"the mask ratio must lie in [0, 1), got {ratio}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    idx = per_class_sample(targets, per_class, generator=generator)
    inputs, targets = images[idx.to(images.device)], targets[idx.to(targets.device)]
    if ratio > 0:
        inputs = mask_images(inputs.repeat(repeats, 1, 1, 1), ratio, generator=generator, unit=unit, patch=patch)
        targets = targets.repeat(repeats)
    return fit_temperature_with(fit, predict_logits(net, inputs), targets)


def _random_order_by_class(targets: torch.Tensor, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Class -> that class's indices in a uniformly random order, from one ``torch.rand(N)`` draw (CPU ``targets``)."""
    if targets.numel() == 0:
        raise ValueError("labels are empty: there is no class to sample from")
    keys = torch.rand(targets.shape[0], generator=generator, device=generator.device).cpu()
    order = {}
    for c in targets.unique().tolist():
        idx = (targets == c).nonzero().flatten()
        order[int(c)] = idx[keys[idx].argsort()]
    return order
