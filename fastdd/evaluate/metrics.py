"""The metrics of an evaluation, torchmetrics style: one object per concern, fed once per trained network.

Each metric has ``update(...)`` with the tensors it needs (test logits, logits on the OOD or corrupted test sets, the
network itself for a temperature fit), ``compute()`` with its part of a model's result (mean ± std over the runs
seen since the last ``reset()``), and three hooks the evaluation loop calls without knowing which metric it holds:

* ``update_from(trained)``: gathers what ``update`` needs from a `TrainedNetwork` and calls it;
* ``describe()``: the evaluation-level keys of the result dict (which OOD sets, which measures, ...);
* ``save_plots(folder, model=..., title=...)``: the PNGs of one model's runs, pooled (none for most metrics).

All percentages are in percent; every std is the population std, as in the papers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from fastdd.evaluate.calibration_runs import CalibrationTask, SubsetTrainer, save_calibration_plots
from fastdd.evaluate.ood import METRICS, ood_metrics, ood_score, save_score_histograms
from fastdd.evaluate.ood_sets import OodTestSet
from fastdd.evaluate.robustness import RobustnessTests, robustness_scores
from fastdd.training import predict_logits


def summarize(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std", "runs"}`` of per-run values (population std, float64)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(tensor.mean()), "std": float(tensor.std(unbiased=False)), "runs": values}


@dataclass
class TrainedNetwork:
    """One trained evaluation network, as the metrics see it.

    Attributes:
        net: the network, trained on the synthetic set.
        test_logits: ``[M, classes]`` its logits on the ID test images.
        retrain: trains a fresh network of the same model and run on a subset of the synthetic set (for TS).
    """

    net: torch.nn.Module
    test_logits: torch.Tensor
    retrain: SubsetTrainer

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, classes]`` logits of the network (eval mode) on ``images`` ``[N, C, H, W]``."""
        return predict_logits(self.net, images)


class EvalMetric(ABC):
    """The interface the evaluation loop uses; see the module docstring."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the runs seen so far (called before each model's runs)."""

    def start_model(self, model: str) -> None:
        """The model whose runs come next (called after `reset`; most metrics need not know)."""

    @abstractmethod
    def update_from(self, trained: TrainedNetwork) -> None:
        """Feed one trained network."""

    @abstractmethod
    def compute(self) -> dict[str, Any]:
        """This metric's keys of a model's result, summarised over the runs since `reset`."""

    def describe(self) -> dict[str, Any]:
        """This metric's keys of the evaluation's result (none by default)."""
        return {}

    def save_plots(self, folder: Path, *, model: str, title: str) -> list[str]:
        """Write this metric's plots of one model's runs into ``folder``; the paths written (none by default)."""
        return []


class AccuracyMetric(EvalMetric):
    """Top-1 test accuracy (``acc``).

    Args:
        labels: ``[M]`` the test labels.
    """

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.reset()

    def reset(self) -> None:
        self.runs: list[float] = []

    def update(self, logits: torch.Tensor) -> None:
        """One network's ``[M, classes]`` test logits."""
        self.runs.append(100.0 * float((logits.argmax(dim=1) == self.labels).float().mean()))

    def update_from(self, trained: TrainedNetwork) -> None:
        self.update(trained.test_logits)

    def compute(self) -> dict[str, Any]:
        return {"acc": summarize(self.runs)}


class OodDetectionMetric(EvalMetric):
    """OOD detection (``ood``): per score, per OOD set and their per-run mean, the metrics of ``METRICS``.

    Args:
        scores: score names among ``SCORES``.
        sets: OOD set name -> `OodTestSet` (its images, and the ID test images it is compared with).
    """

    def __init__(self, scores: list[str], sets: Mapping[str, OodTestSet]) -> None:
        self.scores = list(scores)
        self.sets = dict(sets)
        self.reset()

    def reset(self) -> None:
        # score -> set -> metric -> per-run values; pooled scores for the histograms
        self.runs = {s: {name: {m: [] for m in METRICS} for name in [*self.sets, "mean"]} for s in self.scores}
        self.pooled_in: dict[str, list[torch.Tensor]] = {s: [] for s in self.scores}
        self.pooled_out = {s: {name: [] for name in self.sets} for s in self.scores}

    def update(self, logits_in: torch.Tensor, logits_out: Mapping[str, torch.Tensor]) -> None:
        """One network's ``[M, classes]`` ID test logits and, per OOD set, its ``[n, classes]`` logits."""
        for score in self.scores:
            in_scores = ood_score(logits_in, score)
            self.pooled_in[score].append(in_scores)
            for name, ood_set in self.sets.items():
                out_scores = ood_score(logits_out[name], score)
                self.pooled_out[score][name].append(out_scores)
                for metric, value in ood_metrics(in_scores[ood_set.in_index], out_scores).items():
                    self.runs[score][name][metric].append(value)
            for metric in METRICS:
                run_values = [self.runs[score][name][metric][-1] for name in self.sets]
                self.runs[score]["mean"][metric].append(sum(run_values) / len(run_values))

    def update_from(self, trained: TrainedNetwork) -> None:
        self.update(trained.test_logits, {name: trained.logits(s.images) for name, s in self.sets.items()})

    def compute(self) -> dict[str, Any]:
        return {
            "ood": {
                score: {name: {m: summarize(v) for m, v in metrics.items()} for name, metrics in sets.items()}
                for score, sets in self.runs.items()
            }
        }

    def describe(self) -> dict[str, Any]:
        return {"scores": self.scores, "ood_sets": {name: int(s.images.shape[0]) for name, s in self.sets.items()}}

    def save_plots(self, folder: Path, *, model: str, title: str) -> list[str]:
        """``ood_<model>_<score>.png``: the pooled ID test scores against each OOD set's scores."""
        paths = []
        for score in self.scores:
            path = folder / f"ood_{model}_{score}.png"
            save_score_histograms(
                torch.cat(self.pooled_in[score]),
                {name: torch.cat(parts) for name, parts in self.pooled_out[score].items()},
                path,
                score=score,
                title=title,
            )
            paths.append(str(path))
        return paths


class RobustnessMetric(EvalMetric):
    """Robustness (``robustness``): the accuracies of ``tests.sets`` (worst / mean KMeans cluster, corruptions).

    Args:
        tests: the clusters and corrupted test images (`build_robustness_tests`).
    """

    def __init__(self, tests: RobustnessTests) -> None:
        self.tests = tests
        self.reset()

    def reset(self) -> None:
        self.runs: dict[str, list[float]] = {name: [] for name in self.tests.sets}

    def update(self, clean_logits: torch.Tensor, corrupted_logits: Mapping[str, torch.Tensor]) -> None:
        """One network's ``[M, classes]`` clean test logits and, per corruption, its ``[M, classes]`` logits."""
        for name, value in robustness_scores(self.tests, clean_logits, dict(corrupted_logits)).items():
            self.runs[name].append(value)

    def update_from(self, trained: TrainedNetwork) -> None:
        corrupted = {name: trained.logits(images) for name, images in self.tests.corrupted.items()}
        self.update(trained.test_logits, corrupted)

    def compute(self) -> dict[str, Any]:
        return {"robustness": {name: summarize(values) for name, values in self.runs.items()}}

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"robustness_sets": list(self.tests.sets)}
        if self.tests.clusters is not None:
            described["cluster_sizes"] = self.tests.cluster_sizes()
        return described


class CalibrationMetric(EvalMetric):
    """Calibration (``calibration``): per method, accuracy, ECE, NLL and temperature (see `CalibrationTask.run`).

    Args:
        task: the methods, the synthetic and test images, and the generators of the masks and TS splits.
    """

    def __init__(self, task: CalibrationTask) -> None:
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.runs: dict[str, dict[str, list[float]]] = {}
        self.pooled: dict[str, list[torch.Tensor]] = {}

    def update(self, net: torch.nn.Module, test_logits: torch.Tensor, train_subset: SubsetTrainer) -> None:
        """One network, its ``[M, classes]`` test logits, and a trainer of fresh networks on subsets (for TS)."""
        rows, scaled = self.task.run(net, test_logits, train_subset)
        for method, metrics in rows.items():
            for metric, value in metrics.items():
                self.runs.setdefault(method, {}).setdefault(metric, []).append(value)
        for method, logits in scaled.items():
            self.pooled.setdefault(method, []).append(logits)

    def update_from(self, trained: TrainedNetwork) -> None:
        self.update(trained.net, trained.test_logits, trained.retrain)

    def compute(self) -> dict[str, Any]:
        return {
            "calibration": {
                method: {metric: summarize(values) for metric, values in metrics.items()}
                for method, metrics in self.runs.items()
            }
        }

    def describe(self) -> dict[str, Any]:
        s = self.task.settings
        return {"calibration": list(self.task.methods), "mask_ratio": s.mask_ratio, "mask_unit": s.mask_unit,
                "mts_fit": s.mts_fit, "ece_bins": s.ece_bins}

    def save_plots(self, folder: Path, *, model: str, title: str) -> list[str]:
        """Reliability diagrams per method and the max-logit histogram (`save_calibration_plots`)."""
        return save_calibration_plots(self.pooled, self.task.test_labels, folder, model=model, title=title,
                                      n_bins=self.task.settings.ece_bins)
