"""The options of one evaluation, checked: every cheap check `plan_evaluation` makes before it builds anything.

`check_evaluation_options` turns the keyword options of `fastdd.evaluate.plan.plan_evaluation` (the same as those of
`evaluate_synthetic_set`) into an `EvalOptions`, or raises one `FastddError` sentence naming the option by its CLI
flag. It loads no OOD image, clusters nothing, corrupts nothing and loads no teacher, so the trust report can check
every set with it before the first plan is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from fastdd.data import ImageDataset
from fastdd.errors import FastddError
from fastdd.evaluate.calibration_runs import check_calibration_methods, parse_calibrations
from fastdd.evaluate.ood import SCORES
from fastdd.evaluate.ood_sets import OodSetSpec, holdout_spec, parse_ood_sets
from fastdd.evaluate.protocol import EvalConfig
from fastdd.evaluate.robustness import CLUSTER_SETS, NUM_CLUSTERS, check_cluster_count, parse_robustness_sets
from fastdd.io import SyntheticSet
from fastdd.trust.masking import DEFAULT_MASK_RATIO
from fastdd.trust.outlier_exposure import synthetic_outliers
from fastdd.trust.outlier_loss import OutlierBatches
from fastdd.trust.train_losses import TRAIN_LOSSES

# TrustDD's default OOD score: its tables are MSP numbers, so the default output compares with the paper directly.
DEFAULT_SCORES = ("msp",)
# OAL's paper scores with the energy.
DEFAULT_OAL_SCORES = ("energy",)


@dataclass
class EvalTask:
    """What the evaluation networks learn and are tested on (all classes, or the classes below a holdout K)."""

    shape: SimpleNamespace  # channels, num_classes, image_size: what `build_model_for` needs
    images: torch.Tensor  # [K_syn, C, H, W] synthetic training images
    targets: torch.Tensor  # [K_syn] labels or [K_syn, classes] soft labels
    test_images: torch.Tensor  # [M, C, H, W] ID test images
    test_labels: torch.Tensor  # [M]
    holdout: int | None


@dataclass
class EvalOptions:
    """The checked options of one evaluation (made by `check_evaluation_options`; nothing expensive is built yet).

    Attributes:
        synset: the synthetic set.
        dataset: its real dataset.
        models: the architectures to train.
        config: the training protocol.
        task: what the networks learn and are tested on.
        ood: the parsed OOD sets, in the order given (empty for none).
        scores: the OOD scores (empty without OOD sets).
        ood_size: at most this many images per side and OOD set, or None.
        data_root: folder of the datasets named as OOD sets.
        robustness: the robustness measures, in the order of ``ROBUSTNESS_SETS`` (empty for none).
        calibration: the calibration methods, in the order of ``CALIBRATIONS`` (empty for none).
        mask_ratio: MTS's masking ratio (the default filled in).
        plots: the folder of the plots, or None.
        outliers: the synthetic outliers the networks train with (images and loss weight), or None.
        train_loss: the networks' loss (one of ``TRAIN_LOSSES``).
        train_plugin: None or ``"oal"``.
        teacher: OAL's teacher, or None.
    """

    synset: SyntheticSet
    dataset: ImageDataset
    models: list[str]
    config: EvalConfig
    task: EvalTask
    ood: list[OodSetSpec]
    scores: list[str]
    ood_size: int | None
    data_root: str | None
    robustness: tuple[str, ...]
    calibration: tuple[str, ...]
    mask_ratio: float
    plots: str | Path | None
    outliers: OutlierBatches | None
    train_loss: str
    train_plugin: str | None
    teacher: str | None


def check_evaluation_options(
    synset: SyntheticSet,
    dataset: ImageDataset,
    *,
    models: list[str],
    config: EvalConfig | None = None,
    ood: list[str] | str | None = None,
    scores: list[str] | str | None = None,
    plots: str | Path | None = None,
    ood_size: int | None = None,
    use_outliers: bool = True,
    data_root: str | None = None,
    robustness: list[str] | str | None = None,
    calibration: list[str] | str | None = None,
    mask_ratio: float | None = None,
    train_loss: str = "ce",
    train_plugin: str | None = None,
    teacher: str | None = None,
) -> EvalOptions:
    """Check the options of an evaluation (`fastdd.evaluate.plan.plan_evaluation`, `evaluate_synthetic_set`) without
    building anything expensive: no OOD image is made, no test image clustered or corrupted, no teacher loaded.

    Args:
        synset: the synthetic set.
        dataset: its real dataset (`dataset_for_synset`).
        models: architectures to train.
        config: training protocol (default `EvalConfig()`).
        ood: OOD set names (`parse_ood_sets` syntax), or None for accuracy only.
        scores: OOD scores among ``SCORES`` (default ``["msp"]``, TrustDD's; ``["energy"]`` with OAL).
        plots: folder for ``ood_<model>_<score>.png`` score histograms (ID test scores against each OOD set's scores,
            pooled over the runs) and the calibration plots.
        ood_size: at most this many images per side and set (quick runs), or None.
        use_outliers: train with the synthetic outliers when the set has them.
        data_root: folder of the datasets named as OOD sets.
        robustness: robustness measures among ``ROBUSTNESS_SETS`` (`parse_robustness_sets` syntax: names or
            comma-separated names), or None for none.
        calibration: calibration methods among ``CALIBRATIONS`` (names or comma-separated names), or None.
        mask_ratio: MTS masking ratio (default `fastdd.trust.masking.DEFAULT_MASK_RATIO`).
        train_loss: the evaluation networks' loss, one of ``TRAIN_LOSSES``.
        train_plugin: None or ``"oal"``.
        teacher: OAL's teacher: ``"expert"`` or a path (`fastdd.trust.teacher.load_teacher`).
    Returns:
        The checked `EvalOptions` (defaults filled in, OOD sets parsed, the holdout task cut out).
    Raises:
        FastddError: one sentence naming the option (by its CLI flag) and what to do.
    """
    config = config or EvalConfig()  # an EvalConfig checks its own fields when made
    if ood_size is not None and ood_size < 1:
        raise FastddError(f"--ood-size must be at least 1, got {ood_size}.")
    specs = _check_ood_sets(ood, dataset)
    if scores and not specs:
        raise FastddError("--score chooses OOD scores, so it needs at least one --ood set.")
    default_scores = DEFAULT_OAL_SCORES if train_plugin == "oal" else DEFAULT_SCORES
    score_names = check_scores(scores, default_scores) if specs else []
    robustness_sets = parse_robustness_sets(robustness) if robustness is not None else ()
    calibrations = parse_calibrations(calibration) if calibration is not None else ()
    mask_ratio = DEFAULT_MASK_RATIO if mask_ratio is None else mask_ratio
    if not 0.0 <= mask_ratio < 1.0:
        raise FastddError(f"--mask-ratio must be in [0, 1), got {mask_ratio}.")
    if plots is not None and not specs and not calibrations:
        raise FastddError(
            "--plots draws OOD score histograms or reliability diagrams, so it needs --ood or --calibration."
        )
    _check_training_plugin(train_loss, train_plugin, teacher, specs)
    task = evaluation_task(synset, dataset, holdout_spec(specs))
    outliers = synthetic_outliers(synset) if use_outliers else None
    if outliers is not None and (train_loss != "ce" or train_plugin is not None):
        what = "--train-plugin oal" if train_plugin is not None else f"--train-loss {train_loss}"
        raise FastddError(
            f"{what} trains on the synthetic images only, but this set has outlier images; pass --ignore-outliers."
        )
    if train_plugin is None and train_loss.strip().lower() not in TRAIN_LOSSES:
        raise FastddError(f"unknown training loss {train_loss!r}; choose from {', '.join(TRAIN_LOSSES)}.")
    check_calibration_methods(task.targets, calibrations)
    if any(name in CLUSTER_SETS for name in robustness_sets):
        check_cluster_count(task.test_images.shape[0], NUM_CLUSTERS)
    return EvalOptions(
        synset, dataset, list(models), config, task, specs, score_names, ood_size, data_root, robustness_sets,
        calibrations, mask_ratio, plots, outliers, train_loss, train_plugin, teacher,
    )


def evaluation_task(synset: SyntheticSet, dataset: ImageDataset, holdout: OodSetSpec | None) -> EvalTask:
    """The synthetic images and targets the networks train on and the test images they are scored on: all of them,
    or with ``holdout:K`` the classes ``< K`` only (soft labels restricted to those classes and renormalised).

    Raises:
        FastddError: the set has no image of the classes below ``K``.
    """
    targets = synset.soft_labels if synset.soft_labels is not None else synset.labels
    if holdout is None:
        shape = SimpleNamespace(
            channels=dataset.channels, num_classes=dataset.num_classes, image_size=dataset.image_size
        )
        return EvalTask(shape, synset.images, targets, dataset.test_images, dataset.test_labels, None)
    k = holdout.holdout_classes
    keep = synset.labels < k
    if not bool(keep.any()):
        raise FastddError(f"the synthetic set has no images of the classes below {k}, so holdout:{k} cannot train.")
    targets = targets[keep]
    if targets.dim() == 2:  # soft labels: keep the first K classes, renormalised
        targets = targets[:, :k]
        targets = targets / targets.sum(dim=1, keepdim=True).clamp_min(torch.finfo(targets.dtype).tiny)
    test_keep = dataset.test_labels < k
    shape = SimpleNamespace(channels=dataset.channels, num_classes=k, image_size=dataset.image_size)
    return EvalTask(
        shape, synset.images[keep], targets, dataset.test_images[test_keep], dataset.test_labels[test_keep], k
    )


def check_scores(scores: list[str] | str | None, default: tuple[str, ...] = DEFAULT_SCORES) -> list[str]:
    """OOD score names from ``"msp,energy"`` or a list of such strings (``default`` when none is given), each once.

    Raises:
        FastddError: an unknown score.
    """
    items = [scores] if isinstance(scores, str) else list(scores or [])
    names = [part.strip().lower() for item in items for part in item.split(",") if part.strip()]
    names = names or list(default)
    unknown = [s for s in names if s not in SCORES]
    if unknown:
        raise FastddError(f"unknown OOD score {unknown[0]!r}; choose from {', '.join(SCORES)}.")
    return list(dict.fromkeys(names))


def _check_ood_sets(ood: list[str] | str | None, dataset: ImageDataset) -> list[OodSetSpec]:
    specs = parse_ood_sets(ood, num_classes=dataset.num_classes) if ood else []
    for spec in specs:
        if spec.kind == "dataset" and spec.source == dataset.name:
            raise FastddError(
                f"{dataset.name} is the in-distribution dataset, so it cannot be an OOD set; use holdout:K instead."
            )
    return specs


def _check_training_plugin(
    train_loss: str, train_plugin: str | None, teacher: str | None, specs: list[OodSetSpec]
) -> None:
    if train_plugin not in (None, "oal"):
        raise FastddError(f"unknown training plug-in {train_plugin!r}; the only one is oal.")
    if train_plugin == "oal" and train_loss != "ce":
        raise FastddError(
            "OAL brings its own loss (CE + distillation + MICL), so it cannot be combined with --train-loss."
        )
    if train_plugin == "oal" and teacher is None:
        raise FastddError("OAL needs a teacher: pass --teacher expert or --teacher PATH.")
    if teacher is not None and train_plugin != "oal":
        raise FastddError("--teacher is only used by --train-plugin oal.")
    if train_plugin == "oal" and holdout_spec(specs) is not None:
        raise FastddError(
            "OAL's teacher classifies all classes, so it cannot train holdout:K networks; drop holdout:K."
        )
