"""An evaluation as a plan plus a loop: `plan_evaluation` checks the options and builds the test side once (OOD sets,
KMeans clusters, corrupted test images, OAL's teacher and outlier bank); `EvalPlan.run` trains each network once and
feeds it to the metric objects of `fastdd.evaluate.metrics`. `evaluate_synthetic_set` is both in one call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fastdd.data import ImageDataset
from fastdd.evaluate.calibration_runs import CalibrationTask, extra_networks_per_run
from fastdd.evaluate.metrics import AccuracyMetric, CalibrationMetric, EvalMetric, OodDetectionMetric
from fastdd.evaluate.metrics import RobustnessMetric, TrainedNetwork
from fastdd.evaluate.label_scores import LabelScoreMetric, RandomSubsetCache, full_data_network, scores_generator
from fastdd.evaluate.ood_sets import OodTestSet, build_ood_test_set
from fastdd.config.evaluate import DEFAULT_LR, EvaluationSettings
from fastdd.evaluate.options import EvalOptions, check_evaluation_options, evaluation_settings
from fastdd.evaluate.protocol import evaluation_network, train_on_synthetic
from fastdd.evaluate.robustness import RobustnessTests, build_robustness_tests
from fastdd.evaluate.training_objectives import TrainingObjectives
from fastdd.io import SyntheticSet
from fastdd.training import predict_logits

# on_epoch(model, run, epoch) after every training epoch
EvalProgress = Callable[[str, int, int], None]


@dataclass
class EvalTestData:
    """The test side of an evaluation, built once: every network is scored against the same images.

    It depends only on the dataset, the ID test images of the task, the seed and the OOD / robustness options, so
    evaluations that share those (the sets of one trust report) may share it.

    Attributes:
        ood_sets: OOD set name -> `OodTestSet`, in the order given.
        robustness: the clusters and corrupted test images, or None without robustness measures.
    """

    ood_sets: dict[str, OodTestSet]
    robustness: RobustnessTests | None


def build_test_data(options: EvalOptions) -> EvalTestData:
    """Build the OOD sets (each from its own generator seeded by ``(seed, name)``) and the robustness tests (KMeans
    clusters, corrupted copies, each corruption from its own generator) of checked ``options``."""
    task, seed = options.task, options.config.seed
    ood_sets = {
        spec.name: build_ood_test_set(
            spec, options.dataset, num_in=task.test_images.shape[0], seed=seed, ood_size=options.ood_size,
            data_root=options.data_root,
        )
        for spec in options.ood
    }
    robustness = (
        build_robustness_tests(
            options.dataset, options.robustness, seed=seed, images=task.test_images, labels=task.test_labels
        )
        if options.robustness
        else None
    )
    return EvalTestData(ood_sets, robustness)


@dataclass
class EvalPlan:
    """A checked evaluation with its test side built: `run` trains the networks and returns the result dict.

    Attributes:
        options: the checked options.
        test_data: the OOD sets and robustness tests.
        objectives: builds each network's training objective (OAL's teacher and outlier bank already made).
        lr: the learning rate of every network.
        dsa_strategy: the DSA augmentation while training, or None.
        initial_state: ``--init``'s weights, loaded into every fresh network (after its random initialisation
            is drawn, so the other draws stay those of a run without it), or None.
        full_data: with ``--scores``, per model the full-data test accuracy (%) and the folder of that network
            (where the random-subset accuracies are cached); else None.
    """

    options: EvalOptions
    test_data: EvalTestData
    objectives: TrainingObjectives
    lr: float
    dsa_strategy: str | None
    initial_state: dict[str, torch.Tensor] | None = None
    full_data: dict[str, tuple[float, Path]] | None = None
    _scores_progress: Callable[[int], None] | None = field(default=None, init=False, repr=False)

    @property
    def total_epochs(self) -> int:
        """Training epochs of the whole evaluation (for a progress bar): per model and run one network, one more with
        TS, and with --scores one on random real images (unless cached) and one on arg-max labels for soft labels."""
        o = self.options
        networks = 1 + extra_networks_per_run(o.calibration)
        if self.full_data is not None:
            networks += 1 + (o.task.targets.dim() == 2)
        return len(o.models) * o.config.runs * networks * o.config.epochs_or_default()

    def metrics(self) -> list[EvalMetric]:
        """Fresh metric objects, in the order of a model's result: accuracy, then OOD detection, robustness and
        calibration where the options ask for them."""
        o, data = self.options, self.test_data
        metrics: list[EvalMetric] = [AccuracyMetric(o.task.test_labels)]
        if data.ood_sets:
            metrics.append(OodDetectionMetric(o.scores, data.ood_sets))
        if data.robustness is not None:
            metrics.append(RobustnessMetric(data.robustness))
        if o.calibration:
            task = CalibrationTask.create(
                o.task, o.calibration, seed=o.config.seed, settings=o.calibration_settings,
                train_images=o.dataset.train_images, train_labels=o.dataset.train_labels,
            )
            metrics.append(CalibrationMetric(task))
        if self.full_data is not None:
            soft = o.task.targets.dim() == 2
            metrics.append(LabelScoreMetric(
                o.task.test_labels, full_accuracy={m: acc for m, (acc, _) in self.full_data.items()},
                random_accuracy=self._random_subset_accuracy,
                hard_label_logits=self._hard_label_logits if soft else None,
                source={"full_data": {m: str(folder) for m, (_, folder) in self.full_data.items()},
                        "random_lr": o.config.lr or DEFAULT_LR},
            ))
        return metrics

    def run(self, on_epoch: EvalProgress | None = None) -> dict[str, Any]:
        """Train ``config.runs`` networks per model (one generator seeded by ``config.seed`` for all of them, in model
        then run order), feed each to every metric, and summarise.

        Args:
            on_epoch: ``on_epoch(model, run, epoch)`` after every training epoch.
        Returns:
            The result dict described in `evaluate_synthetic_set`.
        """
        o = self.options
        generator = torch.Generator()
        generator.manual_seed(o.config.seed)
        metrics = self.metrics()
        results: dict[str, Any] = {}
        plot_paths: list[str] = []
        for model in o.models:
            for metric in metrics:
                metric.reset()
                metric.start_model(model)
            for run in range(o.config.runs):
                self._scores_progress = (lambda epoch, m=model, r=run: on_epoch(m, r, epoch)) if on_epoch else None
                trained = self._trained_network(model, run, generator, on_epoch)
                for metric in metrics:
                    metric.update_from(trained)
            results[model] = {key: value for metric in metrics for key, value in metric.compute().items()}
            if o.plots is not None:
                title = f"{o.dataset.name}, {model}, {o.config.runs} runs pooled"
                for metric in metrics:
                    plot_paths += metric.save_plots(Path(o.plots), model=model, title=title)
        return self._result(results, metrics, plot_paths)

    def _trained_network(
        self, model: str, run: int, generator: torch.Generator, on_epoch: EvalProgress | None
    ) -> TrainedNetwork:
        """The run's network trained on all of S (with the synthetic outliers, if any), and its test logits."""
        task = self.options.task

        def train(images: torch.Tensor, targets: torch.Tensor, gen: torch.Generator, outliers: bool) -> torch.nn.Module:
            o = self.options
            net = evaluation_network(task.shape, model, o.synset.meta, generator=gen, device=o.config.device)
            if self.initial_state is not None:
                net.load_state_dict(self.initial_state)
            callback = (lambda epoch: on_epoch(model, run, epoch)) if on_epoch else None
            return train_on_synthetic(
                images,
                targets,
                net,
                config=o.config,
                lr=self.lr,
                generator=gen,
                dsa_strategy=self.dsa_strategy,
                on_epoch=callback,
                outliers=o.outliers if outliers else None,
                objective=self.objectives.build(net, gen),
            )

        def retrain(indices: torch.Tensor, gen: torch.Generator) -> torch.nn.Module:
            return train(task.images[indices], task.targets[indices], gen, False)

        net = train(task.images, task.targets, generator, True)
        return TrainedNetwork(net, predict_logits(net, task.test_images), retrain)

    def _scores_network(self, model: str, kind: str, run: int, images: torch.Tensor, targets: torch.Tensor,
                        lr: float) -> torch.nn.Module:
        """A --scores network (``kind`` random or hard) trained with the protocol from its own generator."""
        o = self.options
        generator = scores_generator(o.config.seed, model, kind, run)
        net = evaluation_network(o.task.shape, model, o.synset.meta, generator=generator, device=o.config.device)
        if self.initial_state is not None:
            net.load_state_dict(self.initial_state)
        return train_on_synthetic(images, targets, net, config=o.config, lr=lr, generator=generator,
                                  dsa_strategy=self.dsa_strategy, on_epoch=self._scores_progress,
                                  objective=self.objectives.build(net, generator))

    def _hard_label_logits(self, model: str, run: int) -> torch.Tensor:
        task = self.options.task
        net = self._scores_network(model, "hard", run, task.images, task.targets.argmax(dim=1), self.lr)
        return predict_logits(net, task.test_images)

    def _random_subset_accuracy(self, model: str, run: int) -> float:
        """Test accuracy (%) of a network trained on as many random real training images per class as the set has,
        at the protocol's lr (a random subset learned none); cached in the full-data network's folder."""
        o = self.options
        counts = torch.bincount(o.synset.labels, minlength=o.dataset.num_classes).tolist()
        lr = o.config.lr or DEFAULT_LR
        probe = evaluation_network(o.task.shape, model, o.synset.meta, generator=torch.Generator(), device="cpu")
        description = {
            "kind": "random-subset", "dataset": o.dataset.name, "source": o.dataset.source,
            "zca": o.dataset.zca is not None, "image_size": list(o.dataset.image_size), "model": repr(probe),
            "init": o.training.init, "objective": self.objectives.describe, "per_class": counts, "lr": lr,
            "epochs": o.config.epochs_or_default(), "momentum": o.config.momentum,
            "weight_decay": o.config.weight_decay, "batch_size": o.config.batch_size, "dsa": self.dsa_strategy,
            "seed": o.config.seed, "run": run, "device": torch.device(o.config.device).type,
        }

        def compute() -> float:
            generator = scores_generator(o.config.seed, model, "subset", run)
            index = o.dataset.class_index()
            chosen = torch.cat([index.sample(c, n, generator) for c, n in enumerate(counts) if n])
            net = self._scores_network(model, "random", run, o.dataset.train_images[chosen],
                                       o.dataset.train_labels[chosen], lr)
            logits = predict_logits(net, o.task.test_images)
            return 100.0 * float((logits.argmax(dim=1) == o.task.test_labels).float().mean())

        return RandomSubsetCache(self.full_data[model][1]).get(description, compute)

    def _result(self, results: dict[str, Any], metrics: list[EvalMetric], plot_paths: list[str]) -> dict[str, Any]:
        o = self.options
        meta = o.synset.meta
        report: dict[str, Any] = {
            "dataset": o.dataset.name,
            "method": meta.get("method"),
            "ipc": meta.get("ipc"),
            "epochs": o.config.epochs_or_default(),
            "lr": self.lr,
            "runs": o.config.runs,
            "dsa": o.config.dsa,
            "seed": o.config.seed,
            "outliers": 0 if o.outliers is None else int(o.outliers.images.shape[0]),
            "holdout": o.task.holdout,
            "train_loss": o.training.train_loss,
            "train_plugin": o.training.train_plugin,
            "models": results,
        }
        if o.training.train_plugin == "oal":
            report["teacher"] = o.training.teacher
            report["oal_kl"] = o.training.oal_kl
            report["oal_recipe"] = o.training.oal_recipe
            report["oal_beta"] = o.training.oal_beta
        if o.training.init is not None:
            report["init"] = o.training.init
        for metric in metrics:
            report.update(metric.describe())
        if o.plots is not None:
            report["plots"] = plot_paths
        return report


def build_plan(options: EvalOptions, *, test_data: EvalTestData | None = None) -> EvalPlan:
    """The plan of checked ``options``: builds the training objectives (OAL: loads the teacher and computes its
    outlier bank) and, unless ``test_data`` is given (shared with another plan of the same test side), the OOD sets
    and robustness tests."""
    o = options
    synset, dataset, config = o.synset, o.dataset, o.config
    objectives = TrainingObjectives.create(
        o.training, synset=synset, dataset=dataset, task=o.task, seed=config.seed, device=config.device
    )
    if test_data is None:
        test_data = build_test_data(o)
    strategy = (synset.meta.get("dsa_strategy") or dataset.dsa_strategy) if config.dsa else None
    initial = initial_state(o) if o.training.init is not None else None
    full_data = None
    if o.label_scores.label_scores:
        full_data = {model: full_data_network(
            o.label_scores.scores_full, dataset=dataset.name, model=model,
            data_root=o.data_root if o.data_root is not None else synset.meta.get("data_root"),
            zca=dataset.zca is not None, image_size=synset.meta.get("image_size"),
        ) for model in o.models}
    return EvalPlan(o, test_data, objectives, config.lr_for(synset), strategy, initial, full_data)


def initial_state(options: EvalOptions) -> dict[str, torch.Tensor]:
    """The weights of ``--init`` (loaded as `fastdd.trust.teacher.load_teacher` loads a teacher), checked against a
    fresh network of every evaluation model.

    Raises:
        FastddError: the network cannot be loaded, or it is not the evaluation model (architecture or classes).
    """
    from fastdd.errors import FastddError
    from fastdd.trust.teacher import load_teacher

    o = options
    source = load_teacher(o.training.init, synset_meta=o.synset.meta, shape=o.task.shape)
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    for model in o.models:
        expected = evaluation_network(o.task.shape, model, o.synset.meta, generator=torch.Generator()).state_dict()
        problem = _state_mismatch(expected, state)
        if problem is not None:
            raise FastddError(
                f"--init {o.training.init} does not fit the evaluation's {model} ({problem}); pass a network of that "
                f"architecture and these {o.task.shape.num_classes} classes (e.g. `fastdd teacher --model {model}` "
                "with the width and depth the set was distilled with)."
            )
    return {k: v.to(o.config.device) for k, v in state.items()}


def _state_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """The first difference between two state dicts' names and shapes, in words, or None when they match."""
    for name, tensor in expected.items():
        if name not in state:
            return f"it has no {name}"
        if state[name].shape != tensor.shape:
            return f"its {name} has shape {list(state[name].shape)}, the model's {list(tensor.shape)}"
    extra = next((name for name in state if name not in expected), None)
    return None if extra is None else f"it has {extra}, which the model has not"


def plan_evaluation(
    synset: SyntheticSet, dataset: ImageDataset, settings: EvaluationSettings | None = None, **keywords: Any
) -> EvalPlan:
    """Check ``settings`` (`check_evaluation_options`), then build what all networks share (`build_plan`). Without
    ``settings`` they are made from ``keywords`` (`evaluation_settings`: ``models=["convnet"], config=EvalConfig(...),
    ood=[...], ...``).

    The plan trains ``config.runs`` fresh networks of each of ``models`` on ``synset`` and tests them on
    ``dataset``. Each network is trained on the synthetic images, plus the synthetic outliers with TrustDD's
    integrated loss when the set holds ``outlier_images`` and ``use_outliers`` is true (weight
    ``hyperparameters["outlier_weight"]``, 0.5 by default). It then makes one forward pass over the ID test images
    (for the accuracy and the ID scores) and one over each OOD set and corrupted test set.

    OOD sets (see `fastdd.evaluate.ood_sets`) are built here, before any training, each from its own generator seeded
    by ``(config.seed, set name)``: a set's images and its ID subsample do not depend on the other sets or their
    order, and the networks (hence the accuracy) are those of an evaluation without ``ood``. ID and OOD sides are
    subsampled to the same size ``n = min(#ID test, #OOD set, ood_size)``; the accuracy always uses the whole ID test
    split.

    ``holdout:K`` changes the whole evaluation: the networks get a ``K``-way head and are trained on the synthetic
    images of classes ``< K`` only (soft labels restricted to those classes and renormalised); the accuracy and the ID
    scores use the test images of classes ``< K``; the test images of classes ``>= K`` form the holdout OOD set, and
    every other OOD set is scored against the same ``K``-way networks.

    Robustness measures (see `fastdd.evaluate.robustness`) use the test images of the accuracy: their KMeans clusters
    and their corrupted copies are made here (the noise from its own generator seeded by ``(config.seed, set
    name)``), so they do not change the networks or the accuracy either; the cluster measures reuse the clean test
    predictions of the accuracy.

    Calibration (see `fastdd.evaluate.calibration` and `fastdd.trust.temperature`) is measured on the ID test images
    of the accuracy: ``none`` is the raw networks; ``mts`` fits one temperature per network on a per-class sample of
    all of S with a random mask of ratio ``mask_ratio`` (the same networks, so the same accuracy); ``ts`` trains one
    more network per run on 90 % of S (per class) and fits its temperature on the held-out 10 %. The MTS masks, the
    TS splits and the TS networks come from their own generators seeded by ``(config.seed, method)`` at the start of
    each `EvalPlan.run`, so the other networks and numbers are those of an evaluation without calibration.

    ``train_loss`` (``ce``, ``ls``, ``mixup``, ``focal``) and ``train_plugin="oal"`` (OAL with ``teacher``: see
    `fastdd.trust.oal`) change the loss every evaluation network (and TS network) trains with; neither combines with
    the synthetic outliers of a TrustDD set (use ``use_outliers=False``). OAL's boundary outliers are computed here
    from the teacher's features of real training images (their own generator).

    Args:
        synset: the synthetic set.
        dataset: its real dataset (`dataset_for_synset`).
        settings: the evaluation (`fastdd.config.evaluate.EvaluationSettings`), or None to make it from ``keywords``.
    Raises:
        FastddError: an invalid option (before anything is built), or an OOD set or teacher that cannot be loaded.
    """
    if settings is None:
        settings = evaluation_settings(**keywords)
    elif keywords:
        raise TypeError(f"plan_evaluation takes settings or keywords, not both (got {', '.join(keywords)})")
    return build_plan(check_evaluation_options(synset, dataset, settings))


def evaluate_synthetic_set(
    synset: SyntheticSet, dataset: ImageDataset, *, on_epoch: EvalProgress | None = None, **keywords: Any
) -> dict[str, Any]:
    """Train ``config.runs`` fresh networks of each of ``models`` on ``synset`` and test them on ``dataset``:
    ``plan_evaluation(synset, dataset, **keywords).run(on_epoch)`` (see `plan_evaluation` for the protocol and
    `fastdd.evaluate.options.evaluation_settings` for the keywords).

    Args:
        on_epoch: ``on_epoch(model, run, epoch)`` after every training epoch.
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
        ``train_plugin`` are always reported, and ``teacher`` with OAL.
    """
    return plan_evaluation(synset, dataset, **keywords).run(on_epoch)
