"""The options of one evaluation, checked: every cheap check `plan_evaluation` makes before it builds anything.

`check_evaluation_options` turns the keyword options of `fastdd.evaluate.plan.plan_evaluation` (the same as those of
`evaluate_synthetic_set`) into an `EvalOptions`, or raises one `FastddError` sentence naming the option by its CLI
flag. It loads no OOD image, clusters nothing, corrupts nothing and loads no teacher, so the trust report can check
every set with it before the first plan is built.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from fastdd.config.evaluate import (
    CalibrationEvalConfig,
    EvalConfig,
    EvaluationSettings,
    LabelScoresConfig,
    TrainObjectiveConfig,
)
from fastdd.config.options import flag_of, pick
from fastdd.data import ImageDataset
from fastdd.errors import FastddError
from fastdd.evaluate.calibration_runs import (
    check_calibration_methods,
    parse_calibrations,
)
from fastdd.evaluate.ood import SCORES
from fastdd.evaluate.ood_sets import OodSetSpec, holdout_spec, parse_ood_sets
from fastdd.evaluate.robustness import (
    CLUSTER_SETS,
    NUM_CLUSTERS,
    check_cluster_count,
    parse_robustness_sets,
)
from fastdd.io import SyntheticSet
from fastdd.trust.masking import DEFAULT_MASK_RATIO
from fastdd.trust.outlier_exposure import synthetic_outliers
from fastdd.trust.outlier_loss import OutlierBatches

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
        calibration_settings: MTS's mask ratio (the default filled in), mask unit and fit, the ECE's bins.
        plots: the folder of the plots, or None.
        outliers: the synthetic outliers the networks train with (images and loss weight), or None.
        training: the networks' training objective (``train_loss``, or ``train_plugin`` with ``teacher`` and the
            ``oal_*`` options), and ``init``.
        label_scores: DD-Ranking's scores (``label_scores``) and the full-data network folder (``scores_full``).
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
    calibration_settings: CalibrationEvalConfig
    plots: str | Path | None
    outliers: OutlierBatches | None
    training: TrainObjectiveConfig
    label_scores: LabelScoresConfig = dataclasses.field(default_factory=LabelScoresConfig)


def evaluation_settings(
    *,
    models: Sequence[str] | str = "convnet",
    config: EvalConfig | None = None,
    ood: Sequence[str] | str | None = None,
    scores: Sequence[str] | str | None = None,
    plots: str | Path | None = None,
    ood_size: int | None = None,
    use_outliers: bool = True,
    data_root: str | None = None,
    robustness: Sequence[str] | str | None = None,
    calibration: Sequence[str] | str | None = None,
    mask_ratio: float | None = None,
    train_loss: str = "ce",
    train_plugin: str | None = None,
    teacher: str | None = None,
    **options: Any,
) -> EvaluationSettings:
    """The `EvaluationSettings` of the keyword form of `evaluate_synthetic_set` / `plan_evaluation` (lists as
    Python lists, the protocol as an `EvalConfig`), checked as the command line's are.

    Args:
        models: architectures to train.
        config: training protocol (default `EvalConfig()`).
        ood: OOD set names (`parse_ood_sets` syntax), or None for accuracy only.
        scores: OOD scores among ``SCORES`` (default ``["msp"]``, TrustDD's; ``["energy"]`` with OAL).
        plots: folder for ``ood_<model>_<score>.png`` score histograms (ID test scores against each OOD set's scores,
            pooled over the runs) and the calibration plots.
        ood_size: at most this many images per side and set (quick runs), or None.
        use_outliers: train with the synthetic outliers when the set has them.
        data_root: folder of the datasets named as OOD sets.
        robustness: robustness measures among ``ROBUSTNESS_SETS``, or None for none.
        calibration: calibration methods among ``CALIBRATIONS``, or None.
        mask_ratio: MTS masking ratio (default `fastdd.trust.masking.DEFAULT_MASK_RATIO`).
        train_loss: the evaluation networks' loss, one of ``TRAIN_LOSSES``.
        train_plugin: None or ``"oal"``.
        teacher: OAL's teacher: ``"expert"`` or a path (`fastdd.trust.teacher.load_teacher`).
        options: any other field of `EvaluationSettings` by its name, as the command line's option of the same name
            (e.g. ``mask_ratio="auto"`` with ``calibration_val``, ``mask_unit``, ``mts_fit``, ``ece_bins``,
            ``init``, ``oal_kl``, ``oal_recipe``, ``oal_beta``).
    Raises:
        ConfigError: a value the option cannot take, named by its flag.
        TypeError: a keyword that is no evaluation option, or a protocol field given outside ``config``.
    """
    protocol = config or EvalConfig()
    unknown = sorted(set(options) - _OTHER_SETTINGS)
    if unknown:
        raise TypeError(f"evaluation_settings got unexpected keyword(s) {', '.join(unknown)}; the training protocol "
                        "goes in config=EvalConfig(...)")
    return EvaluationSettings(
        **{f.name: getattr(protocol, f.name) for f in dataclasses.fields(EvalConfig)},
        models=_joined(models), ood=_joined(ood), scores=_joined(scores), plots=None if plots is None else str(plots),
        ood_size=ood_size, use_outliers=use_outliers, data_root=data_root, robustness=robustness is not None,
        robustness_sets=_joined(robustness), calibration=_joined(calibration), mask_ratio=mask_ratio,
        train_loss=train_loss, train_plugin=train_plugin, teacher=teacher, **options,
    )


# The settings `evaluation_settings` takes unchanged through its ``options``: those it names or converts are not here.
_OTHER_SETTINGS = frozenset(f.name for f in dataclasses.fields(EvaluationSettings)) - frozenset(
    f.name for f in dataclasses.fields(EvalConfig)) - frozenset(inspect.signature(evaluation_settings).parameters) - {
    "robustness_sets"}


def _joined(value: Sequence[str] | str | None) -> str | None:
    """A comma list from a string or a list of strings (each of which may hold commas); None for none."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    return ",".join(part.strip() for item in items for part in str(item).split(",") if part.strip()) or None


def check_evaluation_options(synset: SyntheticSet, dataset: ImageDataset, settings: EvaluationSettings) -> EvalOptions:
    """Check an evaluation of ``synset`` against its ``dataset`` (`dataset_for_synset`) without building anything
    expensive: no OOD image is made, no test image clustered or corrupted, no teacher loaded. ``settings`` has
    checked its own values; this checks what needs the set and the data (OOD set names and holdout ranges, scores
    only with OOD sets, plots only with something to draw, OAL and outlier combinations, TS on single-image
    classes, test images enough for the clusters).

    Returns:
        The checked `EvalOptions` (defaults filled in, OOD sets parsed, the holdout task cut out).
    Raises:
        FastddError: one sentence naming the option (by its CLI flag) and what to do.
    """
    st = settings
    specs = _check_ood_sets(st.ood, dataset)
    if st.scores and not specs:
        raise FastddError("--score chooses OOD scores, so it needs at least one --ood set.")
    default_scores = DEFAULT_OAL_SCORES if st.train_plugin == "oal" else DEFAULT_SCORES
    score_names = check_scores(st.scores, default_scores) if specs else []
    chosen = st.chosen_robustness()
    robustness_sets = parse_robustness_sets(chosen) if chosen is not None else ()
    calibrations = parse_calibrations(st.calibration) if st.calibration is not None else ()
    calibration_settings = pick(CalibrationEvalConfig, st)
    if calibration_settings.mask_ratio is None:
        calibration_settings.mask_ratio = DEFAULT_MASK_RATIO
    if st.plots is not None and not specs and not calibrations:
        raise FastddError(
            "--plots draws OOD score histograms or reliability diagrams, so it needs --ood or --calibration."
        )
    _check_training_plugin(st.train_loss, st.train_plugin, st.teacher, specs)
    if st.train_plugin != "oal":
        changed = [flag_of(f) for f in dataclasses.fields(TrainObjectiveConfig)
                   if f.name.startswith("oal_") and getattr(st, f.name) != f.default]
        if changed:
            verb = "applies" if len(changed) == 1 else "apply"
            raise FastddError(f"{', '.join(changed)} only {verb} with --train-plugin oal.")
    task = evaluation_task(synset, dataset, holdout_spec(specs))
    outliers = synthetic_outliers(synset) if st.use_outliers else None
    if outliers is not None and (st.train_loss != "ce" or st.train_plugin is not None):
        what = "--train-plugin oal" if st.train_plugin is not None else f"--train-loss {st.train_loss}"
        raise FastddError(
            f"{what} trains on the synthetic images only, but this set has outlier images; pass --ignore-outliers."
        )
    check_calibration_methods(task.targets, calibrations)
    if any(name in CLUSTER_SETS for name in robustness_sets):
        check_cluster_count(task.test_images.shape[0], NUM_CLUSTERS)
    models = list(dict.fromkeys(st.models.split(",")))
    if st.label_scores:
        _check_label_scores(st, models, task, dataset.name)
    return EvalOptions(
        synset, dataset, models, st.protocol, task, specs, score_names, st.ood_size,
        st.data_root, robustness_sets, calibrations, calibration_settings, st.plots, outliers,
        pick(TrainObjectiveConfig, st), pick(LabelScoresConfig, st),
    )


def _check_label_scores(settings: EvaluationSettings, models: list[str], task: EvalTask, dataset: str) -> None:
    from fastdd.network_files import read_network_meta

    if task.holdout is not None:
        raise FastddError("--scores compares with networks trained on all classes, so it cannot score holdout:K "
                          "networks; drop holdout:K.")
    if settings.scores_full is not None:
        if len(models) > 1:
            raise FastddError("--scores-full names the full-data network of one model, and --models lists "
                              f"{len(models)}; score one model at a time or leave out --scores-full.")
        meta = read_network_meta(settings.scores_full)
        if meta.get("model") != models[0]:
            raise FastddError(f"--scores-full {settings.scores_full} holds a {meta.get('model')}, but the evaluation "
                              f"trains {models[0]}; pass the full-data network of {models[0]}.")
        if meta.get("dataset") != dataset:
            raise FastddError(f"--scores-full {settings.scores_full} was trained on {meta.get('dataset')}, not "
                              f"{dataset}.")


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
