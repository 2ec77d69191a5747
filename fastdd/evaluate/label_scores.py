"""DD-Ranking's label-robust scores, measured with fastdd's protocol (`fastdd evaluate --scores`).

DD-Ranking (NUS-HPC-AI-Lab/DD-Ranking, ``ddranking/metrics/hard_label.py``) compares, per evaluation run, three
test accuracies: a network trained on the full real training set, one trained on the synthetic set with hard labels,
and one trained on ``IPC`` random real images per class under the same protocol. Then

- ``HLR = acc_full - acc_syn`` (hard-label recovery: how far the set is from the full data; lower is better),
- ``IOR = acc_syn - acc_random`` (improvement over random selection; higher is better),
- ``LRS = (exp(a) - exp(-1)) / (e - exp(-1))`` with ``a = w IOR - (1 - w) HLR`` on accuracies as fractions,
  ``w = 0.5``: the label-robust score, in [0, 1] (fastdd prints it in percent).

fastdd's form: hard labels on both sides (a soft-label set also trains one network per run on its arg-max labels),
so IOR never credits soft labels; the synthetic and random networks train with the evaluation's protocol (its
epochs, DSA and seed; the random subsets at the protocol's lr, or 0.01, since they learned none, where DD-Ranking
searches five); the full-data accuracy is that of a `fastdd teacher` network of the same dataset and model (trained
once and kept in its folder). The random-subset accuracies are cached in that folder too, per IPC and protocol.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

from fastdd.errors import FastddWarning
from fastdd.evaluate.metrics import EvalMetric, TrainedNetwork, summarize
from fastdd.io import write_json

LRS_WEIGHT = 0.5
RANDOM_SUBSETS_FILE = "random_subsets.json"


def label_robust_score(hlr: float, ior: float, weight: float = LRS_WEIGHT) -> float:
    """DD-Ranking's LRS in percent from HLR and IOR in percentage points."""
    alpha = weight * ior / 100 - (1 - weight) * hlr / 100
    return 100 * (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))


def scores_generator(seed: int, model: str, kind: str, run: int) -> torch.Generator:
    """The generator of the scores' extra networks: their own, so the evaluation's other networks stay the same."""
    generator = torch.Generator()
    generator.manual_seed(zlib.crc32(f"{seed}/scores/{model}/{kind}/{run}".encode()))
    return generator


class RandomSubsetCache:
    """Accuracies of networks trained on random real subsets, kept in ``folder/random_subsets.json`` under a key
    made of everything that decides them (dataset, model, IPC, protocol, seed, run)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / RANDOM_SUBSETS_FILE
        self.entries: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def key(description: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]

    def get(self, description: dict[str, Any], compute: Callable[[], float]) -> float:
        key = self.key(description)
        if key not in self.entries:
            self.entries[key] = compute()
            write_json(self.path, self.entries)
        return self.entries[key]


class LabelScoreMetric(EvalMetric):
    """HLR, IOR and LRS per run (a model's ``label_scores``), with the accuracies they come from.

    Args:
        labels: ``[M]`` the test labels.
        full_accuracy: per model, the full-data network's test accuracy in percent.
        random_accuracy: ``random_accuracy(model, run)`` -> test accuracy (%) of the run's random-subset network.
        hard_label_logits: for a soft-label set, ``hard_label_logits(model, run)`` -> ``[M, classes]`` test logits of
            a network trained on the set's arg-max labels; None when the set's labels are hard.
        source: how the accuracies were obtained (for the result).
    """

    def __init__(
        self,
        labels: torch.Tensor,
        *,
        full_accuracy: dict[str, float],
        random_accuracy: Callable[[str, int], float],
        hard_label_logits: Callable[[str, int], torch.Tensor] | None,
        source: dict[str, Any],
    ) -> None:
        self.labels = labels
        self.full_accuracy = full_accuracy
        self.random_accuracy = random_accuracy
        self.hard_label_logits = hard_label_logits
        self.source = source
        self.model: str | None = None
        self.reset()

    def start_model(self, model: str) -> None:
        self.model = model

    def reset(self) -> None:
        self.synthetic: list[float] = []
        self.random: list[float] = []

    def _accuracy(self, logits: torch.Tensor) -> float:
        return 100.0 * float((logits.argmax(dim=1) == self.labels).float().mean())

    def update(self, synthetic_hard_accuracy: float, random_accuracy: float) -> None:
        """One run's accuracies in percent: the set with hard labels, and the random subset."""
        self.synthetic.append(synthetic_hard_accuracy)
        self.random.append(random_accuracy)

    def update_from(self, trained: TrainedNetwork) -> None:
        run, model = len(self.synthetic), self.model
        logits = trained.test_logits if self.hard_label_logits is None else self.hard_label_logits(model, run)
        self.update(self._accuracy(logits), self.random_accuracy(model, run))

    def compute(self) -> dict[str, Any]:
        full = self.full_accuracy[self.model]
        hlr = [full - s for s in self.synthetic]
        ior = [s - r for s, r in zip(self.synthetic, self.random)]
        lrs = [label_robust_score(h, i) for h, i in zip(hlr, ior)]
        return {"label_scores": {
            "hlr": summarize(hlr), "ior": summarize(ior), "lrs": summarize(lrs),
            "acc_hard": summarize(self.synthetic), "acc_random": summarize(self.random), "acc_full": full,
        }}

    def describe(self) -> dict[str, Any]:
        return {"label_scores_protocol": {
            "lrs_weight": LRS_WEIGHT, "labels": "hard (a soft-label set is also trained on its arg-max labels)",
            **self.source,
        }}


def full_data_network(
    folder: str | Path | None, *, dataset: str, model: str, data_root: str | None, zca: bool, image_size: int | None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[float, Path]:
    """The full-data test accuracy (%) of ``model`` on ``dataset`` and the folder it is kept in: ``folder`` (a
    `fastdd teacher` folder), else ``runs/teacher-DATASET-MODEL``, trained there with `fastdd teacher`'s defaults
    when it holds no network yet (once: later evaluations read it)."""
    from fastdd.config.teacher import TeacherConfig
    from fastdd.network_files import is_network_folder, read_network_meta
    from fastdd.teacher_job import train_teacher

    config = TeacherConfig(dataset=dataset, model=model, data_root=data_root, zca=zca, image_size=image_size,
                           out=None if folder is None else str(folder), quiet=True)
    path = Path(config.output_folder())
    if not is_network_folder(path):
        warnings.warn(f"--scores: no full-data {model} of {dataset} in {path}; training one there with fastdd "
                      f"teacher's defaults ({config.epochs} epochs), once: later --scores runs reuse it.",
                      FastddWarning, stacklevel=2)
        train_teacher(config, on_epoch=on_epoch)
    meta = read_network_meta(path)
    return float(meta["test_accuracy"]), path
