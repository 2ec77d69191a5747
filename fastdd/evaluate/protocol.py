"""The train-on-synthetic, test-on-real protocol: fresh networks trained on a synthetic set, scored on real data."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from fastdd.data import ImageDataset, load_dataset
from fastdd.errors import FastddError
from fastdd.evaluate.ood import METRICS, SCORES, ood_metrics, ood_score, save_score_histograms
from fastdd.evaluate.ood_sets import OodSetSpec, build_ood_images, holdout_spec, parse_ood_sets
from fastdd.evaluate.calibration_runs import CalibrationTask, parse_calibrations, save_calibration_plots
from fastdd.evaluate.robustness import build_robustness_tests, parse_robustness_sets, robustness_row
from fastdd.evaluate.training_objectives import TrainingObjectives
from fastdd.io import SyntheticSet
from fastdd.models import build_model_for
from fastdd.training import TrainObjective, predict_logits, train_epoch
from fastdd.trust.masking import DEFAULT_MASK_RATIO
from fastdd.trust.outlier_loss import DEFAULT_OUTLIER_WEIGHT

DEFAULT_LR = 0.01
# TrustDD's default OOD score: its tables are MSP numbers, so the default output compares with the paper directly.
DEFAULT_SCORES = ("msp",)


@dataclass
class EvalConfig:
    """How each evaluation network is trained (defaults: the protocol of the DC/DSA/MTT papers).

    ``epochs=None`` means 1000 with DSA and 300 without; ``lr=None`` means the synthetic set's learned ``syn_lr``
    when it has one, else 0.01. The learning rate is multiplied by 0.1 from epoch ``epochs // 2 + 1`` on.
    """

    runs: int = 5
    epochs: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    seed: int = 0
    device: str = "cpu"

    def epochs_or_default(self) -> int:
        return self.epochs if self.epochs is not None else (1000 if self.dsa else 300)


def dataset_for_synset(synset: SyntheticSet, *, data_root: str | None = None) -> ImageDataset:
    """Load the real dataset a synthetic set was distilled from, with the same normalisation / ZCA."""
    meta = synset.meta
    if "dataset" not in meta:
        raise FastddError("the synthetic set's synset.json does not name its dataset; it was not written by fastdd.")
    dataset = load_dataset(
        meta["dataset"],
        data_root=data_root if data_root is not None else meta.get("data_root"),
        image_size=meta.get("image_size"),
        zca=bool(meta.get("zca", False)),
    )
    expected = (dataset.channels, *dataset.image_size)
    if tuple(synset.images.shape[1:]) != expected:
        raise FastddError(
            f"the synthetic images have shape {tuple(synset.images.shape[1:])} but {dataset.name} images have shape "
            f"{expected}; pass the --data-root the set was distilled from."
        )
    return dataset


def evaluation_network(
    shape: Any, model: str, synset_meta: dict[str, Any], *, generator: torch.Generator, device: str = "cpu"
) -> torch.nn.Module:
    """A fresh evaluation network for ``shape`` (``channels``, ``num_classes``, ``image_size``): the width, depth and
    norm the set was distilled with when ``model`` is its distillation model, the defaults otherwise."""
    hyper = synset_meta.get("hyperparameters", {})
    same_as_distillation = model == synset_meta.get("model")
    return build_model_for(
        shape,
        model,
        width=hyper.get("width", 128) if same_as_distillation else 128,
        depth=hyper.get("depth") if same_as_distillation else None,
        norm=hyper.get("norm", "instancenorm") if same_as_distillation else "instancenorm",
        generator=generator,
    ).to(device)


def train_on_synthetic(
    images: torch.Tensor,
    targets: torch.Tensor,
    net: torch.nn.Module,
    *,
    config: EvalConfig,
    lr: float,
    generator: torch.Generator,
    dsa_strategy: str | None,
    on_epoch: Callable[[int], None] | None = None,
    outliers: torch.Tensor | None = None,
    outlier_weight: float = DEFAULT_OUTLIER_WEIGHT,
    objective: TrainObjective | None = None,
) -> torch.nn.Module:
    """Train ``net`` on ``images`` ``[K, C, H, W]`` with ``targets`` (``[K]`` labels or ``[K, classes]`` soft labels).

    SGD with momentum and weight decay, lr x0.1 at half the epochs, DSA per image when ``dsa_strategy`` is given.
    With ``outliers`` ``[K_out, C, H, W]`` each minibatch also carries outliers and the loss is TrustDD's integrated
    loss ``CE + outlier_weight * H(U; f(out))`` (see `fastdd.training.train_epoch`). ``objective`` replaces the
    cross-entropy (`fastdd.trust.train_losses`, `fastdd.trust.oal`); when it is an ``nn.Module`` its own trainable
    parameters (e.g. OAL's projection networks) are trained by the same SGD optimiser.
    """
    device = next(net.parameters()).device
    images, targets = images.to(device), targets.to(device)
    if outliers is not None:
        outliers = outliers.to(device)
    parameters = list(net.parameters())
    if isinstance(objective, torch.nn.Module):
        parameters += [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    epochs = config.epochs_or_default()
    decay_at = epochs // 2 + 1
    for epoch in range(epochs):
        if epoch == decay_at:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        train_epoch(
            net,
            optimizer,
            images,
            targets,
            batch_size=config.batch_size,
            generator=generator,
            dsa_strategy=dsa_strategy,
            outliers=outliers,
            outlier_weight=outlier_weight,
            objective=objective,
        )
        if on_epoch is not None:
            on_epoch(epoch)
    return net


def evaluate_synthetic_set(
    synset: SyntheticSet,
    dataset: ImageDataset,
    *,
    models: list[str],
    config: EvalConfig | None = None,
    on_epoch: Callable[[str, int, int], None] | None = None,
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
) -> dict[str, Any]:
    """Train ``config.runs`` fresh networks of each of ``models`` on ``synset`` and test them on ``dataset``.

    Each network is trained on the synthetic images, plus the synthetic outliers with TrustDD's integrated loss when
    the set holds ``outlier_images`` and ``use_outliers`` is true (weight ``hyperparameters["outlier_weight"]``, 0.5
    by default). It then makes one forward pass over the ID test images (for the accuracy and the ID scores) and one
    over each OOD set.

    OOD sets (see `fastdd.evaluate.ood_sets`) are built once per evaluation, before any training, each from its own
    generator seeded by ``(config.seed, set name)``: a set's images and its ID subsample do not depend on the other
    sets or their order, and the networks (hence the accuracy) are those of an evaluation without ``ood``. ID and OOD
    sides are subsampled to the same size ``n = min(#ID test, #OOD set, ood_size)``; the accuracy always uses the
    whole ID test split.

    ``holdout:K`` changes the whole evaluation: the networks get a ``K``-way head and are trained on the synthetic
    images of classes ``< K`` only (soft labels restricted to those classes and renormalised); the accuracy and the ID
    scores use the test images of classes ``< K``; the test images of classes ``>= K`` form the holdout OOD set, and
    every other OOD set is scored against the same ``K``-way networks.

    Robustness measures (see `fastdd.evaluate.robustness`) use the test images of the accuracy: their KMeans clusters
    and their corrupted copies are made once, before any training (the noise from its own generator seeded by
    ``(config.seed, set name)``), so they do not change the networks or the accuracy either; the cluster measures
    reuse the clean test predictions of the accuracy.

    Calibration (see `fastdd.evaluate.calibration` and `fastdd.trust.temperature`) is measured on the ID test
    images of the accuracy: ``none`` is the raw networks; ``mts`` fits one temperature per network on a per-class
    sample of all of S with a random mask of ratio ``mask_ratio`` (the same networks, so the same accuracy); ``ts``
    trains one more network per run on 90 % of S (per class) and fits its temperature on the held-out 10 %. The MTS
    masks, the TS splits and the TS networks come from their own generators seeded by ``(config.seed, method)``, so
    the other networks and numbers are those of an evaluation without calibration.

    ``train_loss`` (``ce``, ``ls``, ``mixup``, ``focal``) and ``train_plugin="oal"`` (OAL with ``teacher``: see
    `fastdd.trust.oal`) change the loss every evaluation network (and TS network) trains with; neither combines with
    the synthetic outliers of a TrustDD set (use ``use_outliers=False``). OAL's boundary outliers are computed once
    per evaluation from the teacher's features of real training images (their own generator).

    Args:
        synset: the synthetic set.
        dataset: its real dataset (`dataset_for_synset`).
        models: architectures to train.
        config: training protocol (default `EvalConfig()`).
        on_epoch: ``on_epoch(model, run, epoch)`` after every training epoch.
        ood: OOD set names (`parse_ood_sets` syntax), or None for accuracy only.
        scores: OOD scores among ``SCORES`` (default ``["msp"]``, TrustDD's).
        plots: folder for ``ood_<model>_<score>.png`` score histograms: ID test scores against each OOD set's scores,
            pooled over the runs.
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
        ``{"dataset", "method", "ipc", "epochs", "lr", "runs", "dsa", "seed", "outliers", "holdout",
        "models": {name: {"acc": {"mean", "std", "runs"}}}}`` with accuracies in percent (std over runs, population
        form as in the papers); ``outliers`` is the number of outlier images trained with (0 when none) and
        ``holdout`` is ``K`` or None. With ``ood`` also ``"scores"``, ``"ood_sets"`` (name -> images per side) and
        ``models[name]["ood"][score][set][metric] = {"mean", "std", "runs"}`` in percent, ``set`` running over the
        OOD sets and ``"mean"`` (the per-run mean over the sets), ``metric`` over ``METRICS``; with ``plots`` also
        ``"plots"``, the PNG paths written. With ``robustness`` also ``"robustness_sets"`` (the measures),
        ``"cluster_sizes"`` (test images per KMeans cluster, when a cluster measure is chosen) and
        ``models[name]["robustness"][set] = {"mean", "std", "runs"}`` in percent. With ``calibration`` also
        ``"calibration"`` (the methods), ``"mask_ratio"`` and ``models[name]["calibration"][method][metric] =
        {"mean", "std", "runs"}`` with ``metric`` in ``acc`` (%), ``ece`` (%), ``nll``, ``temperature``, and for
        ``ts`` also ``ece_before`` / ``nll_before`` (its networks before scaling). ``train_loss`` and
        ``train_plugin`` are always reported.
    """
    config = config or EvalConfig()
    if config.runs < 1:
        raise FastddError(f"--runs must be at least 1, got {config.runs}.")
    if ood_size is not None and ood_size < 1:
        raise FastddError(f"--ood-size must be at least 1, got {ood_size}.")
    specs = parse_ood_sets(ood, num_classes=dataset.num_classes) if ood else []
    for spec in specs:
        if spec.kind == "dataset" and spec.source == dataset.name:
            raise FastddError(
                f"{dataset.name} is the in-distribution dataset, so it cannot be an OOD set; use holdout:K instead."
            )
    if scores and not specs:
        raise FastddError("--score chooses OOD scores, so it needs at least one --ood set.")
    default_scores = ("energy",) if train_plugin == "oal" else DEFAULT_SCORES
    score_names = _check_scores(scores, default_scores) if specs else []
    robustness_sets = parse_robustness_sets(robustness) if robustness is not None else ()
    calibrations = parse_calibrations(calibration) if calibration is not None else ()
    if mask_ratio is None:
        mask_ratio = DEFAULT_MASK_RATIO
    if not 0.0 <= mask_ratio < 1.0:
        raise FastddError(f"--mask-ratio must be in [0, 1), got {mask_ratio}.")
    if plots is not None and not specs and not calibrations:
        raise FastddError(
            "--plots draws OOD score histograms or reliability diagrams, so it needs --ood or --calibration."
        )
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

    meta = synset.meta
    hyper = meta.get("hyperparameters", {})
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    lr = config.lr if config.lr is not None else (float(synset.syn_lr) if synset.syn_lr is not None else DEFAULT_LR)
    strategy = (meta.get("dsa_strategy") or dataset.dsa_strategy) if config.dsa else None
    task = _task(synset, dataset, holdout_spec(specs))
    outliers = synset.outlier_images if use_outliers else None
    if outliers is not None and (train_loss != "ce" or train_plugin is not None):
        what = "--train-plugin oal" if train_plugin is not None else f"--train-loss {train_loss}"
        raise FastddError(
            f"{what} trains on the synthetic images only, but this set has outlier images; pass --ignore-outliers."
        )
    objectives = TrainingObjectives.create(
        train_loss, train_plugin, teacher, synset=synset, dataset=dataset, task=task, seed=config.seed,
        device=config.device,
    )
    calibration_task = (
        CalibrationTask.create(task, calibrations, seed=config.seed, mask_ratio=mask_ratio) if calibrations else None
    )
    stored_weight = hyper.get("outlier_weight")
    outlier_weight = DEFAULT_OUTLIER_WEIGHT if stored_weight is None else float(stored_weight)
    ood_sets = {
        spec.name: _build_ood_set(spec, dataset, task.test_images.shape[0], config.seed, ood_size, data_root)
        for spec in specs
    }
    robustness_tests = (
        build_robustness_tests(
            dataset, robustness_sets, seed=config.seed, images=task.test_images, labels=task.test_labels
        )
        if robustness_sets
        else None
    )

    results: dict[str, Any] = {}
    plot_paths: list[str] = []
    for model in models:
        accs: list[float] = []
        # score -> set -> metric -> per-run values; pooled scores for the histograms
        per_run: dict[str, dict[str, dict[str, list[float]]]] = {
            s: {name: {m: [] for m in METRICS} for name in [*ood_sets, "mean"]} for s in score_names
        }
        pooled_in: dict[str, list[torch.Tensor]] = {s: [] for s in score_names}
        pooled_out: dict[str, dict[str, list[torch.Tensor]]] = {s: {n: [] for n in ood_sets} for s in score_names}
        robustness_runs: dict[str, list[float]] = {name: [] for name in robustness_sets}
        calibration_runs: dict[str, dict[str, list[float]]] = {}
        pooled_calibration: dict[str, list[torch.Tensor]] = {}

        def fresh_trained_net(
            images: torch.Tensor, targets: torch.Tensor, gen: torch.Generator, run: int, with_outliers: bool
        ) -> torch.nn.Module:
            net = evaluation_network(task.shape, model, meta, generator=gen, device=config.device)
            callback = (lambda epoch, m=model, r=run: on_epoch(m, r, epoch)) if on_epoch else None
            return train_on_synthetic(
                images,
                targets,
                net,
                config=config,
                lr=lr,
                generator=gen,
                dsa_strategy=strategy,
                on_epoch=callback,
                outliers=outliers if with_outliers else None,
                outlier_weight=outlier_weight,
                objective=objectives.build(net, gen),
            )

        for run in range(config.runs):
            net = fresh_trained_net(task.images, task.targets, generator, run, True)
            logits_in = predict_logits(net, task.test_images)
            accs.append(100.0 * float((logits_in.argmax(dim=1) == task.test_labels).float().mean()))
            if calibration_task is not None:
                rows, scaled = calibration_task.run(net, logits_in, lambda idx, gen, r=run: fresh_trained_net(
                    task.images[idx], task.targets[idx], gen, r, False
                ))
                for method, metrics in rows.items():
                    for metric, value in metrics.items():
                        calibration_runs.setdefault(method, {}).setdefault(metric, []).append(value)
                for method, pair in scaled.items():
                    pooled_calibration.setdefault(method, []).append(pair)
            if robustness_tests is not None:
                for name, value in robustness_row(net, robustness_tests, clean_logits=logits_in).items():
                    robustness_runs[name].append(value)
            logits_out = {name: predict_logits(net, s.images) for name, s in ood_sets.items()}
            for score in score_names:
                in_scores = ood_score(logits_in, score)
                pooled_in[score].append(in_scores)
                for name, ood_set in ood_sets.items():
                    out_scores = ood_score(logits_out[name], score)
                    pooled_out[score][name].append(out_scores)
                    values = ood_metrics(in_scores[ood_set.in_index], out_scores)
                    for metric, value in values.items():
                        per_run[score][name][metric].append(100.0 * value)
                for metric in METRICS:
                    run_values = [per_run[score][name][metric][-1] for name in ood_sets]
                    per_run[score]["mean"][metric].append(sum(run_values) / len(run_values))
        results[model] = {"acc": _summary(accs)}
        if calibrations:
            results[model]["calibration"] = {
                method: {metric: _summary(values) for metric, values in metrics.items()}
                for method, metrics in calibration_runs.items()
            }
        if robustness_sets:
            results[model]["robustness"] = {name: _summary(values) for name, values in robustness_runs.items()}
        if score_names:
            results[model]["ood"] = {
                score: {name: {m: _summary(v) for m, v in metrics.items()} for name, metrics in sets.items()}
                for score, sets in per_run.items()
            }
        if plots is not None:
            for score in score_names:
                path = Path(plots) / f"ood_{model}_{score}.png"
                save_score_histograms(
                    torch.cat(pooled_in[score]),
                    {name: torch.cat(parts) for name, parts in pooled_out[score].items()},
                    path,
                    score=score,
                    title=f"{dataset.name}, {model}, {config.runs} runs pooled",
                )
                plot_paths.append(str(path))
            if calibrations:
                plot_paths += save_calibration_plots(
                    pooled_calibration, task.test_labels, Path(plots), model=model,
                    title=f"{dataset.name}, {model}, {config.runs} runs pooled",
                )
    report: dict[str, Any] = {
        "dataset": dataset.name,
        "method": meta.get("method"),
        "ipc": meta.get("ipc"),
        "epochs": config.epochs_or_default(),
        "lr": lr,
        "runs": config.runs,
        "dsa": config.dsa,
        "seed": config.seed,
        "outliers": 0 if outliers is None else int(outliers.shape[0]),
        "holdout": task.holdout,
        "train_loss": train_loss,
        "train_plugin": train_plugin,
        "models": results,
    }
    if train_plugin == "oal":
        report["teacher"] = teacher
    if calibrations:
        report["calibration"] = list(calibrations)
        report["mask_ratio"] = mask_ratio
    if specs:
        report["scores"] = score_names
        report["ood_sets"] = {name: int(s.images.shape[0]) for name, s in ood_sets.items()}
    if plots is not None:
        report["plots"] = plot_paths
    if robustness_tests is not None:
        report["robustness_sets"] = list(robustness_sets)
        if robustness_tests.clusters is not None:
            report["cluster_sizes"] = robustness_tests.cluster_sizes()
    return report


@dataclass
class _Task:
    """What the evaluation networks learn and are tested on (all classes, or the classes below a holdout K)."""

    shape: SimpleNamespace  # channels, num_classes, image_size: what `build_model_for` needs
    images: torch.Tensor  # [K_syn, C, H, W] synthetic training images
    targets: torch.Tensor  # [K_syn] labels or [K_syn, classes] soft labels
    test_images: torch.Tensor  # [M, C, H, W] ID test images
    test_labels: torch.Tensor  # [M]
    holdout: int | None


@dataclass
class _OodSet:
    images: torch.Tensor  # [n, C, H, W] model space
    in_index: torch.Tensor  # [n] indices of the ID test images it is compared with


def _task(synset: SyntheticSet, dataset: ImageDataset, holdout: OodSetSpec | None) -> _Task:
    targets = synset.soft_labels if synset.soft_labels is not None else synset.labels
    if holdout is None:
        shape = SimpleNamespace(
            channels=dataset.channels, num_classes=dataset.num_classes, image_size=dataset.image_size
        )
        return _Task(shape, synset.images, targets, dataset.test_images, dataset.test_labels, None)
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
    return _Task(
        shape, synset.images[keep], targets, dataset.test_images[test_keep], dataset.test_labels[test_keep], k
    )


def _build_ood_set(
    spec: OodSetSpec, dataset: ImageDataset, num_in: int, seed: int, ood_size: int | None, data_root: str | None
) -> _OodSet:
    generator = torch.Generator()
    generator.manual_seed(zlib.crc32(f"{seed}/ood/{spec.name}".encode()))
    cap = num_in if ood_size is None else min(num_in, ood_size)
    images = build_ood_images(spec, dataset, count=cap, generator=generator, data_root=data_root)
    in_index = torch.randperm(num_in, generator=generator)[: images.shape[0]]
    return _OodSet(images, in_index)


def _check_scores(scores: list[str] | str | None, default: tuple[str, ...] = DEFAULT_SCORES) -> list[str]:
    items = [scores] if isinstance(scores, str) else list(scores or [])
    names = [part.strip().lower() for item in items for part in item.split(",") if part.strip()]
    names = names or list(default)
    unknown = [s for s in names if s not in SCORES]
    if unknown:
        raise FastddError(f"unknown OOD score {unknown[0]!r}; choose from {', '.join(SCORES)}.")
    return list(dict.fromkeys(names))


def _summary(values: list[float]) -> dict[str, Any]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(tensor.mean()), "std": float(tensor.std(unbiased=False)), "runs": values}
